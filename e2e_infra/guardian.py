"""The guardian of one run: reclaims the run's leases if its owner dies without releasing them.

Started by :class:`~e2e_infra.session.ProjectSession` as a detached process (its own session, so
the interrupt that kills the run's process group does not reach it)::

    python -m e2e_infra.guardian --pid PID --start-time T --run-id RUN --project NAME --timeout S

It polls the owner (pid + start time, so a reused pid is not mistaken for it) until the owner is
gone or the deadline passes. A session that ends normally releases everything itself and then
stops its guardian with SIGTERM; a session that was SIGKILLed leaves its leases to the guardian,
which kills the run's orphan server groups, drops its databases and releases its ports.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .clock import SystemClock, wait_until
from .config import load_config
from .errors import DeadlineExceeded, E2EInfraError
from .leases import process_state

log = logging.getLogger("e2e_infra")


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


if __name__ == "__main__":
    sys.exit(main())
