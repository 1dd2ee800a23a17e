"""Unit tests of e2e_infra.postgres.pgerrors: the one table from psycopg errors to the tree."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as sqlerrors

from e2e_infra.conninfo import ConnInfo
from e2e_infra.errors import DatabaseError, MigrationError, ServerUnreachableError
from e2e_infra.postgres.pgerrors import RULES, ErrorContext, Phase, map_errors, to_error

SERVER = ConnInfo(host="db.example", port=5432, user="ci user", password="s3cret", dbname="app")


def test_every_phase_ends_in_a_catch_all() -> None:
    last = {rule.phase: rule for rule in RULES}
    assert all(last[phase].exc is psycopg.Error and last[phase].external is None for phase in Phase)
    bad = to_error(psycopg.ProgrammingError("bad"), ErrorContext(Phase.CONNECT, SERVER))
    assert isinstance(bad, ServerUnreachableError) and "E2E_ADMIN_DATABASE_URL" in str(bad)


def test_an_external_server_is_never_told_to_start_the_local_cluster() -> None:
    refused = psycopg.OperationalError("connection refused")
    external = to_error(refused, ErrorContext(Phase.CONNECT, SERVER, external=True))
    assert external is not None and "pg.start" not in str(external)
    assert "check that this server runs" in str(external)
    local = to_error(refused, ErrorContext(Phase.CONNECT, SERVER, external=False))
    assert local is not None and "invoke pg.start" in str(local)
    no_pw = to_error(
        psycopg.OperationalError("fe_sendauth: no password supplied"),
        ErrorContext(Phase.CONNECT, SERVER, external=True),
    )
    assert no_pw is not None and "check the password" in str(no_pw)


def test_admin_errors_are_one_masked_line_naming_the_fix() -> None:
    context = ErrorContext(
        Phase.ADMIN,
        SERVER,
        action="allocate a database",
        secrets=("other-pw",),
        statement_timeout=9,
    )
    denied = to_error(
        sqlerrors.InsufficientPrivilege("permission denied to create database s3cret"), context
    )
    assert isinstance(denied, DatabaseError)
    line = denied.one_line()
    assert 'ALTER ROLE "ci user" CREATEDB' in line and "could not allocate a database" in line
    assert "s3cret" not in line and "***" in line
    canceled = to_error(sqlerrors.QueryCanceled("canceling statement"), context)
    assert isinstance(canceled, DatabaseError) and "database.build_timeout, 9s" in str(canceled)
    assert "E2E_BUILD_TIMEOUT" in str(canceled)
    applying = ErrorContext(
        Phase.APPLY, SERVER, file="0001_slow.sql", what="migration", statement_timeout=7
    )
    slow = to_error(sqlerrors.QueryCanceled("canceling statement due to timeout"), applying)
    assert isinstance(slow, MigrationError) and slow.file == "0001_slow.sql"
    assert "migration 0001_slow.sql ran past database.build_timeout (7s)" in str(slow)
    lost = to_error(psycopg.OperationalError("server closed the connection other-pw"), context)
    assert isinstance(lost, ServerUnreachableError) and lost.url == SERVER.masked
    assert "other-pw" not in str(lost) and "invoke pg.status" in str(lost)


def test_a_failed_connection_names_the_fix_for_its_cause() -> None:
    context = ErrorContext(Phase.CONNECT, SERVER)
    refused = to_error(psycopg.OperationalError("connection refused"), context)
    assert isinstance(refused, ServerUnreachableError) and "invoke pg.start" in str(refused)
    auth = to_error(
        psycopg.OperationalError('password authentication failed for user "ci user"'), context
    )
    assert auth is not None and "check the user and password" in str(auth)


def test_a_server_of_an_admin_url_is_never_sent_to_the_local_clusters_tasks() -> None:
    external = ConnInfo.parse("postgresql://ci:pw@db.example:5432/postgres")
    assert external.external and not SERVER.external
    refused = to_error(
        psycopg.OperationalError("connection refused"), ErrorContext(Phase.CONNECT, external)
    )
    assert refused is not None and "invoke pg." not in str(refused)
    assert "E2E_ADMIN_DATABASE_URL is up and reachable" in str(refused)
    lost = to_error(
        psycopg.OperationalError("server closed the connection"),
        ErrorContext(Phase.ADMIN, external, action="clean up databases"),
    )
    assert lost is not None and "invoke pg." not in str(lost)


def test_a_session_ended_by_the_server_is_named_as_such_with_no_local_task() -> None:
    for server in (SERVER, ConnInfo.parse("postgresql://ci@db.example/postgres")):
        ended = to_error(
            sqlerrors.AdminShutdown("terminating connection due to administrator command"),
            ErrorContext(Phase.ADMIN, server, action="allocate a database"),
        )
        assert isinstance(ended, ServerUnreachableError)
        assert "a restart, a failover or pg_terminate_backend" in str(ended)
        assert "invoke pg.status" not in str(ended)


def test_a_database_dropped_by_a_concurrent_process_is_its_own_clear_error() -> None:
    context = ErrorContext(Phase.ADMIN, SERVER, action="allocate a database")
    invalid = to_error(
        sqlerrors.ObjectNotInPrerequisiteState('cannot alter invalid database "e2e_db_tpl_x"'),
        context,
    )
    assert isinstance(invalid, DatabaseError) and not isinstance(invalid, ServerUnreachableError)
    assert "was dropping that database at the same moment" in str(invalid)
    assert "lost the connection" not in str(invalid)
    busy = to_error(sqlerrors.ObjectInUse("source database is being accessed"), context)
    assert busy is not None and "pg_stat_activity" in str(busy)
    gone = to_error(sqlerrors.InvalidCatalogName('database "x" does not exist'), context)
    assert gone is not None and "dropped by another process" in str(gone)


def test_a_failing_file_is_a_migration_error_naming_it() -> None:
    context = ErrorContext(Phase.APPLY, SERVER, file="migrations/0002.sql", what="migration")
    with pytest.raises(MigrationError) as info, map_errors(context):
        raise sqlerrors.UndefinedTable('relation "x" does not exist')
    assert info.value.file == "migrations/0002.sql" and info.value.dbname == "app"
    assert str(info.value).startswith("migration migrations/0002.sql failed on database 'app'")
    assert info.value.__suppress_context__  # the raw server text stays out of the traceback


def test_a_bad_connection_option_is_one_line_naming_the_url_setting() -> None:
    with (
        pytest.raises(ServerUnreachableError) as info,
        map_errors(ErrorContext(Phase.CONNECT, SERVER)),
    ):
        raise psycopg.ProgrammingError("invalid connection option s3cret")
    assert "s3cret" not in str(info.value) and "E2E_ADMIN_DATABASE_URL" in str(info.value)


def test_a_role_the_admin_may_not_make_or_hand_over_names_the_privilege_it_needs() -> None:
    context = ErrorContext(Phase.ADMIN, SERVER, action="allocate a database")
    no_createrole = to_error(
        sqlerrors.InsufficientPrivilege("permission denied to create role"), context
    )
    assert no_createrole is not None
    assert 'ALTER ROLE "ci user" CREATEROLE' in no_createrole.one_line()
    for text in ('must be able to SET ROLE "e2e_db_a"', 'must be member of role "e2e_db_a"'):
        no_set = to_error(sqlerrors.InsufficientPrivilege(text), context)
        assert no_set is not None and "createrole_self_grant" in no_set.one_line()
