"""Shared fixtures for the integration tests: configs in tmp folders and a real local cluster.

* :func:`make_config` builds a :class:`~e2e_infra.config.Config` through the real loader from a
  small generated ``pyproject.toml`` under ``tmp_path`` (never the repository's own state folder).
* ``pg_cluster`` (session) starts one embedded PostgreSQL cluster on ports 15400-15409 and stops
  it at the end; ``new_cluster`` (function) builds extra clusters that are stopped and removed
  after the test.

A test run that dies without teardown (SIGKILL, power cut of the CI job) leaves a record in
``/tmp/e2e-infra-test-clusters-<uid>/``; the next run stops those clusters once the pytest process
that recorded them is provably gone (pid + start time), and removes their folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from e2e_infra.config import Config, load_config
from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases import parse_marker
from e2e_infra.postgres import LocalCluster
from e2e_infra.resources.leases import Owner, Registry
from e2e_infra.resources.ports import PortAllocator
from e2e_infra.run.workspace import make_registry as make_registry  # re-exported for the tests
from e2e_infra.testing import toml_value

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_PORT_RANGE = "15400-15409"  # the session cluster; other tests of this team use 15410-15499

_PG_KEYS = {"bin_dir", "data_dir", "user", "tmpfs", "startup_timeout"}
_DB_KEYS = {
    "admin_url",
    "name_base",
    "migrations_dir",
    "migrate_command",
    "migrate_inputs",
    "seeds_dir",
    "seed_commands",
    "default_seed",
    "keep_templates",
    "template_keep_hours",
    "server_max_databases",
    "max_databases",
    "keep_hours",
    "clone_strategy",
    "clone_timeout",
    "spares",
    "build_timeout",
}
_TABLES = {"servers", "projects"}


# --- configs ------------------------------------------------------------------------------------


def _table(name: str, values: Mapping[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
    return [*lines, ""]


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The outer environment without any E2E_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2E_")}
    env.update(extra or {})
    return env


def write_pyproject(tmp_path: Path, **overrides: Any) -> Path:
    """Write ``tmp_path/pyproject.toml`` with a [tool.e2e_infra] section; return its path.

    Keys go where they belong: postgres keys (bin_dir, data_dir, user, tmpfs, startup_timeout) to
    ``[tool.e2e_infra.postgres]``, database keys (admin_url, migrations_dir, seeds_dir, ...) to
    ``[tool.e2e_infra.database]``, ``servers`` / ``projects`` as tables of tables, the rest to the
    top. A value of None leaves the key out (e.g. ``migrations_dir=None``).
    """
    migrations = REPO_ROOT / "demo" / "migrations"
    seeds = REPO_ROOT / "demo" / "seeds"
    top: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "results_dir": tmp_path / "results",
        "port_range": PG_PORT_RANGE,
    }
    database: dict[str, Any] = {
        "migrations_dir": migrations if migrations.is_dir() else None,
        "seeds_dir": seeds if seeds.is_dir() else None,
    }
    postgres: dict[str, Any] = {}
    tables: dict[str, Mapping[str, Mapping[str, Any]]] = {}
    for key, value in overrides.items():
        if key in _PG_KEYS:
            postgres[key] = value
        elif key in _DB_KEYS:
            database[key] = value
        elif key in _TABLES:
            tables[key] = value
        else:
            top[key] = value
    lines = _table("tool.e2e_infra", top)
    lines += _table("tool.e2e_infra.database", database)
    if postgres:
        lines += _table("tool.e2e_infra.postgres", postgres)
    for kind, entries in tables.items():
        for name, values in entries.items():
            lines += _table(f"tool.e2e_infra.{kind}.{name}", values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pyproject.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_config(
    tmp_path: Path, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Config:
    """A Config read by the real loader from a generated ``tmp_path/pyproject.toml``.

    State and results live under ``tmp_path``; the port range defaults to the session cluster's
    (15400-15409): pass ``port_range="..."`` from your own range for anything that binds ports.
    Database settings point at the demo's migrations and seeds when present. ``environ`` adds
    variables to an environment stripped of every outer E2E_* variable.
    """
    path = write_pyproject(tmp_path, **overrides)
    return load_config(path, environ=clean_environ(environ))


def marked_databases(admin: ConnInfo, prefix: str) -> dict[str, dict[str, Any] | None]:
    """Every database whose name starts with ``prefix``, with its parsed e2e-infra marker."""
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE starts_with(datname, %s)",
            (prefix,),
        ).fetchall()
    return {name: parse_marker(comment) for name, comment in rows}


def run_processes(results_dir: Path) -> list[psutil.Process]:
    """Live processes started by runs whose results go under ``results_dir`` (servers, suites)."""
    marker = str(results_dir)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("E2E_RESULTS_DIR", "").startswith(marker):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run_folder(results_dir: Path) -> Path:
    """The newest run's results folder (``<results_dir>/latest``), or ``results_dir`` itself for
    a run without a run folder (a ProjectSession used directly)."""
    latest = results_dir / "latest"
    return latest if latest.exists() else results_dir


def project_folder(results_dir: Path, project: str) -> Path:
    """The results folder of ``project``'s newest run, whichever run folder holds it."""
    folders = {p.resolve() for p in (results_dir / project, *results_dir.glob(f"*/{project}"))}
    with_record = [f for f in folders if (f / "run.json").is_file()]
    if not with_record:
        return run_folder(results_dir) / project
    return max(with_record, key=lambda f: (f / "run.json").stat().st_mtime)


def drop_databases(admin: ConnInfo, prefix: str) -> None:
    """Drop every database and role whose name starts with ``prefix``, templates included."""
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
        for (name,) in names:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        # Their roles too (a project database's own role, and the name base's group).
        roles = conn.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,)
        ).fetchall()
        for (name,) in roles:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("DROP OWNED BY {}; DROP ROLE IF EXISTS {}").format(ident, ident))


# --- clusters, with a record that lets the next run clean up after a crashed one ----------------


def _records_dir() -> Path:
    path = Path("/tmp") / f"e2e-infra-test-clusters-{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _record(cluster: LocalCluster) -> Path:
    me = Owner.current()
    record = _records_dir() / f"{me.pid}-{abs(hash(str(cluster.data_dir)))}.json"
    record.write_text(
        json.dumps(
            {
                "pid": me.pid,
                "start_time": me.start_time,
                "data_dir": str(cluster.data_dir),
                "cluster_dir": str(cluster.cluster_dir),
                "socket_dir": str(cluster.socket_dir),
            }
        ),
        encoding="utf-8",
    )
    return record


def _kill_cluster_processes(data_dir: Path) -> None:
    """SIGKILL every postgres process working in ``data_dir``; wait (bounded) for them to go."""
    procs = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.info["name"] or "").startswith("postgres") and Path(proc.cwd()) == data_dir:
                proc.send_signal(signal.SIGKILL)
                procs.append(proc)
    psutil.wait_procs(procs, timeout=10)


def _remove_cluster_folders(cluster_dir: Path, socket_dir: Path, inside: Path | None) -> None:
    for folder in (cluster_dir, socket_dir):
        # Folders under the test's own tmp dir are pytest's to remove; the others are ours.
        if inside is not None and folder.is_relative_to(inside):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def sweep_leftover_clusters() -> list[str]:
    """Stop the clusters of test runs that died without teardown; return their data folders."""
    swept = []
    for record in sorted(_records_dir().glob("*.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            owner = Owner(pid=data["pid"], start_time=data["start_time"], host="", run_id="")
        except (OSError, ValueError, KeyError):
            record.unlink(missing_ok=True)
            continue
        if owner.is_alive():
            continue  # another test run, still going (other engineers share this machine)
        _kill_cluster_processes(Path(data["data_dir"]))
        _remove_cluster_folders(Path(data["cluster_dir"]), Path(data["socket_dir"]), None)
        record.unlink(missing_ok=True)
        swept.append(data["data_dir"])
    return swept


@contextlib.contextmanager
def running_cluster(config: Config, *, start: bool = True) -> Iterator[LocalCluster]:
    """A LocalCluster for ``config``, started (unless ``start=False``), then stopped and removed."""
    registry = make_registry(config)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    record = _record(cluster)
    try:
        if start:
            cluster.ensure_running()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            _kill_cluster_processes(cluster.data_dir)  # whatever a failed stop left
            _remove_cluster_folders(cluster.cluster_dir, cluster.socket_dir, config.state_dir)
            record.unlink(missing_ok=True)


@dataclass(frozen=True)
class PgCluster:
    admin: ConnInfo  # unix socket, fast: for the tool's own connections
    tcp: ConnInfo  # 127.0.0.1 with the password: what servers and suites get
    config: Config
    registry: Registry
    ports: PortAllocator
    cluster: LocalCluster


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
