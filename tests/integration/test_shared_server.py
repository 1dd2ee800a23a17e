"""Several hosts on one shared server: host-tagged names, liveness by advisory lock, and a cleanup
that leaves another host's live databases alone but drops those of a host that died.

Two "hosts" are two processes with their own config (state folder, ``host_id``) and the same
``admin_url``: the session cluster's TCP URL with its password.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support import REPO_ROOT
from support.cli import clean_environ
from support.clusters import PgCluster
from support.configs import make_config
from support.databases import DB_FIXTURES, drop_databases, marked_databases

from e2e_infra.config import Config
from e2e_infra.databases import DatabaseAllocator, host_tag
from e2e_infra.databases.names import name_key
from e2e_infra.databases.shared import DEATH_GRACE
from e2e_infra.errors import DatabaseError, DatabaseLimitError
from e2e_infra.resources.leases import Owner
from e2e_infra.run.workspace import make_registry
from e2e_infra.testing import FakeClock

pytestmark = pytest.mark.integration


HOST = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    print("ready", flush=True)
    sys.stdin.readline()  # go
    owner = e2e_infra.Owner.current(host=config.host_id)
    names = [allocator.allocate(project, owner).name for project in sys.argv[2:]]
    print(json.dumps(names), flush=True)
    sys.stdin.readline()  # release
    allocator.release_all()
    allocator.close()
    """
)


def server_databases(pg: PgCluster, prefix: str) -> dict[str, dict[str, Any] | None]:
    return marked_databases(pg.admin, prefix)


def holders(pg: PgCluster) -> list[str]:
    with psycopg.connect(pg.admin.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE starts_with(application_name, 'e2e-infra hold ')"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.fixture
def base(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh name base; every database of it is dropped afterwards."""
    name = f"s{uuid.uuid4().hex[:8]}"
    yield name
    drop_databases(pg_cluster.admin, name + "_")


def host_config(tmp_path: Path, pg: PgCluster, base: str, host: str, **extra: Any) -> Config:
    return make_config(
        tmp_path / host,
        admin_url=pg.tcp.url,
        host_id=host,
        name_base=base,
        **{
            "migrations_dir": DB_FIXTURES / "migrations",
            "seeds_dir": DB_FIXTURES / "seeds",
            **extra,
        },
    )


class Host:
    """One host: a process that allocates projects when told, and releases when told."""

    def __init__(self, config_path: Path, projects: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOST, str(config_path), *projects],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=clean_environ({"PYTHONPATH": str(REPO_ROOT)}),
            text=True,
            cwd=REPO_ROOT,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def test_two_hosts_allocate_apart_and_cleanup_drops_only_the_dead_hosts_databases(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    config_a = host_config(tmp_path, pg_cluster, base, "host-a")
    config_b = host_config(tmp_path, pg_cluster, base, "host-b")
    assert config_a.state_dir != config_b.state_dir
    projects = ["alpha", "beta"]
    hosts = {
        key: Host(_source(config), projects)
        for key, config in (("host-a", config_a), ("host-b", config_b))
    }
    try:
        for host in hosts.values():  # both at once: same projects, same template to build
            host.tell("go")
        names = {key: json.loads(host.readline()) for key, host in hosts.items()}
        a_names, b_names = names["host-a"], names["host-b"]
        assert a_names == [f"{base}_{p}_{host_tag('host-a')}" for p in projects]
        assert b_names == [f"{base}_{p}_{host_tag('host-b')}" for p in projects]
        present = server_databases(pg_cluster, base + "_")
        for key, own in names.items():
            for name in own:
                marker = present[name]
                assert marker is not None
                assert (marker["kind"], marker["host"], marker["hold"]) == ("database", key, True)
        assert sorted(holders(pg_cluster)) == sorted(
            f"e2e-infra hold {name} {hosts[key].proc.pid}"[:63]
            for key, own in names.items()
            for name in own
        )

        allocator_a = _allocator(config_a)
        assert allocator_a.cleanup() == []  # B holds its locks; A's owner is alive here
        infos = {info.name: info for info in allocator_a.list()}
        assert infos[b_names[0]].status == "live (host host-b holds its lock)"

        hosts["host-b"].proc.send_signal(signal.SIGKILL)
        hosts["host-b"].proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(h.endswith(f" {hosts['host-b'].proc.pid}") for h in holders(pg_cluster)):
            assert time.monotonic() < deadline, "the server kept the dead host's connections"
            time.sleep(0.02)

        dropped = dict(allocator_a.cleanup())
        assert sorted(dropped) == sorted(b_names)
        assert all("host host-b" in why for why in dropped.values())
        present = server_databases(pg_cluster, base + "_")
        assert set(a_names) <= set(present) and not set(b_names) & set(present)

        hosts["host-a"].tell("release")
        assert hosts["host-a"].proc.wait(timeout=30) == 0
        assert not set(a_names) & set(server_databases(pg_cluster, base + "_"))
        assert holders(pg_cluster) == []
    finally:
        for host in hosts.values():
            host.stop()


def test_a_command_allocation_lives_until_its_renewable_expiry_on_every_host(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    shell = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        clock = FakeClock(start=0.0, wall=time.time())
        config_c = host_config(tmp_path, pg_cluster, base, "host-c", lease_ttl=60)
        allocator_c = _allocator(config_c, clock=clock)
        # `invoke db.allocate` records its parent as the owner: not this process.
        owner = Owner.of_pid(shell.pid, host="host-c", run_id="cli")
        got = allocator_c.allocate("alpha", owner)
        marker = server_databases(pg_cluster, got.name)[got.name]
        assert marker is not None and marker["hold"] is False
        assert marker["expires"] == pytest.approx(clock.time() + 60)
        assert holders(pg_cluster) == []

        config_a = host_config(tmp_path, pg_cluster, base, "host-a")
        allocator_a = _allocator(config_a, clock=clock)
        assert allocator_a.cleanup() == []
        assert {i.name: i.status for i in allocator_a.list()}[got.name].startswith(
            "live (host host-c allocated by a command, until "
        )
        clock.advance(50)
        assert allocator_c.renew("alpha") == [got.name]  # `invoke db.renew`
        clock.advance(50)  # past the first expiry, within the renewed one
        assert allocator_a.cleanup() == []
        clock.advance(11)
        dropped = dict(allocator_a.cleanup())
        assert list(dropped) == [got.name] and "not renewed" in dropped[got.name]
    finally:
        shell.kill()
        shell.wait()


# --- proof of life that survives connection loss --------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import psycopg
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    got = allocator.allocate(sys.argv[2], e2e_infra.Owner.current(host=config.host_id))
    print(json.dumps({"name": got.name}), flush=True)
    stop, ok, failed = Path(sys.argv[3]), 0, 0
    deadline = time.monotonic() + 120
    while not stop.exists() and time.monotonic() < deadline:  # a suite: one query at a time
        try:
            with psycopg.connect(got.url.conninfo(), connect_timeout=5) as conn:
                conn.execute("SELECT count(*) FROM notes").fetchone()
            ok += 1
        except psycopg.Error:
            failed += 1
        time.sleep(0.1)
    lost, retakes = allocator.holds.lost, allocator.holds.retakes
    allocator.release_all()
    allocator.close()
    print(json.dumps({"ok": ok, "failed": failed, "lost": lost, "retakes": retakes}), flush=True)
    """
)


class Holder:
    """A suite-like owner: allocates, queries its database until told to stop, reports."""

    def __init__(self, config: Config, project: str, stop: Path, prefix: tuple[str, ...] = ()):
        self.stop = stop
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", HOLDER, str(_source(config)), project, str(stop)],
            stdout=subprocess.PIPE,
            env=clean_environ({"PYTHONPATH": str(REPO_ROOT)}),
            text=True,
            cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        self.name = json.loads(self.proc.stdout.readline())["name"]

    def finish(self) -> dict[str, Any]:
        self.stop.touch()
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


def end_advisory_lock_holders(pg: PgCluster) -> int:
    """What a restart, a failover or a proxy does: end every session holding an advisory lock."""
    with psycopg.connect(pg.admin.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT pid FROM pg_locks "
            "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()) p"
        ).fetchall()
    return len(rows)


def test_a_hold_lost_with_its_connection_is_taken_again_and_cleanup_elsewhere_keeps_the_database(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    config_a = host_config(tmp_path, pg_cluster, base, "host-a")
    config_b = host_config(tmp_path, pg_cluster, base, "host-b")
    holder = Holder(config_a, "alpha", tmp_path / "stop")
    try:
        allocator_b = _allocator(config_b)
        for _ in range(3):
            assert end_advisory_lock_holders(pg_cluster) >= 1
            assert allocator_b.cleanup() == []  # judged twice across the grace: re-taken
            assert holder.name in server_databases(pg_cluster, holder.name)
        assert any(h.startswith(f"e2e-infra hold {holder.name}") for h in holders(pg_cluster))
        result = holder.finish()
    finally:
        holder.kill()
    assert result["failed"] == 0 and result["ok"] > 10
    assert result["lost"] == {} and result["retakes"] >= 3


def test_a_hold_that_cannot_be_taken_again_in_time_fails_the_run_naming_why(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    config = host_config(tmp_path, pg_cluster, base, "host-a")
    allocator = _allocator(config)
    allocator.holds.retake_timeout = 1.0
    allocator.holds.interval = 3.0  # time for the blocker below to take the key first
    lost: list[tuple[str, str]] = []
    allocator.holds.on_lost = lambda name, why: lost.append((name, why))
    got = allocator.allocate("alpha", Owner.current(host="host-a"))
    with psycopg.connect(pg_cluster.admin.conninfo(), autocommit=True) as blocker:
        # A cleanup that judged it dead takes the key exclusively: the owner cannot re-take it.
        end_advisory_lock_holders(pg_cluster)
        key = name_key(got.name)
        deadline = time.monotonic() + 2
        while blocker.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() != (True,):
            assert time.monotonic() < deadline, "the ended session kept its lock"
            time.sleep(0.01)
        deadline = time.monotonic() + 15
        while not lost:
            assert time.monotonic() < deadline, "the loss was never reported"
            time.sleep(0.1)
    assert lost[0][0] == got.name and "within 1s" in lost[0][1]
    with pytest.raises(DatabaseError, match=f"lost the proof of life of database {got.name}"):
        allocator.check_holds()
    allocator.release_all()
    allocator.close()


def end_holds_of(pg: PgCluster, name: str) -> None:
    """A proxy cutting an idle connection: end the hold connection of ``name``, wait it out."""
    pattern = f"e2e-infra hold {name} %"
    with psycopg.connect(pg.admin.conninfo(), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
            (pattern,),
        )
        deadline = time.monotonic() + 5
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (pattern,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the hold connection outlived its termination"
            time.sleep(0.02)


def test_an_owner_that_takes_its_lock_again_during_the_grace_keeps_its_database_if_lost_again(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    """The hold is cut (B's cleanup finds the key free), re-taken within the grace, and cut
    again before B judges a second time: free at both looks, yet the owner lives. B must see
    the re-take (it holds the key through the grace; the owner's request waits in the queue)."""
    allocator_a = _allocator(host_config(tmp_path, pg_cluster, base, "host-a"))
    allocator_a.holds.interval = 3600.0  # the test plays the watcher's passes
    got = allocator_a.allocate("alpha", Owner.current(host="host-a"))
    allocator_b = _allocator(host_config(tmp_path, pg_cluster, base, "host-b"))
    end_holds_of(pg_cluster, got.name)
    result: dict[str, Any] = {}
    cleaner = threading.Thread(
        target=lambda: result.update(dropped=allocator_b.sweeper.cleanup(grace=3.0))
    )
    cleaner.start()
    try:
        time.sleep(1.0)  # B's first look found the key free
        allocator_a.holds.watch_once()  # A's watcher takes it again, within the grace
        assert allocator_a.holds.retakes == 1 and allocator_a.holds.lost == {}
        end_holds_of(pg_cluster, got.name)  # and loses it again before B's second look
    finally:
        cleaner.join(30)
    assert result["dropped"] == []
    assert got.name in server_databases(pg_cluster, got.name)
    allocator_a.release_all()
    allocator_a.close()
    allocator_b.close()


def test_cleanup_never_drops_a_database_a_session_is_connected_to(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    clock = FakeClock(start=0.0, wall=time.time())
    config_a = host_config(tmp_path, pg_cluster, base, "host-a")
    allocator_a = _allocator(config_a)
    got = allocator_a.allocate("alpha", Owner.current(host="host-a"))
    allocator_a.holds.release_all()  # the lock is gone, as if its owner had died
    allocator_b = _allocator(host_config(tmp_path, pg_cluster, base, "host-b"), clock=clock)
    infos = {info.name: info.status for info in allocator_b.list()}
    assert infos[got.name].startswith("unlocked: its owner on host host-a holds no lock")
    with psycopg.connect(got.url.conninfo()) as conn:
        conn.execute("SELECT 1")
        assert allocator_b.cleanup() == []  # unlocked twice, but in use
        assert got.name in server_databases(pg_cluster, got.name)
    dropped = dict(allocator_b.cleanup())
    assert list(dropped) == [got.name] and "holds no lock" in dropped[got.name]
    assert allocator_b.cleanup() == []  # reports only what it really dropped
    allocator_a.close()


# --- one host id, two pid namespaces --------------------------------------------------------------

CLEANUP = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    print(json.dumps({"pid": os.getpid(), "dropped": allocator.cleanup()}), flush=True)
    allocator.close()
    """
)

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc")


def test_another_pid_namespace_with_the_same_host_id_keeps_and_never_reuses_a_live_database(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    assert shutil.which("unshare") and os.geteuid() == 0, "needs unshare as root"
    config_a = host_config(tmp_path, pg_cluster, base, "ci-runner")
    config_b = host_config(tmp_path / "checkout-b", pg_cluster, base, "ci-runner")
    a = Holder(config_a, "alpha", tmp_path / "stop-a")
    b: Holder | None = None
    try:
        out = subprocess.run(
            [*UNSHARE, sys.executable, "-c", CLEANUP, str(_source(config_b))],
            capture_output=True,
            text=True,
            env=clean_environ({"PYTHONPATH": str(REPO_ROOT)}),
            cwd=REPO_ROOT,
            timeout=120,
            check=True,
        )
        report = json.loads(out.stdout)
        assert report["pid"] == 1  # really another pid namespace: A's pid means nothing there
        assert report["dropped"] == []
        b = Holder(config_b, "alpha", tmp_path / "stop-b", prefix=UNSHARE)
        assert b.name != a.name  # A's name is in use by a live owner: never dropped to reuse
        present = server_databases(pg_cluster, base + "_")
        assert a.name in present and b.name in present
        result_b, result_a = b.finish(), a.finish()
    finally:
        for holder in (a, b):
            if holder is not None:
                holder.kill()
    for result in (result_a, result_b):
        assert result["failed"] == 0 and result["lost"] == {}


BUILDER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    print(allocator.ensure_template("default"), flush=True)
    allocator.close()
    """
)

TIMED_CLEANUP = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    started = time.monotonic()
    dropped = allocator.cleanup()
    seconds = time.monotonic() - started
    statuses = {info.name: info.status for info in allocator.list()}
    print(json.dumps({"pid": os.getpid(), "dropped": dropped, "seconds": seconds,
                      "statuses": statuses}), flush=True)
    allocator.close()
    """
)


def test_a_template_being_built_is_judged_by_its_build_lock_not_by_a_pid_in_another_namespace(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    """Host A builds a template (held mid-build by a migration that waits); host B, same
    ``host_id``, another pid namespace, cleans up: A's pid means nothing there, so only the build
    lock decides. While A lives, B keeps it; once A is SIGKILLed, B drops it after two looks."""
    assert shutil.which("unshare") and os.geteuid() == 0, "needs unshare as root"
    migrations = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    barrier = f"{base}_barrier"  # a role: pg_roles is seen from every database
    (migrations / "0003_wait.sql").write_text(
        "DO $$ BEGIN WHILE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
        f"'{barrier}') LOOP PERFORM pg_sleep(0.05); END LOOP; END $$;\n"
    )
    config_a = host_config(tmp_path / "a", pg_cluster, base, "ci-runner", migrations_dir=migrations)
    config_b = host_config(tmp_path / "b", pg_cluster, base, "ci-runner", migrations_dir=migrations)
    env = clean_environ({"PYTHONPATH": str(REPO_ROOT)})

    def cleanup_b() -> dict[str, Any]:
        out = subprocess.run(
            [*UNSHARE, sys.executable, "-c", TIMED_CLEANUP, str(_source(config_b))],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=120,
            check=True,
        )
        report: dict[str, Any] = json.loads(out.stdout)
        assert report["pid"] == 1  # really another pid namespace: A's pid is dead-looking there
        return report

    def building() -> list[str]:
        return [
            name
            for name, marker in server_databases(pg_cluster, base + "_").items()
            if marker is not None and marker["kind"] == "building"
        ]

    with psycopg.connect(pg_cluster.admin.conninfo(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(barrier)))
        a = subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(_source(config_a))],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not building():
                assert a.poll() is None and time.monotonic() < deadline, "A never started building"
                time.sleep(0.05)
            [half_built] = building()
            assert server_databases(pg_cluster, half_built)[half_built]["host"] == "ci-runner"

            report = cleanup_b()  # A builds: its build lock is held
            assert report["dropped"] == []
            assert report["statuses"][half_built] == "building"
            assert building() == [half_built] and a.poll() is None

            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            report = cleanup_b()  # A is gone: its build lock is free, twice across the grace
            assert [name for name, _ in report["dropped"]] == [half_built]
            assert "build lock" in report["dropped"][0][1]
            assert report["seconds"] >= DEATH_GRACE  # the second look came after the grace
            assert building() == []
        finally:
            if a.poll() is None:
                a.kill()
            a.communicate(timeout=10)
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(barrier)))


# --- branches: templates by last use, per fingerprint ---------------------------------------------


def templates_on(pg: PgCluster, base: str) -> dict[str, int]:
    with psycopg.connect(pg.admin.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, oid FROM pg_database WHERE starts_with(datname, %s)", (base + "_tpl_",)
        ).fetchall()
    return {str(name): int(oid) for name, oid in rows}


def test_three_branches_at_once_build_each_template_once_and_every_allocation_succeeds(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    configs = []
    for branch in range(3):
        migrations = tmp_path / f"branch{branch}" / "migrations"
        shutil.copytree(DB_FIXTURES / "migrations", migrations)
        (migrations / "0009_branch.sql").write_text(f"CREATE TABLE branch_{branch} (id int);\n")
        configs.append(
            host_config(
                tmp_path / f"branch{branch}",
                pg_cluster,
                base,
                f"host-{branch}",
                migrations_dir=migrations,
            )
        )
    seen: dict[str, int] = {}
    for _round in range(3):
        hosts = [Host(_source(config), ["alpha", "beta"]) for config in configs]
        try:
            for host in hosts:
                host.tell("go")
            names = [json.loads(host.readline()) for host in hosts]
            assert all(len(got) == 2 for got in names)  # no allocation failed
            for host in hosts:
                host.tell("release")
            assert [host.proc.wait(timeout=60) for host in hosts] == [0, 0, 0]
        finally:
            for host in hosts:
                host.stop()
        now = templates_on(pg_cluster, base)
        assert len(now) == 3  # one per fingerprint, none pruned (keep_templates = 2 per seed)
        assert all(seen.get(name, oid) == oid for name, oid in now.items())  # never rebuilt
        seen.update(now)


# --- caps -----------------------------------------------------------------------------------------

ALLOCATE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    sys.stdin.readline()  # go
    try:
        got = allocator.allocate(sys.argv[2], e2e_infra.Owner.current(host=config.host_id))
        print(json.dumps({"name": got.name}), flush=True)
    except e2e_infra.E2EInfraError as exc:
        print(json.dumps({"error": type(exc).__name__}), flush=True)
    sys.stdin.readline()  # release
    allocator.release_all()
    allocator.close()
    """
)


def test_max_databases_counts_this_hosts_databases_and_holds_under_concurrency(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    config = host_config(tmp_path, pg_cluster, base, "host-a", max_databases=3)
    other = _allocator(host_config(tmp_path, pg_cluster, base, "host-b", max_databases=3))
    for project in ("x1", "x2", "x3"):  # another host's databases do not count here
        other.allocate(project, Owner.current(host="host-b"))
    _allocator(config).ensure_template("default")
    env = clean_environ({"PYTHONPATH": str(REPO_ROOT)})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ALLOCATE, str(_source(config)), f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for i in range(6)
    ]
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            results.append(json.loads(proc.stdout.readline()))
        got = [r["name"] for r in results if "name" in r]
        assert len(got) == 3  # six at once, a cap of three: exactly three
        assert [r["error"] for r in results if "error" in r] == ["DatabaseLimitError"] * 3
    finally:
        for proc in procs:
            proc.communicate("release\n", timeout=60)
    other.release_all()
    other.close()


def test_the_server_cap_sweeps_a_dead_hosts_databases_before_refusing(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    config_d = host_config(tmp_path, pg_cluster, base, "host-d")
    dead = Host(_source(config_d), ["alpha", "beta"])
    try:
        dead.tell("go")
        names = json.loads(dead.readline())
    finally:
        dead.stop()  # SIGKILL: its databases stay, its locks end with its connections
    deadline = time.monotonic() + 10
    while any(h.endswith(f" {dead.proc.pid}") for h in holders(pg_cluster)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    clock = FakeClock(start=0.0, wall=time.time())
    config_a = host_config(tmp_path, pg_cluster, base, "host-a", server_max_databases=2)
    allocator_a = _allocator(config_a, clock=clock)
    got = allocator_a.allocate("alpha", Owner.current(host="host-a"))  # swept, then allocated
    present = server_databases(pg_cluster, base + "_")
    assert got.name in present and not set(names) & set(present)
    allocator_a.allocate("beta", Owner.current(host="host-a"))
    with pytest.raises(DatabaseLimitError, match="server_max_databases = 2"):
        allocator_a.allocate("gamma", Owner.current(host="host-a"))
    allocator_a.release_all()
    allocator_a.close()


def test_a_shared_server_hands_out_a_warm_spare_by_rename(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    config_a = host_config(tmp_path, pg_cluster, base, "host-a", spares=1)
    config_b = host_config(tmp_path, pg_cluster, base, "host-b", spares=1)
    allocator_a, allocator_b = _allocator(config_a), _allocator(config_b)
    first = allocator_a.allocate("alpha", Owner.current(host="host-a"))
    allocator_a.release("alpha")
    allocator_a.close()  # waits for the spare made after the release
    spares = [
        n for n, m in server_databases(pg_cluster, base + "_").items() if m and m["kind"] == "spare"
    ]
    assert len(spares) == 1
    oid = templates_on_oid(pg_cluster, spares[0])
    got = allocator_b.allocate("beta", Owner.current(host="host-b"))  # another host claims it
    assert templates_on_oid(pg_cluster, got.name) == oid  # the same database, renamed
    assert got.template == first.template
    allocator_b.release_all()
    allocator_b.close()


def templates_on_oid(pg: PgCluster, name: str) -> int | None:
    with psycopg.connect(pg.admin.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return None if row is None else int(row[0])


def _allocator(config: Config, clock: FakeClock | None = None) -> DatabaseAllocator:
    assert config.database.admin_url is not None
    return DatabaseAllocator(config, make_registry(config), config.database.admin_url, clock=clock)


def _source(config: Config) -> Path:
    assert config.source is not None  # the pyproject.toml make_config wrote
    return config.source
