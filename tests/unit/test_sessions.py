"""The nox adapter's own decisions, without running nox: its run id, who prints the summary."""

from __future__ import annotations

from pathlib import Path

import nox
import pytest

from e2e_infra.cli import sessions
from e2e_infra.config import NOX_RUN_ENV, Config, ProjectConfig
from e2e_infra.parallel import pool
from e2e_infra.parallel.pool import Outcome


class FakeSession:
    """What a session function uses of ``nox.Session``."""

    posargs: list[str] = ["-k", "login"]

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.logged: list[str] = []
        self.errors: list[str] = []

    def log(self, line: str) -> None:
        self.logged.append(line)

    def error(self, message: str) -> None:
        self.errors.append(message)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Config]:
    """A clean registry of ours (nox's own keeps what other tests registered)."""
    state: dict[str, Config] = {}
    monkeypatch.setattr(sessions, "_registered", state)
    monkeypatch.setattr(sessions, "_worker", [])
    monkeypatch.delenv("E2E_RUN_ID", raising=False)
    monkeypatch.delenv(NOX_RUN_ENV, raising=False)
    return state


def _config(tmp_path: Path, *projects: str) -> Config:
    return Config(
        root=tmp_path,
        source=None,
        state_dir=tmp_path / "s",
        results_dir=tmp_path / "r",
        projects={p: ProjectConfig(name=p, command="true", cwd=tmp_path) for p in projects},
    )


def test_one_run_id_per_nox_call_shared_with_its_workers_but_not_with_nested_runs(
    registered: dict[str, Config], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    names = sessions.register_sessions(_config(tmp_path, "ns_alpha", "ns_beta"))
    assert names == ["e2e-ns_alpha", "e2e-ns_beta"]
    run = registered["ns_alpha"].run
    assert run is not None
    # A -j worker inherits the main process's environment: the same run.
    import os

    assert os.environ[NOX_RUN_ENV] == run
    assert "E2E_RUN_ID" not in os.environ  # a nested `invoke e2e.all` starts a run of its own
    registered.clear()
    sessions.register_sessions(_config(tmp_path, "ns_gamma"))
    assert registered["ns_gamma"].run == run
    # E2E_RUN_ID, set by the user (CI), names the run instead.
    registered.clear()
    monkeypatch.setenv("E2E_RUN_ID", "ci-1234")
    sessions.register_sessions(_config(tmp_path, "ns_delta"))
    assert registered["ns_delta"].run == "ci-1234"


def test_a_session_runs_its_project_in_its_own_process_and_reports_the_outcome(
    registered: dict[str, Config], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sessions.register_sessions(_config(tmp_path, "ns_run"))
    ran: list[tuple[str, str | None, list[str]]] = []

    def run_one(config: Config, project: str, posargs: list[str]) -> Outcome:
        ran.append((project, config.run, list(posargs)))
        return Outcome(project, None, "ns_run failed: 2 tests failed", ("ran here",))

    monkeypatch.setattr(pool, "run_one", run_one)
    session = FakeSession(parallel=False)
    nox.registry.get()["e2e-ns_run"].func(session)
    assert ran == [("ns_run", registered["ns_run"].run, ["-k", "login"])]
    assert session.logged == ["ran here"]
    assert session.errors == ["ns_run failed: 2 tests failed"]


def test_only_the_main_nox_process_prints_the_summary(
    registered: dict[str, Config],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sessions.register_sessions(_config(tmp_path, "ns_sum"))
    monkeypatch.setattr(pool, "run_one", lambda c, p, a: Outcome(p, None, None))
    printed: list[object] = []
    monkeypatch.setattr("e2e_infra.cli._output.print_run_report", lambda c, r: printed.append(r))
    monkeypatch.setattr(sessions.e2e_infra, "collect_runs", lambda *a, **k: ["a run"])

    # A session run in the nox process itself (sequential): this process prints.
    nox.registry.get()["e2e-ns_sum"].func(FakeSession(parallel=False))
    sessions._summary_at_exit()
    assert printed == [["a run"]]

    # A -j worker (session.parallel): the main process prints, the worker does not.
    nox.registry.get()["e2e-ns_sum"].func(FakeSession(parallel=True))
    sessions._summary_at_exit()
    assert printed == [["a run"]]


def test_a_run_id_that_names_no_valid_folder_is_one_line_not_a_traceback(
    registered: dict[str, Config],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("E2E_RUN_ID", "../elsewhere")
    with pytest.raises(SystemExit) as exited:
        sessions.register_sessions(_config(tmp_path, "ns_bad"))
    assert exited.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run id '../elsewhere'" in err[0], err
