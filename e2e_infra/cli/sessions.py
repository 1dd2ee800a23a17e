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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nox

import e2e_infra
from e2e_infra import forkserver

__all__ = ["register_sessions"]

PROJECTS_ENV = "E2E_FORKSERVER_PROJECTS"  # the projects the main process's fork server runs
_STARTED = time.time()
_registered: dict[str, e2e_infra.Config] = {}  # the config each registered project came from
_server: forkserver.ForkServer | None = None


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


def _session_func(config: e2e_infra.Config | None, project: str) -> Callable[[nox.Session], None]:
    """The session of ``project``; ``config`` None: a ``-j`` worker that parses the config only
    if the fork server cannot run the project."""

    def session_func(session: nox.Session) -> None:
        outcome = None
        if session.parallel:  # a -j worker: the warm server runs it, if there is one
            outcome = forkserver.request({"project": project, "posargs": list(session.posargs)})
            if outcome is not None and outcome.get("unknown"):
                outcome = None  # a project the server's config does not have: run it here
        if outcome is None:
            from e2e_infra import runner

            loaded = config or _load(None)
            if loaded is None:
                session.error("the e2e-infra config cannot be loaded (see above)")
            run = os.environ.get("E2E_RUN_ID") or loaded.run or e2e_infra.new_run_id()
            outcome = runner.project_outcome(
                loaded if config else loaded.for_run(run), project, session.posargs
            )
        for line in outcome.get("logs", []):
            session.log(line)
        if outcome.get("error"):
            session.error(outcome["error"])

    session_func.__doc__ = f"Run the {project} E2E project with its own ports, database, servers."
    session_func.__name__ = f"e2e_{project}"
    return session_func


def _serve(payload: Mapping[str, Any]) -> dict[str, Any]:
    """In a child of the fork server: run the project a worker asked for."""
    from e2e_infra import runner

    project = str(payload["project"])
    config = _registered.get(project)
    if config is None:
        return {"unknown": True}
    return runner.project_outcome(config, project, [str(arg) for arg in payload["posargs"]])


def _parallel_requested(argv: Sequence[str], noxfile: int | None = None) -> bool:
    """Whether this nox call asks for parallel sessions (``-j N``/``--parallel``/NOX_PARALLEL,
    else ``nox.options.parallel`` set by the noxfile before ``register_sessions()``)."""
    value = os.environ.get("NOX_PARALLEL") or (str(noxfile) if noxfile else None)
    options = list(argv)[: argv.index("--")] if "--" in argv else list(argv)  # not posargs
    for number, arg in enumerate(options):
        if arg in ("-j", "--parallel") and number + 1 < len(options):
            value = options[number + 1]
        elif arg.startswith("--parallel="):
            value = arg.partition("=")[2]
        elif arg.startswith("-j") and len(arg) > 2:
            value = arg[2:]
    if value is None:
        return False
    if value == "auto":
        return (os.cpu_count() or 1) > 1
    return value.isdigit() and int(value) > 1


def _start_fork_server() -> None:
    """In the main nox process of a parallel run: the warm server the workers ask (see above)."""
    global _server
    if _server is not None or not forkserver.enabled():
        return
    noxfile = getattr(nox.options, "parallel", None)
    if "--parallel-worker" in sys.argv or not _parallel_requested(
        sys.argv[1:], noxfile if isinstance(noxfile, int) else None
    ):
        return
    from e2e_infra import runner

    _server = forkserver.ForkServer.start(_serve, runner.preload)
    if _server is not None:
        # The workers inherit both: where the server is, and which projects it runs (a worker
        # registers those sessions without importing or parsing the config itself).
        os.environ[forkserver.ADDRESS_ENV] = _server.address
        os.environ[PROJECTS_ENV] = ",".join(_registered)
        atexit.register(_server.close)


def register_sessions(config: e2e_infra.Config | Path | str | None = None) -> list[str]:
    """Register ``e2e-<project>`` for every configured project; return the session names.

    ``config`` is a loaded config, a config file, or None for the usual search (``E2E_CONFIG``,
    else the nearest ``pyproject.toml`` from the current folder, which nox sets to the noxfile's).
    Idempotent: a name already registered is left as it is (nox warns on a second registration).
    """
    served = _served_projects() if config is None else None
    if served is not None:
        nox.options.default_venv_backend = "none"
        return [_register(None, project) for project in served]
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
    names = [_register(config, project) for project in config.projects]
    _start_fork_server()  # after the registration: the server is a copy of this process
    return names


def _register(config: e2e_infra.Config | None, project: str) -> str:
    name = f"e2e-{project}"
    if name not in nox.registry.get():
        if config is not None:
            _registered[project] = config
        nox.session(name=name, tags=["e2e"], python=False, allow_parallel=True)(
            _session_func(config, project)
        )
    return name


def _served_projects() -> list[str] | None:
    """In a ``-j`` worker of a run whose main process started the fork server: its projects."""
    if "--parallel-worker" not in sys.argv or not os.environ.get(forkserver.ADDRESS_ENV):
        return None
    listed = os.environ.get(PROJECTS_ENV)
    return [p for p in listed.split(",") if p] if listed else None


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
