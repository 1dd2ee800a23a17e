"""The guardian of one run: reclaims the run's leases if its owner dies without releasing them.

:func:`start_guardian` starts ``/bin/sh`` on one line of a pipe whose write end only the owner
holds: no interpreter and no copy of the session (a fork of a ~45 MB session cost ~9 ms of CPU per
project between the fork and the child's exit; ``vfork`` and a shell ~1 ms), and no CPU while it
waits. It leads a session of its own (the interrupt that kills the run's group does not reach it)
and holds no descriptor of the owner's but the pipe (``close_fds``). A session that ends normally
writes ``q`` and reaps it (:meth:`Guardian.stop`). End of file without that line means the owner
died holding its write end (SIGKILL, say): only then does the shell become the full guardian, by
``exec`` of a fresh interpreter, which appends its output to the guardian log (never through a
symbolic link)::

    python -m e2e_infra.run.guardian --pid PID --start-time T --run-id RUN --project NAME \\
        --timeout S --log LOG

That guardian polls the owner (pid + start time, so a reused pid is not mistaken for it) until the
owner is gone or the deadline passes, then kills the run's orphan server groups, drops its
databases and releases its ports. The shell itself waits as long as its owner lives: a session
that hangs past its own timeout is still reclaimed once it is killed.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clock import SystemClock, wait_until
from ..config import load_config
from ..errors import DeadlineExceeded, E2EInfraError
from ..processes import wait_exit
from ..processes.logs import open_log
from ..resources.leases import process_state

__all__ = ["Guardian", "main", "start_guardian"]

log = logging.getLogger("e2e_infra")

_STOP = b"q\n"  # what the owner writes when it ends normally: the guardian exits, no reclaim
# "$@": the full guardian's command, which opens its own log (--log: never through a symbolic
# link, which the shell's >> would follow). stdin from /dev/null.
_WAIT = 'IFS= read -r line && [ "$line" = q ] && exit 0; exec "$@" </dev/null >/dev/null 2>&1'


def _owner_gone(pid: int, start_time: float) -> bool:
    return process_state(pid, start_time) in ("gone", "reused")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e_infra.run.guardian")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--start-time", type=float, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--log", type=Path, help="append to this file (never a symbolic link)")
    args = parser.parse_args(argv)
    stream = None
    if args.log is not None:
        try:
            stream = open_log(args.log)  # 0600, O_NOFOLLOW; a refused log leaves the output off
        except (E2EInfraError, OSError):
            stream = None
        else:
            os.dup2(stream.fileno(), 1)
            os.dup2(stream.fileno(), 2)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s guardian[%(process)d] %(levelname)s: %(message)s",
        stream=sys.stderr,
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
    """The owner's handle on its guardian: the process and the pipe's write end."""

    proc: subprocess.Popen[Any] = field(repr=False)
    fd: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Tell the guardian the run ended normally and reap it (SIGKILL if it has not exited
        within 2 s of the line: it exits at once). Idempotent."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.write(fd, _STOP)
        except OSError:
            pass  # it is gone already (killed): nothing to tell, only to reap
        finally:
            os.close(fd)
        try:
            wait_exit(self.proc, 2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
    """Start the guardian of ``run_id``; the caller (the owner) must :meth:`~Guardian.stop` it."""
    argv = [
        sys.executable,
        "-m",
        "e2e_infra.run.guardian",
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
        "--log",
        str(log_path),
    ]
    read_end, write_end = os.pipe()  # both close on exec: no server or suite inherits them
    try:
        # Its own session; every other descriptor closed (the owner's listening sockets,
        # connections, lock files); the default signal dispositions of a fresh process.
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _WAIT, "e2e-infra-guardian", *argv],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Guardian(proc=proc, fd=write_end)


if __name__ == "__main__":
    sys.exit(main())
