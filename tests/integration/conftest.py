"""Fixtures of the integration tests: a real local cluster, databases, CLI runs and nox runs.

* ``pg_cluster`` (session) starts one embedded PostgreSQL cluster on ports 15400-15409 and stops
  it at the end; ``new_cluster`` (function) builds extra clusters that are stopped and removed
  after the test (:mod:`support.clusters` also cleans up after a test run that died).
* ``make_allocator`` builds DatabaseAllocators on the session cluster; ``db_invoke`` runs
  ``invoke db.*`` against it. Each uses name bases of its own, dropped after the test.
* ``reap`` ends the nox runs (:class:`support.runs.Nox`) a test left running.

Configs come from :mod:`support.configs` (a generated ``pyproject.toml`` under ``tmp_path``, never
the repository's own state folder).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import Cli, Invoke, config_environ
from support.clusters import PgCluster, running_cluster, sweep_leftover_clusters
from support.configs import PG_PORT_RANGE, make_config, write_pyproject
from support.databases import DB_FIXTURES, Factory, drop_databases
from support.runs import Nox

from e2e_infra.config import Config
from e2e_infra.databases import DatabaseAllocator
from e2e_infra.postgres import LocalCluster
from e2e_infra.run.workspace import make_registry
from e2e_infra.testing import FakeClock


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """One real local PostgreSQL cluster for the whole session (ports 15400-15409)."""
    sweep_leftover_clusters()
    config = make_config(tmp_path_factory.mktemp("pg_cluster"), port_range=PG_PORT_RANGE)
    with running_cluster(config) as cluster:
        yield PgCluster(
            admin=cluster.admin_conninfo(),
            tcp=cluster.tcp_conninfo(),
            config=config,
            registry=cluster.registry,
            ports=cluster.ports,
            cluster=cluster,
        )


@pytest.fixture
def new_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Factory: ``new_cluster(config, start=True)``; every cluster is stopped after the test."""
    with contextlib.ExitStack() as stack:

        def factory(config: Config, *, start: bool = True) -> LocalCluster:
            return stack.enter_context(running_cluster(config, start=start))

        yield factory


@pytest.fixture
def make_allocator(pg_cluster: PgCluster, tmp_path: Path) -> Iterator[Factory]:
    """Allocators with a fresh name base each, so tests sharing the cluster never meet; every
    database of those bases is dropped afterwards, marked or not."""
    bases: list[str] = []

    def factory(*, clock: FakeClock | None = None, **overrides: Any) -> DatabaseAllocator:
        base = overrides.pop("name_base", None) or f"t{uuid.uuid4().hex[:10]}"
        bases.append(base)
        overrides.setdefault("migrations_dir", DB_FIXTURES / "migrations")
        overrides.setdefault("seeds_dir", DB_FIXTURES / "seeds")
        config = make_config(tmp_path / base, name_base=base, **overrides)
        return DatabaseAllocator(
            config, make_registry(config), pg_cluster.admin, client=pg_cluster.tcp, clock=clock
        )

    yield factory
    for base in bases:
        drop_databases(pg_cluster.admin, base + "_")


@pytest.fixture
def db_invoke(pg_cluster: PgCluster, tmp_path: Path, cli: Cli) -> Iterator[Invoke]:
    """Run ``invoke db.*`` against the session cluster through E2E_ADMIN_DATABASE_URL:
    ``db_invoke(*args, env_extra=None)``."""
    base = f"c{uuid.uuid4().hex[:10]}"
    config_file = write_pyproject(
        tmp_path,
        name_base=base,
        migrations_dir=DB_FIXTURES / "migrations",
        seeds_dir=DB_FIXTURES / "seeds",
    )
    env = config_environ(
        config_file,
        E2E_ADMIN_DATABASE_URL=pg_cluster.tcp.url,
        E2E_OWNER_PID=str(os.getpid()),  # the lease lives as long as this test process
    )

    def run(
        *args: str, env_extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return cli.invoke(*args, env={**env, **(env_extra or {})}, timeout=120)

    yield run
    drop_databases(pg_cluster.admin, base + "_")


@pytest.fixture
def reap() -> Iterator[list[Nox]]:
    """nox processes a test started: killed with their whole group if the test failed early."""
    started: list[Nox] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
