"""The guardian of one run: reclaims the run's leases if its owner dies without releasing them.

:func:`start_guardian` forks the session's process (no new interpreter: ~1 ms and no CPU while it
waits). The child leaves the session's process group (its own session, so the interrupt that kills
the run's group does not reach it), closes every inherited descriptor but the read end of a pipe
whose write end only the owner holds, and blocks reading it. A session that ends normally writes
one byte and reaps the child (:meth:`Guardian.stop`). End of file without that byte means the
owner died holding its write end (SIGKILL, say): only then does the child become a full guardian,
by ``exec`` of a fresh interpreter, so nothing the fork copied (another thread's locks, open
connections) is ever used::

    python -m e2e_infra.guardian --pid PID --start-time T --run-id RUN --project NAME --timeout S

That guardian polls the owner (pid + start time, so a reused pid is not mistaken for it) until the
owner is gone or the deadline passes, then kills the run's orphan server groups, drops its
databases and releases its ports.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .clock import SystemClock, wait_until
from .config import load_config
from .errors import DeadlineExceeded, E2EInfraError
from .leases import process_state

__all__ = ["Guardian", "main", "start_guardian"]

log = logging.getLogger("e2e_infra")

_STOP = b"q"  # what the owner writes when it ends normally: the child exits without a reclaim


def _owner_gone(pid: int, start_time: float) -> bool:
    return process_state(pid, start_time) in ("gone", "reused")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e_infra.guardian")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--start-time", type=float, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--timeout", type=float, default=7200.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s guardian[%(process)d] %(levelname)s: %(message)s"
    )
    clock = SystemClock()
    try:
        wait_until(
            lambda: _owner_gone(args.pid, args.start_time),
            timeout=args.timeout,
            what=f"the end of run {args.run_id} (pid {args.pid})",
            clock=clock,
            first=0.05,
            cap=0.2,
        )
    except DeadlineExceeded as exc:
        log.warning("%s; leaving its leases to `invoke e2e.cleanup`", exc)
        return 0
    # The owner is gone without stopping us: it crashed or was killed. Reclaim its run.
    from .reclaim import reclaim

    try:
        report = reclaim(load_config(), run_id=args.run_id)
    except E2EInfraError as exc:
        log.error("could not reclaim run %s: %s", args.run_id, exc.one_line())
        return 1
    for kind, items in (
        ("server", report.servers),
        ("database", report.databases),
        ("port", report.ports),
    ):
        for what, why in items:
            log.info("run %s (%s): reclaimed %s %s: %s", args.run_id, args.project, kind, what, why)
    for error in report.errors:
        log.error("run %s: %s", args.run_id, error)
    return 0 if not report.errors else 1


@dataclass
class Guardian:
    """The owner's handle on its forked guardian: the child's pid and the pipe's write end."""

    pid: int
    fd: int

    def stop(self) -> None:
        """Tell the guardian the run ended normally and reap it. Idempotent."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.write(fd, _STOP)
        except OSError:
            pass  # it is gone already (killed): nothing to tell, only to reap
        finally:
            os.close(fd)
        _reap(self.pid, timeout=2.0)


def _reap(pid: int, *, timeout: float) -> None:
    """Reap the child, which exits at once on the byte; SIGKILL it if it has not in ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): poll briefly
        pidfd = -1
    try:
        if pidfd >= 0:
            exited = bool(select.select([pidfd], [], [], timeout)[0])
        else:
            exited = _poll_exit(pid, timeout)
        if not exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # it has exited, or SIGKILL ends it now
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _poll_exit(pid: int, timeout: float) -> bool:
    def reaped() -> bool:
        try:
            return os.waitpid(pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True

    try:
        wait_until(reaped, timeout=timeout, what=f"guardian {pid} to exit", first=0.001, cap=0.02)
    except DeadlineExceeded:
        return False
    return True


def start_guardian(
    *,
    owner_pid: int,
    owner_start_time: float,
    run_id: str,
    project: str,
    timeout: float,
    log_path: Path,
    cwd: Path,
    env: dict[str, str],
) -> Guardian:
    """Fork the guardian of ``run_id``; the caller (the owner) must :meth:`~Guardian.stop` it.

    Call it while the process has no other thread that matters: the child runs no Python code
    that takes a lock before it either exits or replaces itself with a fresh interpreter.
    """
    argv = [
        sys.executable,
        "-m",
        "e2e_infra.guardian",
        "--pid",
        str(owner_pid),
        "--start-time",
        repr(owner_start_time),
        "--run-id",
        run_id,
        "--project",
        project,
        "--timeout",
        str(timeout),
    ]
    log_name = os.fsencode(log_path)
    read_end, write_end = os.pipe()  # both close on exec: no server or suite inherits them
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its behaviour is tested end to end
        try:
            _child(read_end, argv, log_name, os.fsencode(cwd), env, timeout, run_id)
        finally:
            os._exit(1)
    os.close(read_end)
    return Guardian(pid=pid, fd=write_end)


def _child(
    read_end: int,
    argv: list[str],
    log_name: bytes,
    cwd: bytes,
    env: dict[str, str],
    timeout: float,
    run_id: str,
) -> None:
    """The forked guardian: wait for the owner's byte or its death; reclaim only on death."""
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    # Nothing of the owner's stays open here: its listening sockets, connections, lock files.
    keep = sorted({read_end, 0, 1, 2})
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)
    ready, _, _ = select.select([read_end], [], [], timeout)
    if not ready:
        message = f"guardian of run {run_id}: no end after {timeout:g}s; leaving it to cleanup\n"
        _append(log_name, message.encode())
        os._exit(0)
    if os.read(read_end, 1) == _STOP:
        os._exit(0)
    # End of file: the owner died holding the write end. Become the full guardian.
    log_fd = os.open(log_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.chdir(cwd)
    os.execve(argv[0], argv, env)


def _append(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
