"""The nox adapter's own decisions, without running nox."""

from __future__ import annotations

import sys
from pathlib import Path

import nox
import pytest

from e2e_infra import forkserver, runner
from e2e_infra.cli import sessions
from e2e_infra.config import Config


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


class FakeSession:
    """What a session function uses of ``nox.Session``."""

    parallel = True
    posargs: list[str] = []

    def __init__(self) -> None:
        self.logged: list[str] = []

    def log(self, line: str) -> None:
        self.logged.append(line)

    def error(self, message: str) -> None:
        raise AssertionError(message)


def test_a_worker_of_a_served_run_registers_its_sessions_without_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "argv", ["nox", "--parallel-worker", "-s", "e2e-wk_alpha"])
    monkeypatch.setenv(forkserver.ADDRESS_ENV, str(tmp_path / "gone.sock"))
    monkeypatch.setenv(sessions.PROJECTS_ENV, "wk_alpha,wk_beta")
    monkeypatch.setenv("E2E_RUN_ID", "run-of-the-main-process")
    loads: list[object] = []
    config = Config(root=tmp_path, source=None, state_dir=tmp_path / "s", results_dir=tmp_path)

    def load(path: object) -> Config:
        loads.append(path)
        return config

    monkeypatch.setattr(sessions, "_load", load)
    assert sessions.register_sessions() == ["e2e-wk_alpha", "e2e-wk_beta"]
    assert loads == []  # the names came from the main process
    registered = nox.registry.get()["e2e-wk_alpha"]

    # The server is gone (no socket): the worker parses the config then, for the main's run.
    ran: list[tuple[str, str | None]] = []

    def outcome(cfg: Config, project: str, posargs: object) -> dict[str, object]:
        ran.append((project, cfg.run))
        return {"logs": ["ran here"], "error": None}

    monkeypatch.setattr(runner, "project_outcome", outcome)
    session = FakeSession()
    registered.func(session)
    assert loads == [None] and ran == [("wk_alpha", "run-of-the-main-process")]
    assert session.logged == ["ran here"]


def test_only_a_worker_with_a_server_and_its_project_list_skips_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["nox", "--parallel-worker"])
    monkeypatch.setenv(forkserver.ADDRESS_ENV, "/somewhere")
    monkeypatch.setenv(sessions.PROJECTS_ENV, "a,b")
    assert sessions._served_projects() == ["a", "b"]
    monkeypatch.delenv(sessions.PROJECTS_ENV)
    assert sessions._served_projects() is None  # a server from an older main process
    monkeypatch.setenv(sessions.PROJECTS_ENV, "a,b")
    monkeypatch.delenv(forkserver.ADDRESS_ENV)
    assert sessions._served_projects() is None  # no server: the worker runs it, config and all
    monkeypatch.setenv(forkserver.ADDRESS_ENV, "/somewhere")
    monkeypatch.setattr(sys, "argv", ["nox", "-j", "2"])
    assert sessions._served_projects() is None  # the main process parses the config itself
