"""nox sessions for e2e-infra.

- ``e2e-<project>``: one per project configured in ``[tool.e2e_infra.projects]``, tagged ``e2e``
  and allowed to run in parallel: ``nox -j auto -t e2e`` runs them all at once,
  ``nox -s e2e-auth_tests -- -k login`` runs one and passes ``-k login`` to its suite.
- ``tests``: the tool's own test suite with its static gates (what ``.ci/run`` runs).
- ``lint``: the static gates alone.

Every session runs in the current environment (``pip install -e '.[dev]'``): no virtualenv per
project. The sessions are thin: the work happens in ``e2e_infra``.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

import nox

import e2e_infra

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

HERE = Path(__file__).resolve().parent
STARTED = time.time()


def _load() -> e2e_infra.Config | None:
    try:
        path = None if os.environ.get("E2E_CONFIG") else HERE / "pyproject.toml"
        return e2e_infra.load_config(path)
    except e2e_infra.E2EInfraError as exc:
        print(f"nox: e2e sessions unavailable: {exc.one_line()}", file=sys.stderr)
        if any("e2e" in arg for arg in sys.argv[1:]):
            # e2e sessions were asked for: the config error is the answer, not "no sessions".
            sys.exit(exc.exit_code)
        return None


CONFIG = _load()


def _e2e_session(project: str) -> None:
    def session_func(session: nox.Session) -> None:
        assert CONFIG is not None
        # status.json at each phase: `invoke e2e.all` shows it live while nox -j runs.
        status = e2e_infra.StatusWriter(CONFIG)
        try:
            result = e2e_infra.run_project(CONFIG, project, session.posargs, on_phase=status)
        except e2e_infra.E2EInfraError as exc:  # an interrupt: released already; one line
            status.finish(project, "interrupted")
            session.error(f"{project}: {exc.one_line()}")
        status.finish(project, result.result)
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in result.phases.items())
        session.log(f"{project}: {result.result} in {result.duration:.2f}s ({phases})")
        if result.log_tail:
            session.log(f"last lines of the server log:\n{result.log_tail}")
        if not result.passed:
            detail = f": {result.error}" if result.error else ""
            session.error(f"{project} {result.result}{detail}")

    session_func.__doc__ = f"Run the {project} E2E project with its own ports, database, servers."
    nox.session(name=f"e2e-{project}", tags=["e2e"], python=False, allow_parallel=True)(
        session_func
    )


if CONFIG is not None:
    for _project in CONFIG.projects:
        _e2e_session(_project)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff and mypy (strict on e2e_infra/)."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The static gates, then the whole test suite (unit and integration, real PostgreSQL)."""
    lint(session)
    session.run(sys.executable, "-m", "pytest", *session.posargs)


def _summary_at_exit() -> None:
    """After ``nox -t e2e`` (parallel or not): one table and a merged JUnit file."""
    if CONFIG is None or os.environ.get("E2E_SUMMARY") == "0":
        return
    runs = e2e_infra.collect_runs(CONFIG, since=STARTED)
    if runs:
        e2e_infra.print_summary(CONFIG, runs)
        report = e2e_infra.write_html_report(CONFIG, runs)
        print(f"report: {report}", file=sys.stderr)


# The main nox process prints the summary; parallel workers (each runs one session) do not.
if "--parallel-worker" not in sys.argv:
    atexit.register(_summary_at_exit)
