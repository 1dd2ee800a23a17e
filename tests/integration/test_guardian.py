"""The guardian: a shell, no interpreter, holds nothing of its owner's, exits when told."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
from support.configs import make_config
from support.runs import orphaned_guardian

from e2e_infra.clock import wait_until
from e2e_infra.resources.leases import process_start_time
from e2e_infra.run.guardian import Guardian, start_guardian


def _start(tmp_path: Path) -> Guardian:
    return start_guardian(
        owner_pid=os.getpid(),
        owner_start_time=process_start_time(os.getpid()) or 0.0,
        run_id="test-run",
        project="p",
        timeout=60,
        log_path=tmp_path / "guardian.log",
        cwd=tmp_path,
        env=dict(os.environ),
    )


def test_guardian_is_a_shell_in_its_own_session_that_stop_reaps_at_once(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    started = time.monotonic()
    guardian = _start(tmp_path)
    forked = time.monotonic() - started
    child = psutil.Process(guardian.pid)
    assert child.cmdline()[0] == "/bin/sh" and "e2e_infra.run.guardian" in child.cmdline()
    # Its own session: an interrupt to our group does not reach it.
    wait_until(lambda: os.getsid(child.pid) == child.pid, timeout=5, what="setsid", first=0.001)
    # It closed every descriptor it inherited but its pipe: not our listening socket.
    wait_until(lambda: len(child.open_files()) == 0, timeout=5, what="closed files", first=0.001)
    held = {c.laddr.port for c in child.net_connections(kind="tcp") if c.laddr}
    assert port not in held
    assert forked < 0.5
    started = time.monotonic()
    guardian.stop()
    guardian.stop()  # idempotent
    assert time.monotonic() - started < 0.5
    assert not psutil.pid_exists(child.pid) or child.status() != psutil.STATUS_ZOMBIE
    assert not (tmp_path / "guardian.log").exists()  # a normal end leaves no trace
    listener.close()


def test_an_owner_that_dies_turns_the_shell_into_the_full_guardian_with_a_private_log(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    log = config.state_dir / "guardian.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    guardian = orphaned_guardian(config, "dead-run", cwd=tmp_path)
    # The full guardian: it finds the owner gone, reclaims the run (nothing held) and exits 0.
    assert guardian.wait(timeout=60) == 0
    assert log.stat().st_mode & 0o777 == 0o600
