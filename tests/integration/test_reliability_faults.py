"""Fault tests: PostgreSQL stops, a lock holder dies, foreign processes squat ports, servers hang.

Real processes, real sockets, real PostgreSQL; ports 18200-18399. Each test says what broke, and
checks what the tool did (a clear error within a deadline, or it worked around the fault) and that
nothing was left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from support.cli import CLI, Cli, clean_environ, config_environ
from support.configs import make_config, write_pyproject
from support.runs import project_folder

import e2e_infra
from e2e_infra.resources.leases import Owner, process_start_time
from e2e_infra.results.record import Result

pytestmark = pytest.mark.integration

# A foreign process: binds and listens on the ports given, says so, then waits to be killed.
SQUATTER = """\
import socket, sys, time
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    socks.append(s)
print("bound", flush=True)
time.sleep(600)
"""


@pytest.fixture
def foreign() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start foreign processes (squatters, lock holders); all are killed after the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the process is ready (or dies)
        assert line.strip() in {"bound", "locked"}, line
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def invoke(config_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(*args, env=config_environ(config_path, **env), timeout=120)


def nox(config_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.nox(*args, env=config_environ(config_path, **env), timeout=120)


def project_leases(config: e2e_infra.Config) -> list[e2e_infra.Lease]:
    return [x for x in e2e_infra.make_registry(config).snapshot() if x.project != "postgres"]


def e2e_databases(admin: e2e_infra.ConnInfo, base: str) -> list[str]:
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (base + "\\_%",)
        ).fetchall()
    return sorted(row[0] for row in rows)


# --- PostgreSQL goes away -------------------------------------------------------------------------


def test_postgres_stopped_mid_migration_fails_fast_and_leaves_nothing_half_made(
    tmp_path: Path, new_cluster: Callable[..., e2e_infra.LocalCluster], cli: Cli
) -> None:
    cluster = new_cluster(make_config(tmp_path / "pg", port_range="18200-18209"))
    admin = cluster.tcp_conninfo()
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_slow.sql").write_text("CREATE TABLE t (a int);\nSELECT pg_sleep(60);\n")
    (tmp_path / "seeds" / "default").mkdir(parents=True)
    (tmp_path / "seeds" / "default" / "0001.sql").write_text("INSERT INTO t VALUES (1);\n")
    path = write_pyproject(
        tmp_path / "run",
        port_range="18210-18229",
        migrations_dir=migrations,
        seeds_dir=tmp_path / "seeds",
        projects={"pgdown": {"command": "{python} -c 'pass'", "servers": [], "cwd": str(tmp_path)}},
    )
    config = e2e_infra.load_config(path, environ=clean_environ())
    argv = cli.nox_argv("-s", "e2e-pgdown")
    env = config_environ(path, E2E_ADMIN_DATABASE_URL=admin.url)
    with (tmp_path / "nox.out").open("w") as out:
        proc = cli.popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def migrating() -> bool:
            with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                    "AND pid <> pg_backend_pid()"
                ).fetchone()
            assert proc.poll() is None, (tmp_path / "nox.out").read_text()
            return row is not None and row[0] > 0

        e2e_infra.wait_until(migrating, timeout=60, what="the migration to be running")
        stopped = time.monotonic()
        cluster.stop()
        returncode = proc.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (tmp_path / "nox.out").read_text()
    assert returncode != 0 and took < 20, output
    record = json.loads((project_folder(config.results_dir, "pgdown") / "run.json").read_text())
    assert record["result"] == "error"
    assert "0001_slow.sql" in record["error"] or "cannot connect" in record["error"], record
    assert "Traceback" not in output
    assert admin.password and admin.password not in output + json.dumps(record)
    # With the server gone nobody could tell whether the half-built template exists, so only
    # the builder's lease is left, as the proof cleanup needs to drop it: a stale one.
    left = project_leases(config)
    assert {lease.kind for lease in left} <= {"building"}
    with e2e_infra.make_registry(config).transaction() as txn:
        assert all(txn.stale_reason(lease) for lease in left)
    # Back up: the half-built template was never published, and cleanup sweeps what is left.
    cluster.ensure_running()
    assert not [name for name in e2e_databases(admin, "e2e_db") if "_tpl_" in name]
    cleaned = invoke(path, "e2e.cleanup", E2E_ADMIN_DATABASE_URL=admin.url)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert e2e_databases(admin, "e2e_db") == []
    assert project_leases(config) == []


def test_postgres_stopped_during_the_suite_fails_release_clearly_then_cleanup_drops_it(
    tmp_path: Path, new_cluster: Callable[..., e2e_infra.LocalCluster], cli: Cli
) -> None:
    cluster = new_cluster(make_config(tmp_path / "pg", port_range="18230-18239"))
    admin = cluster.tcp_conninfo()
    stop_file = tmp_path / "stop-now"
    go_file = tmp_path / "go"
    suite = (
        f"import pathlib, time; pathlib.Path({str(stop_file)!r}).touch()\n"
        "deadline = time.monotonic() + 60\n"
        f"while not pathlib.Path({str(go_file)!r}).exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
    )
    (tmp_path / "suite.py").write_text(suite)
    path = write_pyproject(
        tmp_path / "run",
        port_range="18240-18259",
        projects={
            "pgaway": {
                "command": f"{{python}} {tmp_path / 'suite.py'}",
                "servers": [],
                "seed": "auth_only",
                "cwd": str(tmp_path),
            }
        },
    )
    config = e2e_infra.load_config(path, environ=clean_environ())
    argv = cli.nox_argv("-s", "e2e-pgaway")
    env = config_environ(path, E2E_ADMIN_DATABASE_URL=admin.url)
    with (tmp_path / "nox.out").open("w") as out:
        proc = cli.popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        e2e_infra.wait_until(
            lambda: stop_file.exists() or proc.poll() is not None,
            timeout=60,
            what="the suite to start",
        )
        (dbname,) = [x for x in e2e_databases(admin, "e2e_db") if x.startswith("e2e_db_pgaway")]
        cluster.stop()
        go_file.touch()
        stopped = time.monotonic()
        returncode = proc.wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (tmp_path / "nox.out").read_text()
    assert returncode != 0 and took < 20, output
    record = json.loads((project_folder(config.results_dir, "pgaway") / "run.json").read_text())
    assert record["result"] == "error"
    assert f"database {dbname}" in record["error"] and "cannot connect" in record["error"]
    assert "Traceback" not in output and admin.password not in output + json.dumps(record)
    # Ports released, the database lease kept: the database still exists on the stopped server.
    assert [(x.kind, x.resource) for x in project_leases(config)] == [("database", dbname)]
    cluster.ensure_running()
    cleaned = invoke(path, "e2e.cleanup", "--json", E2E_ADMIN_DATABASE_URL=admin.url)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert [row["resource"] for row in json.loads(cleaned.stdout)["databases"]] == [dbname]
    assert [x for x in e2e_databases(admin, "e2e_db") if "_tpl_" not in x] == []
    assert project_leases(config) == []


# --- the registry lock ----------------------------------------------------------------------------

LOCK_HOLDER = """\
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_held_by_a_process_that_is_then_sigkilled_lets_the_next_caller_proceed(
    tmp_path: Path, foreign: Callable[..., subprocess.Popen[str]]
) -> None:
    config = make_config(tmp_path, port_range="18260-18269", lock_timeout=0.5)
    registry = e2e_infra.make_registry(config)
    registry.snapshot()  # creates the state folder
    holder = foreign(LOCK_HOLDER, str(registry.lock_path))
    started = time.monotonic()
    with pytest.raises(e2e_infra.LockTimeoutError) as caught:
        registry.snapshot()
    assert time.monotonic() - started < 3
    assert str(registry.lock_path) in str(caught.value) and "E2E_LOCK_TIMEOUT" in str(caught.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    ports = e2e_infra.PortAllocator.from_config(config, registry)
    got = ports.allocate("afterlock", ["backend"], Owner.current())
    assert time.monotonic() - started < 1
    assert got["backend"] in config.port_range
    ports.release("afterlock")


# --- ports ---------------------------------------------------------------------------------------


def test_foreign_squatters_without_a_lease_are_skipped(
    tmp_path: Path, foreign: Callable[..., subprocess.Popen[str]]
) -> None:
    config = make_config(tmp_path, port_range="18270-18275")
    squatted = [18270, 18272, 18273, 18275]
    foreign(SQUATTER, *map(str, squatted))
    ports = e2e_infra.PortAllocator.from_config(config, e2e_infra.make_registry(config))
    got = ports.allocate("squatted", ["backend", "frontend"], Owner.current())
    assert sorted(got.values()) == [18271, 18274]
    ports.release("squatted")


def test_full_port_range_error_says_who_holds_what(
    tmp_path: Path, foreign: Callable[..., subprocess.Popen[str]]
) -> None:
    path = write_pyproject(tmp_path, port_range="18280-18283")
    config = e2e_infra.load_config(path, environ=clean_environ())
    ports = e2e_infra.PortAllocator.from_config(config, e2e_infra.make_registry(config))
    ports.allocate("holder", ["backend", "frontend"], Owner.current())
    foreign(SQUATTER, "18280", "18281", "18282", "18283")  # binds what the lease left free
    proc = invoke(path, "ports.allocate", "--project", "latecomer")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "no free port for project 'latecomer' in 18280-18283" in line
    assert "2 of 4 ports are leased by live owners (holder: 2)" in line
    assert "2 are taken by other processes" in line
    ports.release("holder")


def test_port_taken_between_allocation_and_server_start_restarts_the_server_on_a_new_port(
    tmp_path: Path, foreign: Callable[..., subprocess.Popen[str]]
) -> None:
    config = make_config(
        tmp_path,
        port_range="18290-18309",
        servers={
            "web": {
                "command": "{python} -m http.server {port} --bind 127.0.0.1",
                "cwd": str(tmp_path),
                "port": "backend",
                "health": "http://127.0.0.1:{port}/",
                "startup_timeout": 20,
                "stop_timeout": 3,
            }
        },
        projects={
            "raced": {
                "command": "{python} -c 'pass'",
                "servers": ["web"],
                "database": False,
                "cwd": str(tmp_path),
            }
        },
    )
    taken: list[int] = []

    def on_phase(_project: str, phase: str) -> None:
        # Between allocation and the first start: a foreign process takes the server's port.
        if phase == "servers" and not taken:
            taken.append(session.result.ports["backend"])
            foreign(SQUATTER, str(taken[0]))

    session = e2e_infra.ProjectSession(config, "raced", on_phase=on_phase)
    with session as env:
        assert env.ports["backend"] != taken[0]
        assert session.run_suite() == 0
    assert session.result.result is Result.PASSED
    assert session.result.ports["backend"] != taken[0]
    assert (
        "Address already in use"
        in (project_folder(config.results_dir, "raced") / "web.log").read_text()
    )
    assert project_leases(config) == []


def test_a_server_that_hangs_before_healthy_and_ignores_sigterm_is_killed_within_the_deadline(
    tmp_path: Path,
) -> None:
    hang = (
        "{python} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        'print("hanging", flush=True); time.sleep(300)\''
    )
    config = make_config(
        tmp_path,
        port_range="18310-18329",
        servers={
            "stuck": {
                "command": hang,
                "cwd": str(tmp_path),
                "port": "backend",
                "health": "http://127.0.0.1:{port}/health",
                "startup_timeout": 1.5,
                "stop_timeout": 1,
            }
        },
        projects={
            "hung": {
                "command": "{python} -c 'pass'",
                "servers": ["stuck"],
                "database": False,
                "cwd": str(tmp_path),
            }
        },
    )
    session = e2e_infra.ProjectSession(config, "hung")
    started = time.monotonic()
    with pytest.raises(e2e_infra.ServerStartTimeoutError) as caught, session:
        pytest.fail("the session should not start")
    took = time.monotonic() - started
    assert took < 1.5 + 1 + 5, took
    message = str(caught.value)
    assert "server stuck did not become healthy within 1.5s" in message
    assert "hanging" in caught.value.log_tail
    assert session.result.result is Result.ERROR and "stuck" in (session.result.error or "")
    assert project_leases(config) == []
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if "hanging" in " ".join(p.info["cmdline"] or []) and process_start_time(p.pid) is not None
    ]
    assert os.path.exists(project_folder(config.results_dir, "hung") / "run.json")


# --- the registry deleted mid-run -----------------------------------------------------------------


def test_a_registry_deleted_mid_run_still_drops_the_runs_database(
    tmp_path: Path, new_cluster: Callable[..., e2e_infra.LocalCluster]
) -> None:
    """The state folder vanishes while the suite runs (rm -rf, a test runner wiping its folder):
    the session releases what it holds from memory and says so once."""
    cluster = new_cluster(make_config(tmp_path / "pg", port_range="18230-18239"))
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001.sql").write_text("CREATE TABLE t (a int);\n")
    (tmp_path / "seeds" / "default").mkdir(parents=True)
    (tmp_path / "seeds" / "default" / "0001.sql").write_text("INSERT INTO t VALUES (1);\n")
    suite = "import shutil, sys; shutil.rmtree(sys.argv[1])"
    path = write_pyproject(
        tmp_path / "run",
        port_range="18240-18259",
        migrations_dir=migrations,
        seeds_dir=tmp_path / "seeds",
        projects={
            "wiped": {
                "command": f"{{python}} -c '{suite}' {tmp_path / 'run' / 'state'}",
                "servers": [],
            }
        },
    )
    config = e2e_infra.load_config(path, environ=clean_environ())
    admin = cluster.tcp_conninfo()
    proc = nox(path, "-s", "e2e-wiped", E2E_ADMIN_DATABASE_URL=admin.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert output.count("disappeared during the run") == 1
    record = json.loads((project_folder(config.results_dir, "wiped") / "run.json").read_text())
    assert record["result"] == "passed" and record["database"]
    assert record["database"] not in e2e_databases(admin, config.database.name_base)
    assert project_leases(config) == []


def test_an_interrupt_in_the_middle_of_the_clone_leaves_no_database_and_no_lease(
    tmp_path: Path,
    new_cluster: Callable[..., e2e_infra.LocalCluster],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGINT lands while the database is being cloned (the lease reserved, CREATE sent): the
    allocation never hands a database back, and the session's release still drops what was
    leased for it, at once, not when its process is gone."""
    from e2e_infra.databases.clones import Cloner

    cluster = new_cluster(make_config(tmp_path / "pg", port_range="18280-18289"))
    path = write_pyproject(
        tmp_path / "run",
        port_range="18290-18299",
        projects={"cut": {"command": "{python} -c pass", "servers": []}},
    )
    admin = cluster.tcp_conninfo()
    config = e2e_infra.load_config(
        path, environ=clean_environ({"E2E_ADMIN_DATABASE_URL": admin.url})
    )
    real_clone = Cloner.clone

    def interrupted(self: Cloner, *args: object, **kwargs: object) -> object:
        real_clone(self, *args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGINT)  # the session's handler raises it here
        time.sleep(1)
        raise AssertionError("the interrupt never came")

    monkeypatch.setattr(Cloner, "clone", interrupted)
    with pytest.raises(e2e_infra.Interrupted):
        e2e_infra.run_project(config, "cut")
    assert project_leases(config) == []
    left = e2e_databases(admin, config.database.name_base)
    assert [name for name in left if "_tpl_" not in name] == [], left  # the template stays
