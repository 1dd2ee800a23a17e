"""Least privilege: each project database is owned by, and handed out with, a login role of its own.

The role has the database's name (role and database names live in separate catalogs, so a
database and its role are renamed together when a warm spare is claimed) and is neither a
superuser nor allowed to create databases or roles, replicate or bypass row security. It is the
database's owner and the only role besides the admin with ``CONNECT`` on it (``REVOKE ALL ... FROM
PUBLIC`` on every database the tool makes, templates and spares included), so one project cannot
reach another's database, and nothing it runs can ``COPY ... TO PROGRAM``.

The admin (a superuser, as a rule) never runs SQL inside a database a project role can reach, and
never runs anything a project could have made: a trigger or function runs with the rights of
whoever fires it, so one fired by a superuser could ``COPY ... TO PROGRAM``. So:

* **A template is built by a role of its own.** The build database gets a login role named after
  it, like a project's (same attributes, a member of the group below, the owner of the build
  database while it is built, a password from the key and the build's lease), and the migrations
  and seeds run connected as that role: a ``migrate_command`` gets its URL, never the admin's.
  Before they run, no other session is connected to the build database (``REVOKE`` from PUBLIC,
  then the others' sessions ended) and the admin creates the tool's bookkeeping there
  (:data:`~e2e_infra.migrations.BOOKKEEPING`: a schema the admin owns; the group gets ``USAGE``
  and ``SELECT, INSERT`` on the table, so no project role can put a trigger, rule or policy on it,
  change, delete or drop it). After them, the admin takes the database back, ``REASSIGN OWNED`` the
  role's objects to the group and drops the role (:meth:`Roles.prepare_build`,
  :meth:`Roles.finish_build`).
* **Objects of a clone belong to the group** (``<base>__projects``, ``NOLOGIN``), of which every
  project role is a member (``INHERIT``): the project role owns, in effect, the tables, sequences
  and functions of its clone, with nothing to do per allocation but ``CREATE ROLE`` and the grants
  on the database itself. Membership reaches no further than the databases a role may connect to:
  its own.
* **A live database is migrated and seeded as its project's role** (``db.migrate``, ``db.seed``:
  see the allocator), so what the project planted there runs with the project's own rights.
* **Admin connections pin** ``search_path`` to ``pg_catalog`` (see
  :data:`~e2e_infra.migrations.ADMIN_OPTIONS`), and what the admin runs from its own database
  (``CREATE``/``ALTER``/``DROP``/``COMMENT ON DATABASE``, ``CREATE``/``DROP ROLE``) executes no
  object inside the project's database. Event triggers, the one object that could fire there, only
  a superuser can create.
* **On the embedded cluster** (the tool's own server) PUBLIC has no ``CONNECT`` on ``postgres`` and
  ``template1`` (:meth:`Roles.lock_down_server`): the database where the tool's advisory locks live
  is out of the project roles' reach (advisory locks are per database, so the locks a project takes
  in its own database are not ours). On a shared server that is its administrator's decision (see
  docs/scale-out.md).

Every role the tool makes carries a marker (``COMMENT ON ROLE ... IS 'e2e-infra {json}'``, kind
``role`` or ``group``, and the name base); a role without it is never altered or dropped. A
project role is created in the same transaction that marks its database, and dropped right after
it (``DROP OWNED BY``, ``DROP ROLE``); ``cleanup`` also drops a marked role whose database is gone
(a drop that failed half-way).

Passwords: 32 bytes of HMAC-SHA256 under a random key kept in ``<state_dir>/db-roles.key`` (0600,
made with :mod:`secrets`), over the lease id and the role name: random to anyone without the key,
yet ``db.url`` finds it again, and no password is ever stored in the registry. The server gets a
SCRAM verifier computed here, never the password: it appears in no server log or
``pg_stat_activity``.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..conninfo import ConnInfo
from ..errors import DatabaseError, FolderError
from ..resources.leases import Lease
from .markers import MARKER_PREFIX, TOOL, parse_marker
from .migrations import BOOKKEEPING, bookkeeping_sql, connect
from .names import ident

if TYPE_CHECKING:
    from .catalog import Catalog

__all__ = ["Roles", "scram_verifier"]

log = logging.getLogger("e2e_infra")

KEY_FILE = "db-roles.key"
ROLE = "role"
GROUP = "group"
# The password is 256 random bits: key stretching adds nothing against guessing it, and every
# connection of a project pays the iterations again on the client (4096, the default, is ~2.5 ms
# in Python at allocation and again in libpq at each connect).
SCRAM_ITERATIONS = 256
_ATTRIBUTES = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"


def scram_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS) -> str:
    """The ``SCRAM-SHA-256`` verifier PostgreSQL stores for ``password`` (RFC 5803 format), so the
    password itself never reaches the server (``password`` is ASCII: SASLprep leaves it as is)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def group_name(base: str) -> str:
    """``<base>__projects``: never a database name of ours (a project name starts with a
    letter)."""
    return f"{base}__projects"


class Roles:
    """Make, hand out and drop the login roles of one name base's project databases."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.base = catalog.base
        self.group = group_name(self.base)
        self._key: bytes | None = None

    # --- markers -------------------------------------------------------------------------------

    def marker(self, kind: str) -> str:
        data = {"base": self.base, "kind": kind, "tool": TOOL}
        return MARKER_PREFIX + json.dumps(data, sort_keys=True, separators=(",", ":"))

    def ours(self, comment: str | None, kind: str = ROLE) -> bool:
        data = parse_marker(comment)
        return data is not None and data.get("base") == self.base and data.get("kind") == kind

    # --- passwords and URLs --------------------------------------------------------------------

    def password(self, lease: Lease) -> str:
        """The password of the lease's role (see the module)."""
        message = f"{lease.id}\0{lease.resource}".encode()
        digest = hmac.new(self._read_key(), message, "sha256").digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def url(self, lease: Lease) -> ConnInfo:
        """What the project gets: the client URL with the lease's role, password and database."""
        name = lease.resource
        return replace(self.catalog.client, user=name, dbname=name, password=self.password(lease))

    def masked_url(self, name: str) -> str:
        """The URL of database ``name`` as its project gets it, password masked: for output."""
        return replace(self.catalog.client, user=name, dbname=name, password="x").masked

    def login(self, lease: Lease) -> sql.Composable:
        """``LOGIN PASSWORD '<verifier>'`` for the lease's role."""
        verifier = scram_verifier(self.password(lease))
        return sql.SQL("LOGIN PASSWORD {}").format(sql.Literal(verifier))

    def _read_key(self) -> bytes:
        if self._key is None:
            path = Path(self.catalog.registry.state_dir) / KEY_FILE
            try:
                self._key = path.read_bytes() if path.exists() else _make_key(path)
            except OSError as exc:
                raise FolderError(
                    f"cannot read or create {path} ({exc.strerror}): the key of the database "
                    "roles' passwords; check the state folder's permissions",
                    path=str(path),
                ) from None
        return self._key

    # --- making --------------------------------------------------------------------------------

    def ensure_group(self, conn: psycopg.Connection[Any]) -> None:
        """Create the group role of this name base if it is missing (idempotent, race-safe)."""
        for _attempt in range(2):
            row = conn.execute(
                "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
                (self.group,),
            ).fetchone()
            if row is not None:
                if not self.ours(row[0], GROUP):
                    raise self._not_ours(self.group)
                return
            statement = sql.SQL("CREATE ROLE {} NOLOGIN {}; COMMENT ON ROLE {} IS {}").format(
                ident(self.group),
                sql.SQL(_ATTRIBUTES),
                ident(self.group),
                sql.Literal(self.marker(GROUP)),
            )
            try:
                conn.execute(statement)
                return
            except (sqlerrors.DuplicateObject, sqlerrors.UniqueViolation):
                continue  # another builder made it meanwhile: check it is ours

    def prepare_build(self, conn: psycopg.Connection[Any], name: str) -> None:
        """Build database ``name`` has its role (:meth:`make`, which revoked PUBLIC's ``CONNECT``):
        end every other session on it (one that connected before the revoke), then, as the admin
        and before the role runs anything there, create the tool's bookkeeping, which the group
        may read and add to and nothing more."""
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        schema, table = (sql.Identifier(part) for part in BOOKKEEPING)
        group = ident(self.group)
        statement = sql.SQL("; ").join(
            [
                bookkeeping_sql(),
                sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                    schema, sql.Literal(f"{MARKER_PREFIX}bookkeeping: applied migrations and seeds")
                ),
                sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema),
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, group),
                sql.SQL("GRANT SELECT, INSERT ON {}.{} TO {}").format(schema, table, group),
            ]
        )
        target = self.catalog.admin.with_dbname(name)
        with contextlib.closing(connect(target, purpose="template setup", admin=True)) as db:
            db.execute(statement)

    def finish_build(self, conn: psycopg.Connection[Any], name: str) -> None:
        """Build database ``name`` is migrated and seeded (and nobody is connected to it): the
        tool's owner takes it back, the group gets what the build role made, and the role goes."""
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                ident(name), sql.Identifier(self.catalog.client.user)
            )
        )
        target = self.catalog.admin.with_dbname(name)
        with contextlib.closing(connect(target, purpose="template owner", admin=True)) as db:
            # DROP OWNED after REASSIGN: only the privileges and default privileges of the role.
            db.execute(
                sql.SQL("REASSIGN OWNED BY {role} TO {group}; DROP OWNED BY {role}").format(
                    role=ident(name), group=ident(self.group)
                )
            )
        self.drop(conn, name)

    def lock_down_server(self, conn: psycopg.Connection[Any]) -> None:
        """On the embedded cluster only (the tool's own server): take ``CONNECT`` on ``postgres``,
        ``template1`` and the admin's database from PUBLIC, so that no project role reaches the
        database of the tool's advisory locks. Superusers connect regardless. Only when granted:
        the statement rewrites a catalog row, which two builders must not do at once."""
        names = sorted({"postgres", "template1", self.catalog.admin.dbname})
        rows = conn.execute(
            "SELECT d.datname FROM pg_database d WHERE d.datname = ANY(%s) AND EXISTS ("
            "SELECT 1 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a "
            "WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT')",
            (names,),
        ).fetchall()
        for (name,) in rows:
            try:
                conn.execute(
                    sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                        sql.Identifier(str(name))
                    )
                )
            except sqlerrors.InternalError_ as exc:
                if "concurrently" not in str(exc):
                    raise  # not another builder revoking it at the same moment

    def statements(self, name: str, login: sql.Composable | None) -> sql.Composable:
        """What makes database ``name`` a project's: its role (``login``: ``LOGIN PASSWORD ...``;
        None for a spare, which gets it when claimed), marked, in the group, owning the database,
        which only it (and the admin) may connect to. Sent with the database's marker, in one
        implicit transaction: a marked database always has its role."""
        role = ident(name)
        return sql.SQL(
            "CREATE ROLE {role} {login} {attributes} IN ROLE {group}; "
            "COMMENT ON ROLE {role} IS {marker}; "
            "ALTER DATABASE {role} OWNER TO {role}; "
            "REVOKE ALL ON DATABASE {role} FROM PUBLIC; "
            "GRANT CONNECT, TEMPORARY ON DATABASE {role} TO {role}"
        ).format(
            role=role,
            login=login if login is not None else sql.SQL("NOLOGIN"),
            attributes=sql.SQL(_ATTRIBUTES),
            group=ident(self.group),
            marker=sql.Literal(self.marker(ROLE)),
        )

    def make(
        self,
        conn: psycopg.Connection[Any],
        name: str,
        marker_sql: sql.Composable,
        login: sql.Composable | None,
    ) -> None:
        """Give database ``name`` its role and mark it (``marker_sql``), atomically. A marked role
        of that name is a leftover (its database was dropped before it): dropped first. A role the
        tool did not make is never touched: DatabaseError."""
        statement = sql.SQL("; ").join([self.statements(name, login), marker_sql])
        try:
            conn.execute(statement)
            return
        except sqlerrors.DuplicateObject:
            pass
        except sqlerrors.UndefinedObject:
            # The group is gone (made by an older version, or dropped by hand): make it again.
            self.ensure_group(conn)
            conn.execute(statement)
            return
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchone()
        if row is not None and not self.ours(row[0]):
            raise self._not_ours(name)
        log.info("dropping role %s, left behind by an earlier database of that name", name)
        self.drop(conn, name)
        conn.execute(statement)

    @staticmethod
    def claim_statements(spare: str, name: str, login: sql.Composable) -> sql.Composable:
        """Rename the spare's role with it and let it log in (the spare made it ``NOLOGIN``)."""
        return sql.SQL("ALTER ROLE {} RENAME TO {}; ALTER ROLE {} {}").format(
            ident(spare), ident(name), ident(name), login
        )

    # --- dropping ------------------------------------------------------------------------------

    def drop(self, conn: psycopg.Connection[Any], name: str) -> bool:
        """Drop the role of database ``name`` (after the database) if it is ours; idempotent.
        False, logged, when something outside that database still depends on it."""
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchone()
        if row is None or not self.ours(row[0]):
            return row is None
        role = ident(name)
        try:
            try:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
            except sqlerrors.DependentObjectsStillExist:
                # It made or was granted something in the admin's database (what it had in its
                # own went with it): DROP OWNED only then, it scans the shared dependencies.
                conn.execute(sql.SQL("DROP OWNED BY {}; DROP ROLE IF EXISTS {}").format(role, role))
        except sqlerrors.UndefinedObject:
            return True  # dropped meanwhile (another cleanup)
        except sqlerrors.DependentObjectsStillExist as exc:
            log.warning(
                "could not drop role %s: %s; `invoke db.cleanup` tries again",
                name,
                " ".join((exc.diag.message_primary or "objects depend on it").split()),
            )
            return False
        return True

    def drop_orphans(self, conn: psycopg.Connection[Any]) -> builtins.list[tuple[str, str]]:
        """Drop our marked roles whose database is gone (a drop interrupted between the two)."""
        rows = conn.execute(
            "SELECT r.rolname, shobj_description(r.oid, 'pg_authid') FROM pg_roles r "
            "WHERE shobj_description(r.oid, 'pg_authid') LIKE 'e2e-infra %' "
            "AND NOT EXISTS (SELECT 1 FROM pg_database d WHERE d.datname = r.rolname)"
        ).fetchall()
        dropped = []
        for name, comment in rows:
            if self.ours(comment) and self.drop(conn, str(name)):
                why = "the role of a database that is gone"
                log.info("dropped role %s: %s", name, why)
                dropped.append((str(name), why))
        return dropped

    @staticmethod
    def _not_ours(name: str) -> DatabaseError:
        return DatabaseError(
            f"a role named {name} exists on the server and e2e-infra did not make it (no marker); "
            "drop or rename it, or choose another database.name_base",
            dbname=name,
        )


def _make_key(path: Path) -> bytes:
    """A new random key at ``path`` (0600), published atomically; another process's if it won."""
    key = secrets.token_bytes(32)
    tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if another process published one first
        except FileExistsError:
            key = path.read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return key
