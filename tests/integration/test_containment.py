"""Containment: whatever a run starts, and whatever that starts, is found and ended.

Real nox runs (a session in the nox process, or in a ``-j`` worker), real processes, real
PostgreSQL. The suites leave children behind on purpose: a background ``sleep``, a ``setsid``
double-forked daemon, children of a suite stopped at its timeout; the crash tests SIGKILL the run
between a server's spawn and its lease, and in the middle of a migrate command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import psutil
import pytest
from support.cli import CLI, Cli, clean_environ, config_environ
from support.clusters import running_cluster
from support.configs import write_pyproject
from support.runs import Nox, guardian_of, project_folder, start_nox

import e2e_infra
from e2e_infra.processes.containment import MARKER, Containment, sweep_dead
from e2e_infra.resources.leases import Owner

pytestmark = pytest.mark.integration

PORT_RANGE = "19600-19679"

# Forks twice, the middle one calls setsid: the daemon is in no group or session of ours and its
# parent exits, the way a real daemon detaches. It writes its pid, then sleeps for a minute.
DAEMON = """\
import os, pathlib, sys, time
out = pathlib.Path(sys.argv[1])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        out.write_text(str(os.getpid()))
        time.sleep(60)
    os._exit(0)
os.wait()
deadline = time.monotonic() + 10
while not out.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
print("daemon started")
"""

# The health check of the "gate" server: says it runs, then passes only once the test holds the
# lease registry's lock. The next server ("locker") is then spawned but its lease cannot be
# written: the spawn-before-record window, held open for the test to SIGKILL the run inside it.
GATE = """\
import pathlib, sys, time
pathlib.Path(sys.argv[1]).touch()
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:
    if pathlib.Path(sys.argv[2]).exists():
        sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
"""

LOCKER = """\
import os, pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(60)
"""

MIGRATE = """\
import os, pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(60)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("contain")
    (folder / "daemon.py").write_text(DAEMON)
    (folder / "gate.py").write_text(GATE)
    (folder / "locker.py").write_text(LOCKER)
    state = folder / "state"
    projects = {
        "background": {
            "command": "sh -c 'sleep 30 & echo started'",
            "database": False,
            "servers": [],
        },
        "daemon": {
            "command": f"{{python}} {folder / 'daemon.py'} {folder / 'daemon.pid'}",
            "database": False,
            "servers": [],
        },
        "slow": {
            "command": "sh -c 'sleep 40 & sleep 41'",
            "database": False,
            "servers": [],
            "timeout": 1,
        },
        "window": {
            "command": "true",
            "database": False,
            "servers": ["gate", "locker"],
        },
    }
    servers = {
        "gate": {
            "command": "sleep 60",
            "cwd": str(folder),
            "health": f"cmd:{{python}} {folder / 'gate.py'} {folder / 'gate.up'} "
            f"{folder / 'gate.go'}",
            "startup_timeout": 60,
            "stop_timeout": 1,
        },
        "locker": {
            "command": f"{{python}} {folder / 'locker.py'} {folder / 'locker.pid'}",
            "cwd": str(folder),
            "depends_on": ["gate"],
            "health": "tcp://127.0.0.1:1",
            "startup_timeout": 60,
        },
    }
    path = write_pyproject(
        folder,
        port_range=PORT_RANGE,
        projects=projects,
        servers=servers,
        state_dir=state,
        lock_timeout=30,
    )
    config = e2e_infra.load_config(path, environ=clean_environ())
    with running_cluster(config):
        yield path


@pytest.fixture
def config(workspace: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(workspace, environ=clean_environ())


def marked(results_dir: Path) -> list[psutil.Process]:
    """Live processes carrying a containment marker, of runs whose results go to ``results_dir``."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            ours = env.get("E2E_RESULTS_DIR", "").startswith(str(results_dir))
            if MARKER in env and ours and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sleeps(seconds: str, results_dir: Path) -> list[psutil.Process]:
    """Live ``sleep <seconds>`` processes of runs whose results go to ``results_dir``."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            ours = proc.environ().get("E2E_RESULTS_DIR", "").startswith(str(results_dir))
            alive = proc.status() != psutil.STATUS_ZOMBIE
            if proc.info["cmdline"] == ["sleep", seconds] and ours and alive:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def nox_run(config_path: Path, project: str, timeout: float = 120) -> tuple[float, str]:
    start = time.monotonic()
    # Piped on purpose: a leftover holding the pipe would make this call hang.
    done = CLI.nox("-s", f"e2e-{project}", env=config_environ(config_path), timeout=timeout)
    return time.monotonic() - start, done.stdout + done.stderr


def run_record(config: e2e_infra.Config, project: str) -> dict[str, object]:
    path = project_folder(config.results_dir, project) / "run.json"
    data: dict[str, object] = json.loads(path.read_text())
    return data


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- a phase's leftovers --------------------------------------------------------------------------


def test_a_suite_that_leaves_a_background_child_does_not_hang_the_run(
    workspace: Path, config: e2e_infra.Config
) -> None:
    seconds, output = nox_run(workspace, "background")
    assert seconds < 20, output
    assert sleeps("30", config.results_dir) == []
    record = run_record(config, "background")
    assert record["result"] == "passed", output
    assert record["leftovers"] == {"suite": 1}
    assert marked(config.results_dir) == []


def test_a_setsid_double_forked_daemon_started_by_the_suite_is_ended(
    workspace: Path, config: e2e_infra.Config
) -> None:
    pid_file = workspace.parent / "daemon.pid"
    pid_file.unlink(missing_ok=True)
    seconds, output = nox_run(workspace, "daemon")
    daemon = int(pid_file.read_text())
    assert pid_gone(daemon), output
    assert seconds < 20
    record = run_record(config, "daemon")
    assert record["result"] == "passed", output
    assert record["leftovers"] == {"suite": 1}


def test_a_suite_stopped_at_its_timeout_leaves_no_children(
    workspace: Path, config: e2e_infra.Config
) -> None:
    seconds, output = nox_run(workspace, "slow")
    assert seconds < 25, output
    assert sleeps("40", config.results_dir) == [] and sleeps("41", config.results_dir) == []
    record = run_record(config, "slow")
    assert record["result"] == "failed"
    assert "timeout" in str(record["error"])


# --- after a SIGKILL of the run -------------------------------------------------------------------


def test_sigkill_between_a_server_spawn_and_its_lease_is_cleaned_by_e2e_cleanup(
    workspace: Path, config: e2e_infra.Config, reap: list[Nox], cli: Cli
) -> None:
    folder = workspace.parent
    for name in ("locker.pid", "gate.up", "gate.go"):
        (folder / name).unlink(missing_ok=True)
    pid_file = folder / "locker.pid"
    proc = start_nox(workspace, "-s", "e2e-window")
    reap.append(proc)
    e2e_infra.wait_until(
        lambda: (folder / "gate.up").exists(), timeout=60, what="the gate's health check"
    )
    registry = e2e_infra.make_registry(config)
    lock = filelock.FileLock(str(registry.lock_path), thread_local=False)
    lock.acquire(timeout=10)
    try:
        (folder / "gate.go").touch()
        server = e2e_infra.wait_until(
            lambda: int(pid_file.read_text()) if pid_file.exists() else None,
            timeout=60,
            what="the locker server to start",
        )
        time.sleep(0.2)  # the session is waiting for the lock to write the locker's lease
        leases = json.loads(registry.path.read_text())["leases"]
        assert [x for x in leases if x["kind"] == "contained"], "the marker is recorded first"
        assert [x["data"]["name"] for x in leases if x["kind"] == "server"] == ["gate"]
        contained = [x for x in leases if x["kind"] == "contained"]
        guardian_of(int(contained[0]["owner"]["pid"])).kill()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        lock.release()
    assert not pid_gone(server)  # orphaned, and no lease names it

    done = cli.invoke("e2e.cleanup", "--json", env=config_environ(workspace), timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert any(row["resource"] == "window/processes" for row in report["servers"]), report
    e2e_infra.wait_until(lambda: pid_gone(server), timeout=10, what="the server to end")
    assert [lease for lease in registry.snapshot() if lease.project == "window"] == []


def test_a_migrate_command_running_when_nox_is_sigkilled_is_ended_by_the_guardian(
    tmp_path: Path, reap: list[Nox]
) -> None:
    (tmp_path / "migrate.py").write_text(MIGRATE)
    pid_file = tmp_path / "migrate.pid"
    path = write_pyproject(
        tmp_path,
        port_range="19690-19699",
        migrations_dir=None,
        seeds_dir=None,
        migrate_command=f"{{python}} {tmp_path / 'migrate.py'} {pid_file}",
        projects={"migrating": {"command": "true", "servers": []}},
    )
    config = e2e_infra.load_config(path, environ=clean_environ())
    with running_cluster(config):
        proc = start_nox(path, "-s", "e2e-migrating")
        reap.append(proc)
        migrate = e2e_infra.wait_until(
            lambda: (
                int(pid_file.read_text()) if pid_file.exists() and pid_file.read_text() else None
            ),
            timeout=60,
            what="the migrate command to start",
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        e2e_infra.wait_until(
            lambda: pid_gone(migrate), timeout=20, what="the guardian to end the migrate command"
        )
        log = (config.state_dir / "guardian.log").read_text()
        assert "ending 1 process(es) of dead run" in log and "(migrating)" in log
        # Let the guardian finish its reclaim (it reaches the cluster) before the cluster stops:
        # otherwise a cluster check of its could start it again after this test.
        guardian = int(re.findall(r"guardian\[(\d+)\]", log)[-1])
        e2e_infra.wait_until(lambda: pid_gone(guardian), timeout=30, what="the guardian to end")


# --- the sweep touches nothing else ---------------------------------------------------------------


def test_the_dead_run_sweep_ends_only_its_own_marked_processes(tmp_path: Path) -> None:
    path = write_pyproject(tmp_path, port_range="19680-19689")
    config = e2e_infra.load_config(path, environ=clean_environ())
    registry = e2e_infra.make_registry(config)
    owner = Owner.current(host=config.host_id, run_id="r1")
    before = os.environ.get(MARKER)
    early = subprocess.Popen(["sleep", "30"], env={**os.environ, MARKER: "feedface:suite"})
    contain = Containment.open(registry, owner, "p")
    try:
        ours = subprocess.Popen(["sleep", "30"], env={**os.environ, MARKER: contain.tag("suite")})
        other = subprocess.Popen(["sleep", "30"], env={**os.environ, MARKER: "0123:suite"})
        clean = {k: v for k, v in os.environ.items() if k != MARKER}
        plain = subprocess.Popen(["sleep", "30"], env=clean)
        # A process carrying a dead run's token but older than that run is not the run's.
        started = psutil.Process(early.pid).create_time()
        older = contain.lease.with_data(marker="feedface", since=started + 1.0)
        assert sweep_dead(older) == 0
        assert sweep_dead(contain.lease) == 1
        ours.wait(timeout=10)
        for bystander in (early, other, plain):
            assert bystander.poll() is None
    finally:
        contain.close()
        for proc in (early, other, plain):
            proc.kill()
            proc.wait()
    assert os.environ.get(MARKER) == before
    assert [lease for lease in registry.snapshot() if lease.kind == "contained"] == []


def test_the_tree_walk_finds_marked_processes_and_skips_what_unmarked_ones_start(
    tmp_path: Path,
) -> None:
    from e2e_infra.processes.containment import marked_descendants

    # An unmarked parent (like the cluster's postmaster) whose child sets a marker back on
    # purpose: that child is not looked at; a marked child with a marked grandchild is.
    pid_file = tmp_path / "grandchild"
    grandchild = (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen(['sleep', '30'], env={{**os.environ, {MARKER!r}: 'x:inner'}}); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(30)"
    )
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    unmarked = subprocess.Popen([sys.executable, "-c", grandchild], env=env)
    marked = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], env={**env, MARKER: "x:suite"})
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        inner = int(pid_file.read_text())
        found = dict(marked_descendants(os.getpid()))
        assert found.get(marked.pid) == "x:suite"
        assert len([pid for pid, value in found.items() if value == "x:suite"]) == 2  # + its sleep
        assert unmarked.pid not in found and inner not in found
    finally:
        for proc in (unmarked, marked):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
