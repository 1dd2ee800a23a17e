"""nox sessions for every configured project: ``register_sessions()`` from a noxfile.

- ``e2e-<project>``: one per project of ``[tool.e2e_infra.projects]``, tagged ``e2e`` and allowed
  to run in parallel: ``nox -j auto -t e2e`` runs them all at once, ``nox -s e2e-auth_tests --
  -k login`` runs one and passes ``-k login`` to its suite.
- After the run, the main nox process (not the parallel workers) prints one summary table and
  writes the merged JUnit file and ``report.html``.

Sessions run in the current environment (``venv_backend = "none"``): the work happens in the
library, so a session is a few lines.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nox

import e2e_infra

__all__ = ["register_sessions"]

_STARTED = time.time()
_registered: dict[str, e2e_infra.Config] = {}  # the config each registered project came from


def _load(config_path: Path | None) -> e2e_infra.Config | None:
    try:
        return e2e_infra.load_config(config_path)
    except e2e_infra.E2EInfraError as exc:
        print(f"nox: e2e sessions unavailable: {exc.one_line()}", file=sys.stderr)
        if os.environ.get("E2E_CONFIG") or any("e2e" in arg for arg in sys.argv[1:]):
            # e2e sessions were asked for (or a config named): the config error is the answer,
            # not nox's "Sessions not found".
            sys.exit(exc.exit_code)
        return None


def _session_func(config: e2e_infra.Config, project: str) -> Callable[[nox.Session], None]:
    def session_func(session: nox.Session) -> None:
        # status.json at each phase: `invoke e2e.all` shows it live while nox -j runs.
        status = e2e_infra.StatusWriter(config)
        try:
            result = e2e_infra.run_project(config, project, session.posargs, on_phase=status)
        except e2e_infra.E2EInfraError as exc:  # an interrupt: released already; one line
            status.finish(project, "interrupted")
            session.error(f"{project}: {exc.one_line()}")
        except Exception as exc:  # a defect of ours: still one masked line, never a traceback
            status.finish(project, "error")
            message = e2e_infra.mask_secrets(" ".join(f"{type(exc).__name__}: {exc}".split()))
            session.error(
                f"{project}: unexpected {message[:500]} (a bug in e2e-infra: please report it; "
                "run `invoke e2e.cleanup` if anything was left behind)"
            )
        status.finish(project, result.result)
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in result.phases.items())
        session.log(f"{project}: {result.result} in {result.duration:.2f}s ({phases})")
        if result.log_tail:
            session.log(f"last lines of the server log:\n{result.log_tail}")
        if not result.passed:
            detail = f": {result.error}" if result.error else ""
            session.error(f"{project} {result.result}{detail}")

    session_func.__doc__ = f"Run the {project} E2E project with its own ports, database, servers."
    session_func.__name__ = f"e2e_{project}"
    return session_func


def register_sessions(config: e2e_infra.Config | Path | str | None = None) -> list[str]:
    """Register ``e2e-<project>`` for every configured project; return the session names.

    ``config`` is a loaded config, a config file, or None for the usual search (``E2E_CONFIG``,
    else the nearest ``pyproject.toml`` from the current folder, which nox sets to the noxfile's).
    Idempotent: a name already registered is left as it is (nox warns on a second registration).
    """
    if config is None or isinstance(config, Path | str):
        loaded = _load(Path(config) if config is not None else None)
        if loaded is None:
            return []
        config = loaded
    nox.options.default_venv_backend = "none"
    # One run id for this nox call: its results go to <results_dir>/<run id>/. Set in the
    # environment, so the parallel workers (started after this file is loaded) share it.
    run = config.run or os.environ.get("E2E_RUN_ID") or e2e_infra.new_run_id()
    os.environ["E2E_RUN_ID"] = run
    config = config.for_run(run)
    if not _registered and "--parallel-worker" not in sys.argv:
        # The main nox process prints the summary; parallel workers (one session each) do not.
        atexit.register(_summary_at_exit)
    names = []
    for project in config.projects:
        name = f"e2e-{project}"
        names.append(name)
        if name in nox.registry.get():
            continue
        _registered[project] = config
        nox.session(name=name, tags=["e2e"], python=False, allow_parallel=True)(
            _session_func(config, project)
        )
    return names


def _summary_at_exit() -> None:
    """After ``nox -t e2e`` (parallel or not): one table, a merged JUnit file, report.html."""
    if not _registered or os.environ.get("E2E_SUMMARY") == "0":
        return
    config = next(iter(_registered.values()))
    runs = e2e_infra.collect_runs(config, since=_STARTED)
    if runs:
        e2e_infra.print_summary(config, runs)
        if merged := e2e_infra.merge_playwright_reports(config, runs):
            print(f"Playwright report: {merged}", file=sys.stderr)
        report = e2e_infra.write_html_report(config, runs)
        print(f"report: {report}", file=sys.stderr)
