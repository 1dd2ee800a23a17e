"""spawn and stop-by-escalation against real processes: groups, trees, grandchildren, zombies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from e2e_infra.clock import wait_until
from e2e_infra.processes import (
    KILL,
    Child,
    Ending,
    Processes,
    escalation,
    group_members,
    kill_tree_if_ours,
    spawn,
    wait_exit,
)
from e2e_infra.resources.leases import process_start_time

pytestmark = pytest.mark.integration

# A child that writes "ready" once its SIGTERM handler (or SIG_IGN) is installed, then sleeps.
IGNORES_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)
OBEYS_TERM = "import sys, time; print('ready', flush=True); time.sleep(60)"
# Starts a grandchild that ignores SIGTERM and writes its pid once it does, then sleeps itself.
WITH_GRANDCHILD = (
    "import os, pathlib, subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import os, pathlib, signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "pathlib.Path(\\'g.tmp\\').write_text(str(os.getpid())); "
    "os.replace(\\'g.tmp\\', \\'grandchild.pid\\'); time.sleep(60)']); "
    "[time.sleep(0.01) for _ in range(1000) if not os.path.exists('grandchild.pid')]; "
    "print('ready', flush=True); time.sleep(60)"
)


def gone(pid: int) -> bool:
    return process_start_time(pid) is None  # zombies count as gone


def wait_ready(log: Path) -> None:
    wait_until(lambda: "ready" in log.read_text(), timeout=10, what=f"'ready' in {log}")


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Every child a test spawns; SIGKILLed and reaped afterwards whatever happened."""
    made: list[Child] = []
    yield made
    for child in made:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.record.pgid, signal.SIGKILL) if child.own_group else child.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)


def start(children: list[Child], tmp_path: Path, code: str, **kw: object) -> Child:
    log = tmp_path / "child.log"
    child = spawn([sys.executable, "-c", code], cwd=tmp_path, log=log, **kw)  # type: ignore[arg-type]
    children.append(child)
    wait_ready(log)
    return child


def test_spawn_makes_a_group_leader_with_its_env_cwd_and_log(
    tmp_path: Path, children: list[Child]
) -> None:
    code = "import os; print('ready', os.getcwd(), os.environ['MARK'], flush=True); input()"
    child = start(children, tmp_path, code, env={**os.environ, "MARK": "m-42"})
    assert os.getpgid(child.pid) == child.pid == child.record.pgid
    assert os.getsid(child.pid) == child.pid
    assert f"ready {tmp_path} m-42" in (tmp_path / "child.log").read_text()
    # stdin is closed: input() hits EOF and the child ends on its own.
    child.popen.wait(timeout=10)
    record = child.stop(escalation(1.0))
    assert record.ending is Ending.EXITED and record.signal is None


def test_spawn_passes_the_given_fds_only(tmp_path: Path, children: list[Child]) -> None:
    read_end, write_end = os.pipe()
    try:
        code = f"import os; os.write({write_end}, b'via-fd'); print('ready', flush=True)"
        start(children, tmp_path, code, pass_fds=[write_end])
        assert os.read(read_end, 16) == b"via-fd"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_and_reaped(
    tmp_path: Path, children: list[Child]
) -> None:
    child = start(children, tmp_path, IGNORES_TERM)
    started = time.monotonic()
    record = child.stop(escalation(0.5))
    assert record.ending is Ending.KILLED and record.signal is signal.SIGKILL
    assert record.returncode == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 5
    assert child.popen.returncode is not None  # reaped: no zombie left behind
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(child.pid).status()


def test_a_child_that_obeys_sigterm_ends_after_sigterm(
    tmp_path: Path, children: list[Child]
) -> None:
    child = start(children, tmp_path, OBEYS_TERM)
    record = child.stop(escalation(5.0))
    assert record.ending is Ending.TERMINATED and record.signal is signal.SIGTERM
    assert record.returncode == -signal.SIGTERM
    assert record.seconds < 5.0
    assert record.describe().startswith("stopped by SIGTERM")


def test_a_group_with_a_grandchild_is_fully_ended(tmp_path: Path, children: list[Child]) -> None:
    child = start(children, tmp_path, WITH_GRANDCHILD)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert not gone(grandchild)
    record = child.stop(escalation(0.5))
    # The leader obeyed SIGTERM, the grandchild did not: the group is done only after SIGKILL.
    assert record.ending is Ending.KILLED
    assert gone(grandchild)
    assert group_members(child.record.pgid, child.record.start_time) == []


def test_stragglers_that_outlive_their_leader_are_ended_too(
    tmp_path: Path, children: list[Child]
) -> None:
    child = start(children, tmp_path, WITH_GRANDCHILD)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    child.popen.kill()
    child.popen.wait(timeout=5)  # the leader is reaped; its group id lives on in the grandchild
    record = child.stop(escalation(0.3))
    assert record.ending is Ending.KILLED
    assert gone(grandchild)


def test_stopping_twice_is_fine_and_says_the_same(tmp_path: Path, children: list[Child]) -> None:
    child = start(children, tmp_path, OBEYS_TERM)
    child.begin(escalation(5.0))  # the parallel form: signal now, wait later
    first = child.stop(escalation(5.0))
    assert child.stop(escalation(5.0)) is first
    assert child.stop(KILL) is first
    assert child.stop_record is first


def test_a_child_in_our_group_is_stopped_with_its_tree_and_spares_the_group(
    tmp_path: Path, children: list[Child]
) -> None:
    child = start(children, tmp_path, WITH_GRANDCHILD, own_group=False)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert os.getpgid(child.pid) == os.getpgrp()  # our group: a killpg would hit us
    record = child.stop(escalation(0.5))
    assert record.ending is Ending.KILLED
    assert gone(child.pid) and gone(grandchild)


def test_processes_found_by_psutil_follow_a_custom_ladder(
    tmp_path: Path, children: list[Child]
) -> None:
    # As the postmaster is stopped: SIGINT (fast), SIGQUIT (immediate), SIGKILL.
    code = (
        "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "signal.signal(signal.SIGQUIT, lambda *a: sys.exit(0)); print('ready', flush=True); "
        "time.sleep(60)"
    )
    child = start(children, tmp_path, code)
    ladder = (
        escalation(0.3, signal.SIGINT)[0],
        escalation(5.0, signal.SIGQUIT)[0],
        *KILL,
    )
    record = Processes([psutil.Process(child.pid)], "a postmaster").stop(ladder)
    assert record.ending is Ending.TERMINATED and record.signal is signal.SIGQUIT
    assert record.returncode is None  # not our child: no return code to read
    child.popen.wait(timeout=5)


def test_kill_tree_if_ours_ends_a_recorded_tree_and_spares_a_reused_pid(
    tmp_path: Path, children: list[Child]
) -> None:
    child = start(children, tmp_path, WITH_GRANDCHILD, own_group=False)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    stale = child.record.__class__(
        pid=child.pid, pgid=child.record.pgid, start_time=child.record.start_time - 60
    )
    assert kill_tree_if_ours(stale, grace=0.2) is False
    assert not gone(child.pid)
    assert kill_tree_if_ours(child.record, grace=0.3) is True
    child.popen.wait(timeout=5)
    wait_until(lambda: gone(grandchild), timeout=5, what="the grandchild to be gone")


def test_wait_exit_returns_the_code_as_soon_as_the_child_ends() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.2); raise SystemExit(3)"]
    )
    started = time.monotonic()
    assert wait_exit(proc, 30.0) == 3
    assert time.monotonic() - started < 5.0
    assert proc.returncode == 3
    assert wait_exit(proc, 30.0) == 3  # reaped already: the same code


def test_wait_exit_times_out_like_popen_wait_and_leaves_the_child_running() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exit(proc, 0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
