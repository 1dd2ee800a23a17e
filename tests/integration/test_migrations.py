"""The migration runners against a real database of the session cluster."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from support.clusters import PgCluster
from support.configs import make_config
from support.databases import DB_FIXTURES

from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases import DatabaseAllocator
from e2e_infra.databases.migrations import CommandRunner, SqlDirectoryRunner
from e2e_infra.errors import MigrationError
from e2e_infra.resources.leases import Owner
from e2e_infra.run.workspace import make_registry

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch(pg_cluster: PgCluster) -> Iterator[ConnInfo]:
    """An empty database on the session cluster (TCP, with password), dropped afterwards."""
    name = f"m{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_cluster.admin.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_cluster.tcp.with_dbname(name)
    finally:
        with psycopg.connect(pg_cluster.admin.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def rows(target: ConnInfo, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(target.conninfo()) as conn:
        return conn.execute(query.encode()).fetchall()


def test_sql_files_apply_in_order_once_and_are_recorded_with_checksums(
    scratch: ConnInfo, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", folder)
    runner = SqlDirectoryRunner(folder)
    runner.apply(scratch)
    runner.apply(scratch)  # nothing pending: a no-op, not "table already exists"
    recorded = rows(scratch, "SELECT name, length(checksum) FROM e2e_infra.migrations ORDER BY 1")
    assert recorded == [("0001_accounts.sql", 64), ("0002_notes.sql", 64)]
    (folder / "0003_tags.sql").write_text("CREATE TABLE tags (name text PRIMARY KEY);")
    runner.apply(scratch)
    assert rows(scratch, "SELECT count(*) FROM tags") == [(0,)]


def test_an_edited_applied_file_is_an_error_naming_it(scratch: ConnInfo, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", folder)
    SqlDirectoryRunner(folder).apply(scratch)
    with (folder / "0001_accounts.sql").open("a") as handle:
        handle.write("\n-- sneaky edit\n")
    with pytest.raises(MigrationError, match=r"0001_accounts\.sql was edited after it was applied"):
        SqlDirectoryRunner(folder).apply(scratch)


def test_a_failing_file_is_rolled_back_alone_and_named_with_the_server_message(
    scratch: ConnInfo, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", folder)
    (folder / "0003_bad.sql").write_text(
        "CREATE TABLE half (id int);\nINSERT INTO no_such_table VALUES (1);\n"
    )
    with pytest.raises(MigrationError) as info:
        SqlDirectoryRunner(folder).apply(scratch)
    assert info.value.file.endswith("0003_bad.sql")
    assert 'relation "no_such_table" does not exist' in str(info.value)
    assert scratch.password is not None and scratch.password not in str(info.value)
    names = rows(scratch, "SELECT name FROM e2e_infra.migrations ORDER BY 1")
    assert names == [("0001_accounts.sql",), ("0002_notes.sql",)]
    assert rows(scratch, "SELECT to_regclass('half') IS NULL") == [(True,)]


def test_a_file_that_waits_on_a_lock_fails_at_the_build_timeout_naming_it(
    scratch: ConnInfo, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_locked.sql").write_text("ALTER TABLE held ADD COLUMN y int;")
    with psycopg.connect(scratch.conninfo(), autocommit=True) as holder:
        holder.execute("CREATE TABLE held (x int)")
        with holder.transaction():
            holder.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")  # a session that hangs on
            with pytest.raises(MigrationError) as info:
                SqlDirectoryRunner(folder, timeout=1.0).apply(scratch)
    line = info.value.one_line()
    assert "0001_locked.sql ran past database.build_timeout (1s)" in line
    assert "E2E_BUILD_TIMEOUT" in line and "Traceback" not in line


def test_a_migrate_command_gets_the_target_as_database_url(
    scratch: ConnInfo, tmp_path: Path
) -> None:
    (tmp_path / "migrate.py").write_text(
        "import os, psycopg\n"
        "with psycopg.connect(os.environ['DATABASE_URL']) as conn:\n"
        "    conn.execute('CREATE TABLE from_command (id int)')\n"
    )
    runner = CommandRunner("{python} migrate.py", cwd=tmp_path)
    assert [name for name, _ in runner.inputs()] == ["command", "migrate.py"]
    runner.apply(scratch)
    assert rows(scratch, "SELECT count(*) FROM from_command") == [(0,)]


def test_db_migrate_and_seed_apply_to_the_projects_live_database(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", folder)
    base = f"t{uuid.uuid4().hex[:10]}"
    config = make_config(
        tmp_path, name_base=base, migrations_dir=folder, seeds_dir=DB_FIXTURES / "seeds"
    )
    allocator = DatabaseAllocator(
        config, make_registry(config), pg_cluster.admin, client=pg_cluster.tcp
    )
    got = allocator.allocate("quality", Owner.current(), seed="empty")
    try:
        assert rows(got.url, "SELECT count(*) FROM accounts") == [(0,)]
        (folder / "0003_tags.sql").write_text("CREATE TABLE tags (name text PRIMARY KEY);")
        allocator.migrate("quality")
        assert rows(got.url, "SELECT count(*) FROM tags") == [(0,)]
        allocator.seed("quality", "default")
        assert rows(got.url, "SELECT count(*) FROM accounts") == [(3,)]
        allocator.seed("quality", "default")  # recorded: not applied twice
        assert rows(got.url, "SELECT count(*) FROM accounts") == [(3,)]
    finally:
        allocator.release_all()
        with psycopg.connect(pg_cluster.admin.conninfo(), autocommit=True) as conn:
            for (name,) in conn.execute(
                "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (base,)
            ).fetchall():
                ident = sql.Identifier(name)
                conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))


def test_two_concurrent_appliers_of_one_database_both_succeed_and_apply_each_file_once(
    scratch: ConnInfo, tmp_path: Path
) -> None:
    import threading

    folder = tmp_path / "migrations"
    folder.mkdir()
    # Slow files: without a lock held across them, both appliers read "nothing applied" and the
    # second fails on the first file (relation exists / duplicate key of the record).
    (folder / "0001_slow.sql").write_text("SELECT pg_sleep(0.3); CREATE TABLE one (id int);")
    (folder / "0002_slow.sql").write_text("SELECT pg_sleep(0.3); CREATE TABLE two (id int);")
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def apply() -> None:
        try:
            barrier.wait(timeout=10)
            SqlDirectoryRunner(folder).apply(scratch)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=apply) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    recorded = rows(scratch, "SELECT name FROM e2e_infra.migrations ORDER BY 1")
    assert recorded == [("0001_slow.sql",), ("0002_slow.sql",)]
