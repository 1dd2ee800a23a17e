"""Several hosts on one shared server: host-tagged names, liveness by advisory lock, and a cleanup
that leaves another host's live databases alone but drops those of a host that died.

Two "hosts" are two processes with their own config (state folder, ``host_id``) and the same
``admin_url``: the session cluster's TCP URL with its password.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import (
    REPO_ROOT,
    PgCluster,
    clean_environ,
    drop_databases,
    make_config,
    make_registry,
    marked_databases,
)

from e2e_infra.config import Config
from e2e_infra.databases import DatabaseAllocator, host_tag
from e2e_infra.leases import Owner
from e2e_infra.testing import FakeClock

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "db"

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
        migrations_dir=FIXTURES / "migrations",
        seeds_dir=FIXTURES / "seeds",
        **extra,
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


def test_a_command_allocation_cannot_hold_a_lock_so_other_hosts_wait_for_the_lease_ttl(
    pg_cluster: PgCluster, base: str, tmp_path: Path
) -> None:
    shell = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        config_c = host_config(tmp_path, pg_cluster, base, "host-c")
        # `invoke db.allocate` records its parent as the owner: not this process.
        owner = Owner.of_pid(shell.pid, host="host-c", run_id="cli")
        got = _allocator(config_c).allocate("alpha", owner)
        marker = server_databases(pg_cluster, got.name)[got.name]
        assert marker is not None and marker["hold"] is False
        assert holders(pg_cluster) == []

        clock = FakeClock(start=0.0, wall=time.time())
        config_a = host_config(tmp_path, pg_cluster, base, "host-a", lease_ttl=60)
        allocator_a = _allocator(config_a, clock=clock)
        assert allocator_a.cleanup() == []
        assert {i.name: i.status for i in allocator_a.list()}[got.name] == (
            "live (host host-c allocated by a command)"
        )
        clock.advance(61)
        dropped = dict(allocator_a.cleanup())
        assert list(dropped) == [got.name] and "lease_ttl" in dropped[got.name]
    finally:
        shell.kill()
        shell.wait()


def _allocator(config: Config, clock: FakeClock | None = None) -> DatabaseAllocator:
    assert config.database.admin_url is not None
    return DatabaseAllocator(config, make_registry(config), config.database.admin_url, clock=clock)


def _source(config: Config) -> Path:
    assert config.source is not None  # the pyproject.toml make_config wrote
    return config.source
