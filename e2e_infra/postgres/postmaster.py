"""The processes of a local PostgreSQL server: find its postmaster, stop it, end its orphans.

The postmaster of a data folder is the pid in its ``postmaster.pid`` when that pid is a live
``postgres`` process working in the folder (a reused pid is not mistaken for it). It is stopped
with PostgreSQL's own signal ladder through the one stop-by-escalation primitive of
:mod:`e2e_infra.processes`: SIGINT (pg_ctl's "fast" mode), SIGQUIT ("immediate"), SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..clock import Clock
from ..errors import ClusterError
from ..processes import KILL_WAIT, Ladder, Processes, Step, StopRecord

__all__ = ["Postmaster", "kill_orphans", "live_postmaster", "postgres_processes", "stop_postmaster"]

log = logging.getLogger("e2e_infra")

_ORPHAN_WAIT = 10.0  # seconds for SIGKILLed leftovers to be gone


@dataclass(frozen=True)
class Postmaster:
    pid: int
    port: int
    ready: bool


def shutdown_ladder(fast: float) -> Ladder:
    """Fast shutdown for ``fast`` seconds, then immediate for 5 s, then SIGKILL."""
    return (
        Step(signal.SIGINT, fast),
        Step(signal.SIGQUIT, 5.0),
        Step(signal.SIGKILL, KILL_WAIT),
    )


def _pidfile_lines(data_dir: Path) -> list[str] | None:
    try:
        return (data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None


def _is_our_postgres(pid: int, data_dir: Path) -> bool:
    """A live (not zombie) postgres process working in ``data_dir``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if not proc.name().startswith("postgres"):
            return False
        try:
            return Path(proc.cwd()).resolve() == data_dir.resolve()
        except psutil.AccessDenied:
            return True  # another user's process named postgres: trust the pid file
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def live_postmaster(data_dir: Path) -> Postmaster | None:
    """The running postmaster of ``data_dir``, or None."""
    lines = _pidfile_lines(data_dir)
    if not lines or len(lines) < 4:
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:
        return None
    if not _is_our_postgres(pid, data_dir):
        return None
    ready = len(lines) >= 8 and lines[7].strip() == "ready"
    return Postmaster(pid=pid, port=port, ready=ready)


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """Every ``postgres`` process working in ``data_dir`` (postmaster, backends, helpers)."""
    data = data_dir.resolve()
    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.info["name"] or "").startswith("postgres") and Path(
                proc.cwd()
            ).resolve() == data:
                found.append(proc)
    return found


def kill_orphans(data_dir: Path, *, clock: Clock | None = None) -> None:
    """SIGKILL leftovers (backends, checkpointer...) of a postmaster that died by SIGKILL."""
    procs = postgres_processes(data_dir)
    if not procs:
        return
    log.warning(
        "killing %d leftover PostgreSQL process(es) of a dead postmaster in %s",
        len(procs),
        data_dir,
    )
    what = "leftover PostgreSQL processes"
    ended = Processes(procs, what, clock=clock).stop((Step(signal.SIGKILL, _ORPHAN_WAIT),))
    if not ended.ended:
        raise ClusterError(
            f"{what} in {data_dir} survived SIGKILL for {_ORPHAN_WAIT:g}s; "
            f"check `ps` for postgres processes in {data_dir}"
        )


def stop_postmaster(pid: int, *, fast: float, clock: Clock | None = None) -> StopRecord | None:
    """Stop the postmaster ``pid`` by :func:`shutdown_ladder`; None if it was already gone."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    record = Processes([proc], f"PostgreSQL (pid {pid})", clock=clock).stop(shutdown_ladder(fast))
    if not record.ended:
        raise ClusterError(f"the local PostgreSQL server (pid {pid}) survived SIGKILL")
    return record
