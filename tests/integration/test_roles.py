"""Least privilege against the real session cluster: each project database is owned by, and handed
out with, a role of its own that is no superuser and cannot reach another project's database."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import errors as sqlerrors
from psycopg import sql
from support.cli import Invoke
from support.clusters import PgCluster
from support.databases import DB_FIXTURES, Factory, admin_execute, dead_owner

from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases import DatabaseAllocator
from e2e_infra.errors import DatabaseError
from e2e_infra.resources.leases import Owner

pytestmark = pytest.mark.integration


def role_row(pg: PgCluster, name: str) -> dict[str, Any] | None:
    with psycopg.connect(pg.admin.conninfo()) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
            "rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
            (name,),
        ).fetchone()
    if row is None:
        return None
    keys = ("super", "createdb", "createrole", "replication", "bypassrls", "login", "comment")
    return dict(zip(keys, row, strict=True))


def database_acl(pg: PgCluster, name: str) -> tuple[str, list[str]]:
    """(owner, ACL entries) of database ``name``."""
    with psycopg.connect(pg.admin.conninfo()) as conn:
        row = conn.execute(
            "SELECT pg_get_userbyid(datdba), datacl::text[] FROM pg_database WHERE datname = %s",
            (name,),
        ).fetchone()
    assert row is not None, name
    return str(row[0]), list(row[1] or [])


def assert_own_unprivileged_role(pg: PgCluster, url: ConnInfo, database: str) -> None:
    """``url`` logs in as a role named after its database that owns it and holds nothing more."""
    assert url.user == url.dbname == database
    assert url.password and url.password != pg.tcp.password
    with psycopg.connect(url.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False, False, False)
    owner, acl = database_acl(pg, database)
    assert owner == database
    # No entry for PUBLIC ("=..."): only the owner (and superusers) may connect.
    assert not [entry for entry in acl if entry.startswith("=")], acl


def test_each_project_gets_a_role_of_its_own_that_cannot_reach_another_project(
    db_invoke: Invoke, pg_cluster: PgCluster
) -> None:
    docs = {}
    for project in ("auth_tests", "dashboard"):
        done = db_invoke("db.allocate", "--project", project, "--json")
        assert done.returncode == 0, done.stderr
        docs[project] = json.loads(done.stdout)
    a = ConnInfo.parse(docs["auth_tests"]["database_url"])
    b = ConnInfo.parse(docs["dashboard"]["database_url"])
    assert_own_unprivileged_role(pg_cluster, a, docs["auth_tests"]["database"])
    assert_own_unprivileged_role(pg_cluster, b, docs["dashboard"]["database"])
    assert a.password != b.password

    with psycopg.connect(a.conninfo(), autocommit=True) as conn:
        # Everything a suite or server does with its own data still works.
        conn.execute("INSERT INTO accounts (name) VALUES ('zoe')")
        conn.execute("UPDATE accounts SET name = 'zed' WHERE name = 'zoe'")
        conn.execute("DELETE FROM accounts WHERE name = 'zed'")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        conn.execute("CREATE TABLE own_table (x int); DROP TABLE own_table")
        conn.execute("TRUNCATE notes")
        # What only a superuser (or a CREATEDB role) could do, it cannot.
        with pytest.raises(sqlerrors.InsufficientPrivilege):
            conn.execute("CREATE DATABASE stolen")
        with pytest.raises(sqlerrors.InsufficientPrivilege):
            conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        with pytest.raises(sqlerrors.InsufficientPrivilege):
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(b.dbname)))
    # a's role and password on b's database: refused at connect.
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(a.with_dbname(b.dbname).conninfo()).close()
    # Nor can anyone without a role of ours connect to the template.
    template = docs["auth_tests"]["template"]
    _owner, acl = database_acl(pg_cluster, template)
    assert not [entry for entry in acl if entry.startswith("=")], acl

    released = db_invoke("db.release", "--project", "auth_tests")
    assert released.returncode == 0, released.stderr
    assert role_row(pg_cluster, a.user) is None  # dropped with its database
    assert role_row(pg_cluster, b.user) is not None
    assert db_invoke("db.release", "--project", "dashboard").returncode == 0
    assert role_row(pg_cluster, b.user) is None


def test_a_warm_spare_is_made_with_a_role_that_logs_in_only_once_claimed(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(spares=1)
    first = allocator.allocate("alpha", Owner.current())
    allocator.release("alpha")
    allocator.close()  # joins the background preparation
    (spare,) = [
        name
        for (name,) in _names(pg_cluster, allocator.base + "_spare_")
        if role_row(pg_cluster, name) is not None
    ]
    made = role_row(pg_cluster, spare)
    assert made is not None and not made["login"] and not made["super"]
    assert database_acl(pg_cluster, spare)[0] == spare

    got = allocator.allocate("beta", Owner.current())
    assert got.name == f"{allocator.base}_beta" and got.url.password
    assert role_row(pg_cluster, spare) is None  # renamed with its database
    claimed = role_row(pg_cluster, got.name)
    assert claimed is not None and claimed["login"]
    assert_own_unprivileged_role(pg_cluster, got.url, got.name)
    with psycopg.connect(got.url.conninfo()) as conn:
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (3,)
    assert allocator.find("beta").url == got.url  # db.url finds the same password again
    assert first.url.password != got.url.password
    allocator.release("beta")
    allocator.close()
    assert role_row(pg_cluster, got.name) is None


def test_cleanup_drops_the_role_of_a_dead_owner_and_never_an_unmarked_one(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator()
    dead = allocator.allocate("gamma", dead_owner())
    base = allocator.base
    # A role that is ours and lost its database (a drop interrupted half-way), and two the tool
    # never made: one named like an orphan, one like a database of ours.
    leftover, foreign, taken = f"{base}_leftover", f"{base}_foreign", f"{base}_delta"
    marker = allocator.catalog.roles.marker("role")
    admin_execute(
        pg_cluster,
        sql.SQL("CREATE ROLE {} NOLOGIN; COMMENT ON ROLE {} IS {}").format(
            sql.Identifier(leftover), sql.Identifier(leftover), sql.Literal(marker)
        ),
    )
    for name in (foreign, taken):
        admin_execute(pg_cluster, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))

    dropped = allocator.cleanup()
    assert [name for name, _ in dropped] == [dead.name]
    assert role_row(pg_cluster, dead.name) is None
    assert role_row(pg_cluster, leftover) is None
    assert role_row(pg_cluster, foreign) is not None and role_row(pg_cluster, taken) is not None

    # A database whose name a foreign role holds: refused, and nothing is left behind.
    with pytest.raises(DatabaseError, match=f"a role named {taken} exists"):
        allocator.allocate("delta", Owner.current())
    assert _names(pg_cluster, taken) == []
    assert allocator.registry.snapshot() == ()


def test_a_leftover_role_of_ours_is_replaced_when_its_name_is_allocated_again(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator()
    name = f"{allocator.base}_epsilon"
    marker = allocator.catalog.roles.marker("role")
    admin_execute(
        pg_cluster,
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'old'; COMMENT ON ROLE {} IS {}").format(
            sql.Identifier(name), sql.Identifier(name), sql.Literal(marker)
        ),
    )
    got = allocator.allocate("epsilon", Owner.current())
    assert got.name == name
    assert_own_unprivileged_role(pg_cluster, got.url, name)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(replace(got.url, password="old").conninfo()).close()
    allocator.release("epsilon")


def test_migrate_on_a_live_database_runs_as_the_admin_and_the_role_can_use_what_it_made(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Any
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    allocator: DatabaseAllocator = make_allocator(migrations_dir=migrations)
    got = allocator.allocate("zeta", Owner.current())
    (migrations / "0003_b.sql").write_text(
        "CREATE SCHEMA extra; CREATE TABLE extra.b (id serial PRIMARY KEY, v text);"
    )
    allocator.migrate("zeta")
    with psycopg.connect(got.url.conninfo(), autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (name) VALUES ('x')")
        conn.execute("INSERT INTO extra.b (v) VALUES ('y')")  # made after the clone, by the admin
        assert conn.execute("SELECT count(*) FROM extra.b").fetchone() == (1,)
    allocator.release("zeta")


def _names(pg: PgCluster, prefix: str) -> list[tuple[str]]:
    with psycopg.connect(pg.admin.conninfo()) as conn:
        return [
            (str(row[0]),)
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
            ).fetchall()
        ]
