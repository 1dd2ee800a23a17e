"""The one boundary between psycopg's errors and e2e-infra's exception tree.

Like httpx's ``map_exceptions``: one table (:data:`RULES`) says which psycopg error, met in which
:class:`Phase` of the work, becomes which error of :mod:`e2e_infra.errors`, with the message that
names the fix. Callers wrap their work in :func:`map_errors` (or turn one error with
:func:`to_error`) instead of writing their own ``try``/``except``. Every message is one line, with
the server's URL masked and every known password masked out of the server's text.

The first rule that matches wins, so the specific rows come before the general ones (note that
psycopg's ``QueryCanceled`` is an ``OperationalError``). An error no row matches is re-raised as it
was.
"""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..conninfo import ConnInfo, mask_secrets
from ..errors import DatabaseError, E2EInfraError, MigrationError, ServerUnreachableError

__all__ = ["RULES", "ErrorContext", "Phase", "map_errors", "server_message", "to_error"]

_PLAIN_ROLE = re.compile(r"[a-z][a-z0-9_]*")


class Phase(enum.Enum):
    """What was being done when the error came: the same error means another fix in each."""

    CONNECT = "connect"  # opening a connection
    ADMIN = "admin"  # the tool's own statements: CREATE / DROP / COMMENT ON DATABASE, locks
    APPLY = "apply"  # a user's migration or seed file


@dataclass(frozen=True)
class ErrorContext:
    """What a message may say about the work: the server (by its masked URL), never a password."""

    phase: Phase
    server: ConnInfo
    action: str = ""  # ADMIN: "allocate a database", "clean up databases"...
    secrets: tuple[str | None, ...] = ()  # other passwords in play (the server's is always masked)
    statement_timeout: float | None = None  # ADMIN, APPLY: the connection's statement_timeout
    file: str = ""  # APPLY: the migration or seed file
    what: str = ""  # APPLY: "migration", "seed"
    external: bool | None = None  # CONNECT: the user's own server (True), ours (False), unknown

    def masked_secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.server.password, *self.secrets) if s)


@dataclass(frozen=True)
class Rule:
    """``exc`` raised in ``phase`` (whose text contains ``contains``, lower case; only when the
    connection is gone, with ``lost``) becomes ``error`` with ``message``, formatted with: where
    (the masked URL), action, reason (the server's masked one-line message), user, role (quoted
    when needed), timeout, file, what, dbname."""

    phase: Phase
    exc: type[psycopg.Error]
    error: type[E2EInfraError]
    message: str
    contains: str = ""
    lost: bool = False
    # Only for a server this tool did not start (an admin URL: True) or only for the local
    # cluster (False); None: either. The fix differs: `invoke pg.start` does nothing for the one.
    external: bool | None = None


_ADMIN_FAILED = "PostgreSQL at {where} could not {action}: {reason}; "

RULES: tuple[Rule, ...] = (
    Rule(
        Phase.CONNECT,
        psycopg.OperationalError,
        ServerUnreachableError,
        "cannot connect to PostgreSQL at {where} ({reason}); check the user and password of the "
        "admin URL (E2E_ADMIN_DATABASE_URL)",
        contains="password authentication failed",
    ),
    Rule(
        Phase.CONNECT,
        psycopg.OperationalError,
        ServerUnreachableError,
        "cannot connect to PostgreSQL at {where} ({reason}); check the password of the admin URL "
        "(E2E_ADMIN_DATABASE_URL)",
        contains="no password supplied",
    ),
    Rule(
        Phase.CONNECT,
        psycopg.OperationalError,
        ServerUnreachableError,
        "cannot connect to PostgreSQL at {where} ({reason}); check that this server runs and "
        "accepts connections (that the server of E2E_ADMIN_DATABASE_URL is up and reachable from "
        "this host) and that the URL (E2E_ADMIN_DATABASE_URL / admin_url) is right",
        external=True,
    ),
    Rule(
        Phase.CONNECT,
        psycopg.OperationalError,
        ServerUnreachableError,
        "cannot connect to PostgreSQL at {where} ({reason}); start the local cluster with "
        "`invoke pg.start`, or fix E2E_ADMIN_DATABASE_URL",
    ),
    Rule(
        Phase.CONNECT,
        psycopg.Error,
        ServerUnreachableError,
        "cannot talk to PostgreSQL at {where} ({reason}); check E2E_ADMIN_DATABASE_URL / "
        "admin_url and the server",
    ),
    Rule(
        Phase.APPLY,
        psycopg.OperationalError,
        ServerUnreachableError,
        "lost the connection to PostgreSQL at {where} while applying {file}; check the server "
        "and retry",
        lost=True,
    ),
    Rule(
        Phase.APPLY,
        sqlerrors.QueryCanceled,
        MigrationError,
        "{what} {file} ran past database.build_timeout ({timeout:g}s) on database {dbname!r}: "
        "look for sessions holding the locks it waits on in pg_stat_activity, or raise "
        "database.build_timeout (E2E_BUILD_TIMEOUT)",
    ),
    Rule(
        Phase.APPLY,
        psycopg.Error,
        MigrationError,
        "{what} {file} failed on database {dbname!r}: {reason}; fix the file and retry",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.InsufficientPrivilege,
        DatabaseError,
        _ADMIN_FAILED + "the admin user {user} needs CREATEDB: ALTER ROLE {role} CREATEDB (or "
        "use a superuser in E2E_ADMIN_DATABASE_URL)",
        contains="create database",
    ),
    # Each project database gets a role of its own (databases/roles.py).
    Rule(
        Phase.ADMIN,
        sqlerrors.InsufficientPrivilege,
        DatabaseError,
        _ADMIN_FAILED + "the admin user {user} needs CREATEROLE to give each project database a "
        "role of its own: ALTER ROLE {role} CREATEROLE (or use a superuser in "
        "E2E_ADMIN_DATABASE_URL)",
        contains="create role",
    ),
    *(
        Rule(
            Phase.ADMIN,
            sqlerrors.InsufficientPrivilege,
            DatabaseError,
            _ADMIN_FAILED + "the admin user {user} must be able to act as the project roles it "
            "creates to hand them their databases: on PostgreSQL 16+ ALTER ROLE {role} SET "
            "createrole_self_grant = 'set, inherit' (or use a superuser in "
            "E2E_ADMIN_DATABASE_URL)",
            contains=contains,
        )
        for contains in ("must be able to set role", "must be member of role")
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.InsufficientPrivilege,
        DatabaseError,
        _ADMIN_FAILED + "the admin user {user} lacks a privilege: use a superuser (or the owner "
        "of the e2e databases, with CREATEDB: ALTER ROLE {role} CREATEDB) in "
        "E2E_ADMIN_DATABASE_URL",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.QueryCanceled,
        DatabaseError,
        _ADMIN_FAILED + "a statement ran past statement_timeout (database.build_timeout, "
        "{timeout:g}s): look for sessions holding locks in pg_stat_activity, then retry, or raise "
        "database.build_timeout (E2E_BUILD_TIMEOUT)",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.ObjectNotInPrerequisiteState,
        DatabaseError,
        _ADMIN_FAILED + "another process (a cleanup or a template pruner, maybe on another host) "
        "was dropping that database at the same moment; retry (a template is built again if "
        "needed)",
        contains="invalid database",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.ObjectNotInPrerequisiteState,
        DatabaseError,
        _ADMIN_FAILED + "a database was not in the state this needs (another process changed it "
        "meanwhile); retry",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.ObjectInUse,
        DatabaseError,
        _ADMIN_FAILED + "other sessions use that database: see pg_stat_activity, close them, "
        "then retry",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.LockNotAvailable,
        DatabaseError,
        _ADMIN_FAILED + "a lock was held by another session: see pg_locks, then retry",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.InvalidCatalogName,
        DatabaseError,
        _ADMIN_FAILED + "the database was dropped by another process meanwhile; retry",
    ),
    Rule(
        Phase.ADMIN,
        sqlerrors.AdminShutdown,
        ServerUnreachableError,
        "PostgreSQL at {where} ended the session while trying to {action} ({reason}): a "
        "restart, a failover or pg_terminate_backend; retry once the server accepts connections",
    ),
    Rule(
        Phase.ADMIN,
        psycopg.OperationalError,
        ServerUnreachableError,
        "lost the connection to PostgreSQL at {where} trying to {action} ({reason}); check that "
        "the server of E2E_ADMIN_DATABASE_URL is up and reachable, then retry",
        external=True,
    ),
    Rule(
        Phase.ADMIN,
        psycopg.OperationalError,
        ServerUnreachableError,
        "lost the connection to PostgreSQL at {where} trying to {action} ({reason}); check that "
        "the server is up (`invoke pg.status`) and retry",
    ),
    Rule(
        Phase.ADMIN,
        psycopg.Error,
        DatabaseError,
        _ADMIN_FAILED + "see the server log, then retry (`invoke doctor` checks the setup)",
    ),
)


def server_message(exc: psycopg.Error, secrets: tuple[str, ...]) -> str:
    """The server's message on one line, with its SQLSTATE and position, passwords masked."""
    diag = exc.diag
    text = diag.message_primary or str(exc)
    if diag.sqlstate:
        text += f" [SQLSTATE {diag.sqlstate}]"
    if diag.statement_position and diag.message_primary:
        text += f" at character {diag.statement_position}"
    return " ".join(mask_secrets(text, secrets).split())


def to_error(
    exc: psycopg.Error, context: ErrorContext, *, conn: psycopg.Connection[Any] | None = None
) -> E2EInfraError | None:
    """The error of the tree that ``exc`` becomes in ``context`` (RULES), or None if no rule
    matches. ``conn``: the connection it came from, for the rules that need it gone."""
    reason = server_message(exc, context.masked_secrets())
    lost = conn is not None and conn.closed
    for rule in RULES:
        if rule.phase is not context.phase or not isinstance(exc, rule.exc):
            continue
        if (rule.contains and rule.contains not in reason.lower()) or (rule.lost and not lost):
            continue
        external = context.server.external if context.external is None else context.external
        if rule.external is not None and rule.external is not external:
            continue
        user = context.server.user
        role = user if _PLAIN_ROLE.fullmatch(user) else sql.Identifier(user).as_string(None)
        message = rule.message.format(
            where=context.server.masked,
            action=context.action,
            reason=reason,
            user=user,
            role=role,
            timeout=context.statement_timeout or 0.0,
            file=context.file,
            what=context.what,
            dbname=context.server.dbname,
        )
        return _build(rule.error, message, context)
    return None


def _build(error: type[E2EInfraError], message: str, context: ErrorContext) -> E2EInfraError:
    if issubclass(error, ServerUnreachableError):
        return error(message, url=context.server.masked)
    if issubclass(error, MigrationError):
        return error(message, file=context.file, dbname=context.server.dbname)
    return error(message)


@contextlib.contextmanager
def map_errors(
    context: ErrorContext, *, conn: psycopg.Connection[Any] | None = None
) -> Iterator[None]:
    """Raise the error of the tree (see :func:`to_error`) for a psycopg error from the body."""
    try:
        yield
    except psycopg.Error as exc:
        error = to_error(exc, context, conn=conn)
        if error is None:
            raise
        if context.phase is Phase.ADMIN:
            raise error from exc
        raise error from None  # the server's raw text stays out of the traceback
