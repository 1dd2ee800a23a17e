"""DatabaseAllocator against the real session cluster: templates, clones, markers, sweeping."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support import REPO_ROOT
from support.clusters import PgCluster
from support.databases import DB_FIXTURES, Factory, admin_execute, databases, dead_owner

from e2e_infra.databases import DatabaseAllocator, fingerprint, template_name
from e2e_infra.databases.migrations import migration_runner, seed_runner
from e2e_infra.errors import (
    CloneError,
    DatabaseError,
    DatabaseLimitError,
    DeadlineExceeded,
    MigrationError,
    ServerUnreachableError,
)
from e2e_infra.resources.leases import Owner
from e2e_infra.testing import FakeClock

pytestmark = pytest.mark.integration

DEMO = REPO_ROOT / "demo"


def test_allocated_database_has_the_demo_schema_and_seed_and_a_marker(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(migrations_dir=DEMO / "migrations", seeds_dir=DEMO / "seeds")
    me = Owner.current()
    got = allocator.allocate("auth_tests", me, seed="auth_only")
    assert got.name == f"{allocator.base}_auth_tests"
    assert got.url.host == "127.0.0.1" and got.url.password  # the TCP URL servers get
    with psycopg.connect(got.url.conninfo()) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        users = conn.execute("SELECT count(*) FROM users").fetchone()
    assert tables is not None and tables[0] >= 20
    assert users is not None and users[0] == 3
    found = databases(pg_cluster, allocator.base + "_")
    marker = found[got.name]
    assert marker is not None
    assert (marker["kind"], marker["lease"], marker["pid"], marker["run"]) == (
        "database",
        got.lease.id,
        me.pid,
        me.run_id,
    )
    assert found[got.template] is not None and found[got.template]["kind"] == "template"
    with psycopg.connect(pg_cluster.admin.conninfo()) as conn:
        row = conn.execute(
            "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s",
            (got.template,),
        ).fetchone()
    assert row == (True, False)
    assert allocator.release("auth_tests") == [got.name]
    assert got.name not in databases(pg_cluster, allocator.base + "_")
    assert allocator.release("auth_tests") == []  # idempotent
    assert allocator.registry.snapshot() == ()


def test_concurrent_runs_of_one_project_never_share_a_database(make_allocator: Factory) -> None:
    allocator = make_allocator()
    first = allocator.allocate("inventory", Owner.current(run_id="run-1"))
    second = allocator.allocate("inventory", Owner.current(run_id="run-2"))
    assert first.name == f"{allocator.base}_inventory"
    assert second.name.startswith(first.name + "_") and second.name != first.name
    with psycopg.connect(first.url.conninfo(), autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (name) VALUES ('only-in-first')")
    with psycopg.connect(second.url.conninfo()) as conn:
        row = conn.execute("SELECT count(*) FROM accounts WHERE name = 'only-in-first'").fetchone()
    assert row == (0,)
    assert sorted(allocator.release("inventory")) == sorted([first.name, second.name])


def test_editing_a_migration_builds_a_new_template_and_old_ones_are_dropped(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    # Age 0: only the keep_templates most recently used of the seed stay.
    allocator = make_allocator(migrations_dir=migrations, keep_templates=2, template_keep_hours=0)
    owner = Owner.current()
    templates = []
    for version in range(3):
        if version:
            with (migrations / "0002_notes.sql").open("a") as handle:
                handle.write(f"\nALTER TABLE notes ADD COLUMN extra_{version} int;\n")
        got = allocator.allocate("quality", owner)
        templates.append(got.template)
        with psycopg.connect(got.url.conninfo()) as conn:
            cols = conn.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' "
                "AND column_name LIKE 'extra_%%'"
            ).fetchone()
        assert cols == (version,)  # the clone has this version's schema
        allocator.release("quality")
    assert len(set(templates)) == 3
    left = {n for n, m in databases(pg_cluster, allocator.base + "_").items() if m}
    assert left == {templates[1], templates[2]}  # the least recently used was dropped


def test_a_failing_migration_names_the_file_and_leaves_nothing_behind(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    (migrations / "0003_broken.sql").write_text("CREATE TABLE fine (id int);\nCREATE TABLE (;\n")
    allocator = make_allocator(migrations_dir=migrations)
    with pytest.raises(MigrationError) as info:
        allocator.allocate("quality", Owner.current())
    message = info.value.one_line()
    assert "0003_broken.sql" in message and "syntax error" in message
    assert info.value.file.endswith("0003_broken.sql")
    assert databases(pg_cluster, allocator.base + "_") == {}  # no template, no half-built one
    assert allocator.registry.snapshot() == ()


def test_leftover_of_a_dead_builder_is_dropped_by_the_next_builder(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator()
    config = allocator.config
    with psycopg.connect(pg_cluster.admin.conninfo()) as conn:
        major = conn.info.server_version // 10000
    fp = fingerprint(migration_runner(config), seed_runner(config, "default"), "default", major)
    dead = dead_owner()
    leftover = f"{allocator.base}_build_{fp[:12]}_{dead.pid}"
    marker = {
        "tool": "e2e-infra",
        "base": allocator.base,
        "kind": "building",
        "fingerprint": fp,
        "host": dead.host,
        "pid": dead.pid,
        "start": dead.start_time,
    }
    admin_execute(pg_cluster, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(leftover)))
    admin_execute(
        pg_cluster,
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(leftover), sql.Literal("e2e-infra " + json.dumps(marker))
        ),
    )
    got = allocator.allocate("dashboard", Owner.current())
    assert got.template == template_name(allocator.base, "default", fp)
    assert leftover not in databases(pg_cluster, allocator.base + "_")


def test_cleanup_drops_dead_owners_and_expired_keeps_but_never_unmarked_databases(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    clock = FakeClock(start=0.0, wall=time.time())
    allocator = make_allocator(clock=clock, keep_hours=1.0)
    live = allocator.allocate("live", Owner.current())
    orphan = allocator.allocate("orphan", dead_owner())
    kept = allocator.allocate("kept", Owner.current())
    assert allocator.release("kept", keep=True) == [kept.name]
    stranger = f"{allocator.base}_stranger"  # matches the pattern, carries no marker
    admin_execute(pg_cluster, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(stranger)))

    dropped = dict(allocator.cleanup())
    assert list(dropped) == [orphan.name]
    assert "gone" in dropped[orphan.name]
    present = databases(pg_cluster, allocator.base + "_")
    assert {live.name, kept.name, stranger} <= set(present)
    assert present[kept.name] is not None and present[kept.name]["kind"] == "kept"
    assert allocator.find("kept").name == kept.name  # a kept database still has its URL

    clock.advance(3601)
    assert [name for name, _ in allocator.cleanup()] == [kept.name]
    present = databases(pg_cluster, allocator.base + "_")
    assert live.name in present and stranger in present and kept.name not in present
    assert [lease.resource for lease in allocator.registry.snapshot()] == [live.name]


def test_an_unmarked_database_with_the_projects_name_is_left_alone(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator()
    squatter = f"{allocator.base}_work_orders"
    admin_execute(pg_cluster, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(squatter)))
    got = allocator.allocate("work_orders", Owner.current())
    assert got.name != squatter and got.name.startswith(squatter + "_")
    assert databases(pg_cluster, squatter)[squatter] is None  # still there, still unmarked
    assert allocator.release("work_orders") == [got.name]


def test_the_database_cap_is_a_clear_error(make_allocator: Factory) -> None:
    allocator = make_allocator(max_databases=2)
    allocator.allocate("one", Owner.current())
    allocator.allocate("two", Owner.current())
    with pytest.raises(DatabaseLimitError, match="max_databases = 2"):
        allocator.allocate("three", Owner.current())
    assert {lease.project for lease in allocator.registry.snapshot()} == {"one", "two"}


def test_cloning_a_busy_template_gives_up_naming_the_blocking_session(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(clone_timeout=0.5)
    source = f"{allocator.base}_busy_source"
    admin_execute(pg_cluster, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(source)))
    holder = pg_cluster.admin.with_dbname(source).conninfo(application_name="leaky-debugger")
    with (
        psycopg.connect(holder) as _leak,
        psycopg.connect(pg_cluster.admin.conninfo(), autocommit=True) as conn,
        pytest.raises(CloneError) as info,
    ):
        # The server itself waits about 5 s before it reports 55006.
        allocator.catalog.create(conn, f"{allocator.base}_clone", source, "FILE_COPY")
    message = info.value.one_line()
    assert "leaky-debugger" in message and source in message
    assert info.value.blockers and "leaky-debugger" in info.value.blockers[0]


def test_an_unreachable_server_names_the_masked_url_and_the_fix(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator()
    nowhere = pg_cluster.tcp.__class__(
        host="127.0.0.1", port=15598, user="postgres", password="topsecret-pw"
    )
    broken = DatabaseAllocator(allocator.config, allocator.registry, nowhere)
    with pytest.raises(ServerUnreachableError) as info:
        broken.allocate("auth_tests", Owner.current())
    message = info.value.one_line()
    assert "postgresql://postgres:***@127.0.0.1:15598/postgres" in message
    assert "topsecret-pw" not in message and "invoke pg.start" in message
    assert allocator.registry.snapshot() == ()


# --- a clone interrupted mid-statement, and what a dead maker leaves --------------------------


class Interrupt(BaseException):
    """What a signal handler raises in the middle of a statement (the session's SIGTERM)."""


def test_an_interrupt_during_create_database_leaves_no_database_and_no_lease(
    make_allocator: Factory, pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocator = make_allocator()
    allocator.ensure_template("default")
    seen: list[str] = []

    def interrupted_create(
        conn: psycopg.Connection[Any], name: str, template: str, strategy: str | None
    ) -> None:
        # CREATE is on its way to the server when the exception arrives: the connection is left
        # busy ("another command is already in progress"), and the server goes on creating.
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
        conn.pgconn.send_query(statement.as_bytes(conn))
        seen.append(name)
        raise Interrupt

    monkeypatch.setattr(allocator.catalog, "create", interrupted_create)
    with pytest.raises(Interrupt):
        allocator.allocate("billing", Owner.current())
    assert seen == [f"{allocator.base}_billing"]
    assert seen[0] not in databases(pg_cluster, allocator.base + "_")  # settled: dropped
    assert allocator.registry.snapshot() == ()
    monkeypatch.undo()
    again = allocator.allocate("billing", Owner.current())
    assert again.name == seen[0]  # no suffix: nothing was left holding the name
    assert allocator.release("billing") == [again.name]


def create_unmarked(pg: PgCluster, name: str) -> None:
    admin_execute(pg, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def test_cleanup_drops_an_unmarked_database_named_by_a_dead_makers_lease_and_no_other(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    from e2e_infra.resources.leases import Lease

    allocator = make_allocator()
    base = allocator.base
    clone, building, stranger = f"{base}_orders", f"{base}_build_0123456789ab_42", f"{base}_x"
    alive_clone = f"{base}_alive"
    for name in (clone, building, stranger, alive_clone):
        create_unmarked(pg_cluster, name)
    dead = dead_owner()
    with allocator.registry.transaction() as txn:  # each died between CREATE and COMMENT
        txn.add(Lease(kind="database", resource=clone, project="orders", owner=dead))
        txn.add(Lease(kind="building", resource=building, project="(templates)", owner=dead))
        # A live owner's clone in the making: never touched.
        txn.add(
            Lease(kind="database", resource=alive_clone, project="alive", owner=Owner.current())
        )
    dropped = dict(allocator.cleanup())
    assert set(dropped) == {clone, building}
    assert "half-made database" in dropped[clone] and "half-built template" in dropped[building]
    present = databases(pg_cluster, base + "_")
    assert stranger in present and alive_clone in present  # no lease, or a live owner's
    assert [lease.resource for lease in allocator.registry.snapshot()] == [alive_clone]


def test_a_dead_makers_unmarked_clone_gives_its_name_back_to_the_next_allocation(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    from e2e_infra.resources.leases import Lease

    allocator = make_allocator()
    name = f"{allocator.base}_orders"
    create_unmarked(pg_cluster, name)
    with allocator.registry.transaction() as txn:
        txn.add(Lease(kind="database", resource=name, project="orders", owner=dead_owner()))
    got = allocator.allocate("orders", Owner.current())
    assert got.name == name  # reclaimed on the lease's proof, not suffixed around
    marker = databases(pg_cluster, name)[name]
    assert marker is not None and marker["lease"] == got.lease.id
    assert [lease.id for lease in allocator.registry.snapshot()] == [got.lease.id]
    allocator.release("orders")


def test_a_template_shows_the_run_that_built_it(make_allocator: Factory) -> None:
    allocator = make_allocator()
    got = allocator.allocate("reports", Owner.current(run_id="run-that-built"))
    rows = {info.name: info for info in allocator.list()}
    assert rows[got.template].kind == "template"
    assert rows[got.template].run_id == "run-that-built"
    allocator.release("reports")


def test_an_admin_user_without_createdb_gets_one_line_naming_the_fix(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    role, password = f"nocreatedb_{uuid.uuid4().hex[:8]}", "NoCreateDb-pw-1"
    admin_execute(
        pg_cluster,
        # CONNECT on postgres by name: the embedded cluster grants it to PUBLIC no more.
        sql.SQL(
            "CREATE ROLE {} LOGIN PASSWORD {}; GRANT CONNECT ON DATABASE postgres TO {}"
        ).format(sql.Identifier(role), sql.Literal(password), sql.Identifier(role)),
    )
    try:
        allocator = make_allocator()
        weak = replace_user(pg_cluster.tcp, role, password)
        limited = DatabaseAllocator(allocator.config, allocator.registry, weak)
        with pytest.raises(DatabaseError) as info:
            limited.allocate("auth_tests", Owner.current())
        line = info.value.one_line()
        assert f"needs CREATEDB: ALTER ROLE {role} CREATEDB" in line
        assert "permission denied to create database" in line and password not in line
        assert allocator.registry.snapshot() == ()
    finally:
        admin_execute(
            pg_cluster,
            sql.SQL("DROP OWNED BY {}; DROP ROLE IF EXISTS {}").format(
                sql.Identifier(role), sql.Identifier(role)
            ),
        )


def replace_user(info: Any, user: str, password: str) -> Any:
    from dataclasses import replace as dc_replace

    return dc_replace(info, user=user, password=password)


def test_a_project_waiting_for_anothers_build_gives_up_at_the_build_timeout_naming_it(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    import threading

    migrations = tmp_path / "slow"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    (migrations / "0003_slow.sql").write_text("SELECT pg_sleep(3);")
    builder = make_allocator(migrations_dir=migrations)
    waiter = make_allocator(name_base=builder.base, migrations_dir=migrations, build_timeout=1)
    assert waiter.build_timeout == 1.0
    built: list[object] = []
    thread = threading.Thread(target=lambda: built.append(builder.allocate("one", Owner.current())))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not [n for n in databases(pg_cluster, builder.base + "_build_")]:
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            waiter.allocate("two", Owner.current())
        assert time.monotonic() - started < 2.5
        assert "raise database.build_timeout (E2E_BUILD_TIMEOUT)" in info.value.one_line()
    finally:
        thread.join(timeout=30)
    assert len(built) == 1  # the build itself went on and finished
    builder.release_all()
