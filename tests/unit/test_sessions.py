"""The nox adapter's own decisions, without running nox."""

from __future__ import annotations

import pytest

from e2e_infra.cli import sessions


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["-t", "e2e"], None, False),
        (["-j", "2", "-t", "e2e"], None, True),
        (["-j", "1", "-t", "e2e"], None, False),
        (["-j4"], None, True),
        (["--parallel", "3"], None, True),
        (["--parallel=2"], None, True),
        (["--parallel=1"], None, False),
        ([], "2", True),
        ([], "1", False),
        (["-j", "1"], "4", False),  # the command line wins over NOX_PARALLEL
        (["-s", "e2e-a", "--", "-j", "2"], None, False),  # the suite's arguments, not nox's
    ],
)
def test_parallel_is_read_from_noxs_own_options(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("NOX_PARALLEL", raising=False)
    else:
        monkeypatch.setenv("NOX_PARALLEL", env)
    assert sessions._parallel_requested(argv) is expected


def test_auto_means_parallel_only_with_more_than_one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOX_PARALLEL", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert sessions._parallel_requested(["-j", "auto"]) is False
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert sessions._parallel_requested(["-j", "auto"]) is True


def test_a_parallel_value_the_noxfile_set_counts_unless_the_command_line_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOX_PARALLEL", raising=False)
    assert sessions._parallel_requested(["-t", "e2e"], 4) is True
    assert sessions._parallel_requested(["-t", "e2e"], 1) is False
    assert sessions._parallel_requested(["-j", "1"], 4) is False
