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
from support.databases import DB_FIXTURES, Factory, admin_execute, dead_owner, marked_databases

from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases import DatabaseAllocator
from e2e_infra.errors import DatabaseError, MigrationError
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


def test_migrate_on_a_live_database_runs_as_the_project_role_which_may_alter_the_templates_tables(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Any
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    allocator: DatabaseAllocator = make_allocator(migrations_dir=migrations)
    got = allocator.allocate("zeta", Owner.current())
    (migrations / "0003_b.sql").write_text(
        "CREATE SCHEMA extra; CREATE TABLE extra.b (id serial PRIMARY KEY, v text); "
        "ALTER TABLE accounts ADD COLUMN email text; CREATE INDEX ON notes (body);"
    )
    allocator.migrate("zeta")
    with psycopg.connect(got.url.conninfo(), autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (name, email) VALUES ('x', 'x@example.org')")
        conn.execute("INSERT INTO extra.b (v) VALUES ('y')")
        assert conn.execute("SELECT count(*) FROM extra.b").fetchone() == (1,)
        owners = conn.execute(
            "SELECT tablename, tableowner FROM pg_tables WHERE tablename IN ('accounts', 'b') "
            "ORDER BY 1"
        ).fetchall()
    # The template's tables belong to the group; what db.migrate made, to the project's role.
    assert owners == [("accounts", f"{allocator.base}__projects"), ("b", got.name)]
    allocator.release("zeta")


def test_a_template_is_built_by_a_role_of_its_own_and_the_migrate_command_never_sees_the_admin(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, report = tmp_path / "migrate.py", tmp_path / "migrate.json"
    script.write_text(
        "import json, os, psycopg\n"
        "with psycopg.connect(os.environ['DATABASE_URL'], autocommit=True) as conn:\n"
        "    who = conn.execute('SELECT current_user::text, rolsuper FROM pg_roles '\n"
        "                       'WHERE rolname = current_user').fetchone()\n"
        "    conn.execute('CREATE TABLE accounts (id int PRIMARY KEY, name text)')\n"
        "seen = sorted(k for k in os.environ if k.startswith(('E2E_', 'PG', 'MIGRATE_')))\n"
        "with open(os.environ['MIGRATE_REPORT'], 'w') as out:\n"
        "    json.dump({'user': who[0], 'super': who[1], 'env': seen}, out)\n"
    )
    # What CI exports: the admin URL and its password; and the tool's own plumbing.
    assert pg_cluster.tcp.password
    monkeypatch.setenv("E2E_ADMIN_DATABASE_URL", pg_cluster.tcp.url)
    monkeypatch.setenv("PGPASSWORD", pg_cluster.tcp.password)
    monkeypatch.setenv("E2E_NOX_RUN_ID", "a nox run")
    monkeypatch.setenv("MIGRATE_REPORT", str(report))  # the user's own variable: passed on
    allocator = make_allocator(migrate_command=f"{{python}} {script}", migrations_dir=None)
    got = allocator.allocate("theta", Owner.current(), seed="empty")
    seen = json.loads(report.read_text())
    assert seen["user"].startswith(f"{allocator.base}_build_") and seen["super"] is False
    assert seen["env"] == ["MIGRATE_REPORT"], seen["env"]
    assert role_row(pg_cluster, seen["user"]) is None  # dropped once the template was built
    template_owner, _acl = database_acl(pg_cluster, got.template)
    assert template_owner == pg_cluster.tcp.user
    with psycopg.connect(got.url.conninfo(), autocommit=True) as conn:
        owners = dict(
            conn.execute(
                "SELECT schemaname || '.' || tablename, tableowner FROM pg_tables "
                "WHERE schemaname IN ('public', 'e2e_infra')"
            ).fetchall()
        )
        conn.execute("ALTER TABLE accounts ADD COLUMN email text")  # the group's: its own
    assert owners == {
        "public.accounts": f"{allocator.base}__projects",
        "e2e_infra.migrations": pg_cluster.tcp.user,  # the admin's, see the next test
    }
    allocator.release("theta")


def test_a_build_may_create_trusted_extensions_and_an_untrusted_one_is_one_line_naming_the_file(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Any
) -> None:
    trusted, untrusted = tmp_path / "trusted", tmp_path / "untrusted"
    for folder, extension in ((trusted, "pgcrypto"), (untrusted, "adminpack")):
        shutil.copytree(DB_FIXTURES / "migrations", folder)
        (folder / "0003_extension.sql").write_text(f"CREATE EXTENSION {extension};")
    got = make_allocator(migrations_dir=trusted).allocate("mu", Owner.current())
    with psycopg.connect(got.url.conninfo(), autocommit=True) as conn:
        digest = conn.execute("SELECT encode(digest('x', 'sha256'), 'hex')").fetchone()
    assert digest is not None and len(digest[0]) == 64
    with pytest.raises(MigrationError) as info:
        make_allocator(migrations_dir=untrusted).allocate("nu", Owner.current())
    line = info.value.one_line()
    assert "0003_extension.sql failed" in line and "permission denied" in line


def test_a_project_role_may_read_and_add_to_the_tools_bookkeeping_and_nothing_more(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator()
    got = allocator.allocate("iota", Owner.current())
    table = "e2e_infra.migrations"
    refused = [
        f"CREATE TRIGGER spy AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION spy()",
        f"CREATE RULE spy AS ON INSERT TO {table} DO ALSO NOTIFY spy",
        f"CREATE POLICY spy ON {table} USING (spy_check())",
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} ADD COLUMN spy int DEFAULT spy_check()::int",
        f"ALTER TABLE {table} RENAME TO spied",
        f"CREATE TABLE public.spy_child () INHERITS ({table})",
        f"UPDATE {table} SET checksum = 'forged'",
        f"DELETE FROM {table}",
        f"TRUNCATE {table}",
        f"DROP TABLE {table}",
        "DROP SCHEMA e2e_infra CASCADE",
        "ALTER SCHEMA e2e_infra RENAME TO spied",
        "CREATE TABLE e2e_infra.spy (x int)",
        "CREATE FUNCTION e2e_infra.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT now()'",
    ]
    with psycopg.connect(got.url.conninfo(), autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION spy() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'; "
            "CREATE FUNCTION spy_check() RETURNS boolean LANGUAGE sql AS 'SELECT true'"
        )
        for statement in refused:
            with pytest.raises(sqlerrors.InsufficientPrivilege):
                conn.execute(statement.encode())
        # Read, and add a row: what `db.migrate` does as this very role.
        names = {row[0] for row in conn.execute(f"SELECT name FROM {table}").fetchall()}
        assert {"0001_accounts.sql", "seed:default/0001_accounts.sql"} <= names
        conn.execute(f"INSERT INTO {table} (name, checksum) VALUES ('mine.sql', 'x')")
    allocator.release("iota")


def test_project_roles_reach_neither_postgres_nor_template1_nor_the_tools_advisory_locks(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    # The embedded cluster (the tool's own server); short waits, should a lock be contended.
    allocator = make_allocator(clone_timeout=2, build_timeout=5)
    got = allocator.allocate("kappa", Owner.current())
    for other in ("postgres", "template1"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(got.url.with_dbname(other).conninfo()).close()
    # Advisory locks are per database: the project holding the tool's keys in its own database
    # (the build lock of its template, the creation gate) holds nothing of the tool's.
    from e2e_infra.databases.names import build_key, name_key
    from e2e_infra.databases.shared import gate_key, held_keys

    marker = marked_databases(pg_cluster.admin, got.template)[got.template]
    assert marker is not None
    keys = [name_key(got.template), gate_key(allocator.base, allocator.registry.host)]
    keys.append(build_key(str(marker["fingerprint"])))
    with psycopg.connect(got.url.conninfo(), autocommit=True) as project:
        for key in keys:
            assert project.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
        with allocator.connections.lend() as admin:
            assert not set(keys) & held_keys(admin)
        again = allocator.allocate("lambda", Owner.current())  # takes the gate and name locks
        allocator.release("lambda")
        assert again.template == got.template
    allocator.release("kappa")


def _names(pg: PgCluster, prefix: str) -> list[tuple[str]]:
    with psycopg.connect(pg.admin.conninfo()) as conn:
        return [
            (str(row[0]),)
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
            ).fetchall()
        ]
