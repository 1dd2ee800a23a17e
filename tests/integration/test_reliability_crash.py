"""Crash tests: SIGKILL the run, the suite or a server in the middle of a run; nothing stays.

Each test drives nox as a subprocess against a configuration in a temp folder (state, results,
ports 18000-18199) and one embedded PostgreSQL cluster shared by the module. The projects are tiny:
``http.server`` as the server and a short Python script as the suite, which writes its pid and then
waits for a "go" file, so a test can strike at a known moment. After each strike the test checks,
from the outside, that no lease, no process of the run, no project database and no port is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from support.cli import CLI, clean_environ, config_environ
from support.clusters import running_cluster
from support.configs import write_pyproject
from support.runs import Nox, guardian_of, project_folder, run_processes, start_nox

import e2e_infra
from e2e_infra.resources.leases import Lease, Owner, process_start_time
from e2e_infra.run.servers import ProcessRecord, kill_group_if_ours

pytestmark = pytest.mark.integration

PORT_RANGE = "18000-18199"

# The suite: records its pid, waits for the go file, then asks the server whether it is healthy.
SUITE = """\
import os, pathlib, sys, time, urllib.request
results = pathlib.Path(os.environ["E2E_RESULTS_DIR"])
(results / "suite.pid").write_text(str(os.getpid()))
go = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
try:
    urllib.request.urlopen(os.environ["BACKEND_URL"] + "/", timeout=5).read()
except OSError as exc:
    print("server unreachable:", exc)
    sys.exit(1)
"""

PROJECTS = ("guarded", "cleaned", "nextrun", "runnerkill", "serverkill")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("crash")
    (folder / "suite.py").write_text(SUITE)
    server = {
        "command": "{python} -m http.server {port} --bind 127.0.0.1",
        "cwd": str(folder),
        "port": "backend",
        "health": "http://127.0.0.1:{port}/",
        "startup_timeout": 20,
        "stop_timeout": 3,
    }
    projects = {
        name: {
            "command": f"{{python}} {folder / 'suite.py'} {folder / ('go-' + name)}",
            "cwd": str(folder),
            "servers": ["web"],
            "seed": "auth_only",
        }
        for name in PROJECTS
    }
    path = write_pyproject(
        folder, port_range=PORT_RANGE, servers={"web": server}, projects=projects
    )
    config = e2e_infra.load_config(path, environ=clean_environ())
    with running_cluster(config):
        yield path


@pytest.fixture
def config(workspace: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(workspace, environ=clean_environ())


# --- helpers ------------------------------------------------------------------------------------


def invoke(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(*args, env=config_environ(config_path), timeout=120)


class Leftovers:
    """What a run can leave: leases, processes, project databases, bound ports."""

    def __init__(self, config: e2e_infra.Config) -> None:
        self.config = config
        self.registry = e2e_infra.make_registry(config)

    def leases(self, project: str | None = None) -> list[Lease]:
        return [
            lease
            for lease in self.registry.snapshot()
            if lease.project != "postgres" and (project is None or lease.project == project)
        ]

    def processes(self) -> list[psutil.Process]:
        return run_processes(self.config.results_dir)

    def databases(self) -> list[str]:
        ports = e2e_infra.PortAllocator.from_config(self.config, self.registry)
        cluster = e2e_infra.LocalCluster(self.config, self.registry, ports)
        with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s",
                (self.config.database.name_base + "\\_%",),
            ).fetchall()
        return sorted(row[0] for row in rows if "_tpl_" not in row[0])

    def nothing(self, ports: set[int]) -> bool:
        return (
            not self.leases()
            and not self.processes()
            and not self.databases()
            and all(e2e_infra.port_is_free(port) for port in ports)
        )

    def describe(self) -> str:
        return (
            f"leases={[(x.kind, x.resource) for x in self.leases()]} "
            f"processes={[p.pid for p in self.processes()]} databases={self.databases()}"
        )


def wait_for_suite(config: e2e_infra.Config, project: str, proc: Nox) -> int:
    """Wait until the project's suite runs (its server is up); return the suite's pid."""

    def ready() -> int | None:
        if proc.poll() is not None:
            raise AssertionError(f"nox exited early: {proc.wait()}")
        results = config.results_dir
        found = [*results.glob(f"{project}/suite.pid"), *results.glob(f"*/{project}/suite.pid")]
        if not found:
            return None
        pid_file = max(found, key=lambda path: path.stat().st_mtime)  # this run's, the newest
        if not pid_file.read_text():
            return None
        return int(pid_file.read_text())

    return e2e_infra.wait_until(ready, timeout=90, what=f"the suite of {project} to start")


def held_resources(leftovers: Leftovers, project: str) -> tuple[str, set[int], list[Lease]]:
    leases = leftovers.leases(project)
    run_ids = {lease.owner.run_id for lease in leases}
    assert len(run_ids) == 1, leases
    ports = {int(lease.resource) for lease in leases if lease.kind == "port"}
    servers = [lease for lease in leases if lease.kind == "server"]
    assert servers and any(lease.kind == "database" for lease in leases), leases
    return run_ids.pop(), ports, servers


def kill_session(proc: Nox, owner_pid: int) -> None:
    os.kill(owner_pid, signal.SIGKILL)
    if owner_pid == proc.pid:
        proc.wait(timeout=30)


def strike(
    config_path: Path,
    config: e2e_infra.Config,
    project: str,
    reap: list[Nox],
    *,
    kill_guardian: bool,
    parallel: bool = False,
) -> tuple[set[int], list[Lease]]:
    """Start a run of ``project``, wait for its suite, SIGKILL the process holding the session."""
    args = ("-j", "auto", "-s", f"e2e-{project}") if parallel else ("-s", f"e2e-{project}")
    proc = start_nox(config_path, *args)
    reap.append(proc)
    wait_for_suite(config, project, proc)
    leftovers = Leftovers(config)
    _run_id, ports, servers = held_resources(leftovers, project)
    owner_pid = servers[0].owner.pid
    assert (owner_pid == proc.pid) is not parallel  # -j: the session runs in a worker process
    if kill_guardian:
        guardian_of(owner_pid).kill()
    kill_session(proc, owner_pid)
    return ports, servers


# --- the session process dies -------------------------------------------------------------------


def test_sigkilled_nox_session_is_reclaimed_by_its_guardian(
    workspace: Path, config: e2e_infra.Config, reap: list[Nox]
) -> None:
    ports, servers = strike(workspace, config, "guarded", reap, kill_guardian=False)
    killed = time.monotonic()
    leftovers = Leftovers(config)
    e2e_infra.wait_until(
        lambda: leftovers.nothing(ports),
        timeout=15,
        what="the guardian to reclaim the run",
        hint=leftovers.describe(),
    )
    assert time.monotonic() - killed < 15
    for lease in servers:
        assert process_start_time(int(lease.data["pid"])) is None
    log = (config.state_dir / "guardian.log").read_text()
    assert "reclaimed server guarded/web" in log


def test_sigkilled_session_without_guardian_is_reclaimed_by_e2e_cleanup(
    workspace: Path, config: e2e_infra.Config, reap: list[Nox]
) -> None:
    ports, servers = strike(workspace, config, "cleaned", reap, kill_guardian=True)
    leftovers = Leftovers(config)
    # Without its guardian the run's leftovers stay: the server, the database, the leases.
    server_pid = int(servers[0].data["pid"])
    assert process_start_time(server_pid) is not None
    (dbname,) = leftovers.databases()
    assert dbname.startswith("e2e_db_cleaned")
    assert leftovers.leases("cleaned")

    proc = invoke(workspace, "e2e.cleanup", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    servers_reclaimed = {row["resource"]: row["reason"] for row in report["servers"]}
    # The orphan server group, and the orphan suite (its own tree: it shared the dead run's group).
    assert sorted(servers_reclaimed) == ["cleaned/suite", "cleaned/web"]
    assert all("killed its process group" in why for why in servers_reclaimed.values())
    assert [row["resource"] for row in report["databases"]] == [dbname]
    assert {row["resource"].split()[0] for row in report["ports"]} == {str(p) for p in ports}
    assert leftovers.nothing(ports), leftovers.describe()
    assert process_start_time(server_pid) is None


def test_sigkilled_parallel_worker_is_reclaimed_by_the_next_run(
    workspace: Path, config: e2e_infra.Config, reap: list[Nox]
) -> None:
    ports, servers = strike(workspace, config, "nextrun", reap, kill_guardian=True, parallel=True)
    server_pid = int(servers[0].data["pid"])
    assert process_start_time(server_pid) is not None
    (workspace.parent / "go-nextrun").touch()  # the next run's suite need not wait
    proc = start_nox(workspace, "-s", "e2e-nextrun")
    reap.append(proc)
    returncode, out = proc.wait()
    assert returncode == 0, out
    leftovers = Leftovers(config)
    e2e_infra.wait_until(
        lambda: leftovers.nothing(ports),
        timeout=15,
        what="the next run to have reclaimed the dead run",
        hint=leftovers.describe(),
    )
    assert process_start_time(server_pid) is None


# --- the suite or a server dies -----------------------------------------------------------------


def test_sigkilled_test_runner_fails_the_run_and_everything_is_released(
    workspace: Path, config: e2e_infra.Config, reap: list[Nox]
) -> None:
    proc = start_nox(workspace, "-s", "e2e-runnerkill")
    reap.append(proc)
    suite_pid = wait_for_suite(config, "runnerkill", proc)
    ports = {int(x.resource) for x in Leftovers(config).leases("runnerkill") if x.kind == "port"}
    os.kill(suite_pid, signal.SIGKILL)
    returncode, out = proc.wait()
    assert returncode != 0, out
    record = json.loads((project_folder(config.results_dir, "runnerkill") / "run.json").read_text())
    assert record["result"] == "failed"
    assert record["returncode"] == -signal.SIGKILL
    leftovers = Leftovers(config)
    assert leftovers.nothing(ports), leftovers.describe()


def test_sigkilled_server_stops_the_suite_names_the_server_and_release_still_works(
    workspace: Path, config: e2e_infra.Config, reap: list[Nox]
) -> None:
    proc = start_nox(workspace, "-s", "e2e-serverkill")
    reap.append(proc)
    wait_for_suite(config, "serverkill", proc)
    leases = Leftovers(config).leases("serverkill")
    ports = {int(x.resource) for x in leases if x.kind == "port"}
    (server,) = [x for x in leases if x.kind == "server" and x.data["name"] == "web"]
    os.kill(int(server.data["pid"]), signal.SIGKILL)
    # The server watch stops the suite without waiting for the go file: it would only fail.
    returncode, out = proc.wait()
    assert returncode != 0, out
    record = json.loads((project_folder(config.results_dir, "serverkill") / "run.json").read_text())
    assert record["result"] == "error" and record["returncode"] == -signal.SIGTERM
    assert "server web was killed by SIGKILL during the suite" in record["error"]
    assert record["server_exits"][0]["signal"] == "SIGKILL"
    leftovers = Leftovers(config)
    assert leftovers.nothing(ports), leftovers.describe()


# --- a reused pid is never killed ----------------------------------------------------------------


@pytest.fixture
def bystanders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Unrelated processes, each in a group of its own; killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _bystander(procs: list[subprocess.Popen[bytes]]) -> tuple[int, float]:
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    procs.append(proc)
    start = process_start_time(proc.pid)
    assert start is not None
    return proc.pid, start


def test_a_reused_pid_is_never_killed(bystanders: list[subprocess.Popen[bytes]]) -> None:
    pid, start = _bystander(bystanders)
    # A record of an older process that had the same pid (and so the same group id).
    assert kill_group_if_ours(ProcessRecord(pid=pid, pgid=pid, start_time=start - 30)) is False
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    # The right start time is proof: then the group is ours and ends.
    assert kill_group_if_ours(ProcessRecord(pid=pid, pgid=pid, start_time=start), grace=2) is True
    bystanders[0].wait(timeout=10)


def test_lease_of_a_reused_owner_pid_is_stale_and_its_server_record_kills_nothing(
    workspace: Path, config: e2e_infra.Config, bystanders: list[subprocess.Popen[bytes]]
) -> None:
    owner_pid, owner_start = _bystander(bystanders)
    server_pid, server_start = _bystander(bystanders)
    owner = Owner(pid=owner_pid, start_time=owner_start - 60, host=config.host_id, run_id="reused")
    registry = e2e_infra.make_registry(config)
    with registry.transaction() as txn:
        lease = txn.add(
            Lease(
                kind="server",
                resource=f"reused/web/{server_pid}",
                project="reused",
                owner=owner,
                data={
                    "name": "web",
                    "pid": server_pid,
                    "pgid": server_pid,
                    "start_time": server_start - 60,
                },
            )
        )
        txn.add(Lease(kind="port", resource="18190", project="reused", owner=owner, data={}))
        assert txn.stale_reason(lease) == f"owner pid {owner_pid} was reused by another process"

    proc = invoke(workspace, "e2e.cleanup", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert [row["resource"] for row in report["servers"]] == ["reused/web"]
    assert "its processes were already gone" in report["servers"][0]["reason"]
    assert [row["resource"] for row in report["ports"]] == ["18190 (reused)"]
    # Neither the process that now has the owner's pid nor the one with the server's pid was hit.
    for proc_ in bystanders:
        assert proc_.poll() is None
    assert Leftovers(config).leases("reused") == []
