"""nox sessions for every configured project: ``register_sessions()`` from a noxfile.

- ``e2e-<project>``: one per project of ``[tool.e2e_infra.projects]``, tagged ``e2e`` and allowed
  to run in parallel: ``nox -j auto -t e2e`` runs them all at once, ``nox -s e2e-auth_tests --
  -k login`` runs one and passes ``-k login`` to its suite. Leading ``--attach`` (and
  ``--no-reset``) are ours: the suite runs against the environment ``invoke e2e.up`` keeps.
- After the run, the main nox process (not the parallel workers) prints one summary table and
  writes the merged JUnit file and ``report.html``.

Sessions run in the current environment (``venv_backend = "none"``): the work happens in the
library, so a session is a few lines.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nox

import e2e_infra
from e2e_infra.config import NOX_RUN_ENV

__all__ = ["register_sessions"]

# The run id of one nox call reaches its parallel workers (they inherit the environment of the
# main nox process, which loads this file first) as NOX_RUN_ENV. Ours, not E2E_RUN_ID: a command
# a session runs (a nested `invoke e2e.all`) starts a run of its own; no child ever sees it.
_STARTED = time.time()
_registered: dict[str, e2e_infra.Config] = {}  # the config each registered project came from
_worker: list[bool] = []  # [True] once this process ran a session as a nox -j worker


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
        from ..parallel.pool import run_one

        if session.parallel:  # a nox -j worker: the main nox process prints the summary
            _worker.append(True)
        try:
            config.layout.make_run_dir()  # a link planted there: refused, nothing written
        except e2e_infra.E2EInfraError as exc:
            session.error(exc.one_line())
            return
        posargs, attach, reset = _attach_args(list(session.posargs))
        if not attach and not reset:
            session.error("--no-reset goes with --attach: nox -s e2e-<project> -- --attach ...")
            return
        if attach:
            outcome = run_one(config, project, posargs, attach=True, reset=reset)
        else:
            outcome = run_one(config, project, posargs)
        for line in outcome.logs:
            session.log(line)
        if outcome.error:
            session.error(outcome.error)

    session_func.__doc__ = f"Run the {project} E2E project with its own ports, database, servers."
    session_func.__name__ = f"e2e_{project}"
    return session_func


def _attach_args(posargs: list[str]) -> tuple[list[str], bool, bool]:
    """The suite's arguments, and whether they began with ``--attach`` (and ``--no-reset``)."""
    attach, reset = False, True
    while posargs and posargs[0] in ("--attach", "--no-reset"):
        flag = posargs.pop(0)
        attach = attach or flag == "--attach"
        reset = reset and flag != "--no-reset"
    return posargs, attach, reset


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
    _quiet_uv_probe()
    # One run id for this nox call: its results go to <results_dir>/<run id>/.
    run = (
        config.run
        or os.environ.get("E2E_RUN_ID")
        or os.environ.get(NOX_RUN_ENV)
        or e2e_infra.new_run_id()
    )
    try:
        config = config.for_run(run)
    except e2e_infra.E2EInfraError as exc:  # E2E_RUN_ID names no valid folder: one line
        print(f"nox: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    os.environ[NOX_RUN_ENV] = run
    if not _registered:
        atexit.register(_summary_at_exit)
    # nox -j starts them in the order they are registered: the longest recorded first (the
    # durations file only: a -j worker loads this file too, and reads no run record).
    from e2e_infra.results.durations import longest_first

    order = longest_first(config, list(config.projects), run_records=False)
    return [_register(config, project) for project in order]


class _UvProbe(logging.Filter):
    """Drops nox's "uv binary not found." line: nox probes for uv before every session, even one
    that needs no virtual environment (``venv_backend="none"``, all of ours), and says so at
    INFO when a machine has none, on every session. Only that exact line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "uv binary not found."


def _quiet_uv_probe() -> None:
    """Install :class:`_UvProbe` on nox's logger (the standard ``logging`` one named "nox"),
    once."""
    logger = logging.getLogger("nox")
    if not any(isinstance(f, _UvProbe) for f in logger.filters):
        logger.addFilter(_UvProbe())


def _register(config: e2e_infra.Config, project: str) -> str:
    name = f"e2e-{project}"
    if project not in _registered:  # nox warns on a second registration of a name
        _registered[project] = config
        nox.session(name=name, tags=["e2e"], python=False, allow_parallel=True)(
            _session_func(config, project)
        )
    return name


def _summary_at_exit() -> None:
    """After ``nox -t e2e`` (parallel or not): one table, a merged JUnit file, report.html. In
    the main nox process only: a ``-j`` worker ran one session and says nothing more."""
    if _worker or not _registered or os.environ.get("E2E_SUMMARY") == "0":
        return
    from ..report.progress import vanished
    from ._output import print_run_report

    config = next(iter(_registered.values()))
    try:
        vanished(config, list(_registered))  # a session whose process died: named, as an error
        runs = e2e_infra.collect_runs(config, since=_STARTED, projects=list(_registered))
        if runs:
            print_run_report(config, runs)
    except e2e_infra.E2EInfraError as exc:  # a full results folder, say: one line
        print(f"nox: error: {exc.one_line()}", file=sys.stderr)
