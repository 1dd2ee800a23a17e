"""What a test reads, writes or drops on a cluster by hand, around the tool's own allocator."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases import DatabaseAllocator, parse_marker
from e2e_infra.resources.leases import Owner
from support import FIXTURES_DIR
from support.clusters import PgCluster

DB_FIXTURES = FIXTURES_DIR / "db"
"""A small schema: ``migrations/`` and ``seeds/`` (profiles ``default`` and ``empty``)."""

Factory = Callable[..., DatabaseAllocator]
"""The ``make_allocator`` fixture: ``make_allocator(clock=None, **config_overrides)``."""


def marked_databases(admin: ConnInfo, prefix: str) -> dict[str, dict[str, Any] | None]:
    """Every database whose name starts with ``prefix``, with its parsed e2e-infra marker."""
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE starts_with(datname, %s)",
            (prefix,),
        ).fetchall()
    return {name: parse_marker(comment) for name, comment in rows}


def databases(pg: PgCluster, prefix: str) -> dict[str, dict[str, Any] | None]:
    """:func:`marked_databases` of the session cluster."""
    return marked_databases(pg.admin, prefix)


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


def admin_execute(pg: PgCluster, query: sql.Composable | str, *params: Any) -> None:
    """Run one statement as the session cluster's admin, outside any transaction."""
    with psycopg.connect(pg.admin.conninfo(), autocommit=True) as conn:
        conn.execute(query if not isinstance(query, str) else query.encode(), params or None)


def dead_owner() -> Owner:
    """The owner identity of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner.of_pid(proc.pid, run_id="dead-run")
    proc.wait()
    return owner
