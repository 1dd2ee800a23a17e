"""What every part of the allocator does on the server: find our marked databases, clone, drop,
settle a CREATE whose outcome is unknown, and drop what a maker that died before marking left.

:class:`Catalog` also carries what those parts share (the config, the registry, the admin and
client URLs, the clock) and the allocator's one error boundary (:meth:`Catalog.errors`).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import pq, sql

from ..clock import Clock, wait_until
from ..config import Config
from ..conninfo import ConnInfo
from ..errors import CloneError, DeadlineExceeded, E2EInfraError
from ..postgres.pgerrors import ErrorContext, Phase, map_errors
from ..resources.leases import Lease, Owner, Registry
from .admin import AdminConnections
from .markers import Kind, MarkedDatabase, Marker
from .names import ident
from .roles import Roles

__all__ = ["Catalog"]

log = logging.getLogger("e2e_infra")

_MARKED_SQL = (
    "SELECT d.datname, shobj_description(d.oid, 'pg_database'), d.datistemplate{extra}, d.oid "
    "FROM pg_database d WHERE shobj_description(d.oid, 'pg_database') LIKE 'e2e-infra %'"
)
# What a stale lease of each kind was making, for the log.
_HALF_MADE = {
    Kind.DATABASE.value: "half-made database",
    Kind.SPARE.value: "half-made spare",
    Kind.BUILDING.value: "half-built template",
}


class Catalog:
    """Our databases on one server, and the operations every part of the allocator uses."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        connections: AdminConnections,
        *,
        client: ConnInfo,
        clock: Clock,
        shared: bool,
    ) -> None:
        self.config = config
        self.registry = registry
        self.connections = connections
        self.admin = connections.info
        self.client = client
        self.clock = clock
        self.shared = shared
        self.base = config.database.name_base
        self.roles = Roles(self)  # each project database's own login role

    @property
    def build_timeout(self) -> float:
        return self.connections.statement_timeout

    def errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        """The library edge of a public method: a psycopg error that nothing handled becomes a
        masked one-line error of the tree naming the fix (see
        :mod:`e2e_infra.postgres.pgerrors`)."""
        context = ErrorContext(
            Phase.ADMIN,
            self.admin,
            action=action,
            secrets=(self.client.password,),
            statement_timeout=self.build_timeout,
        )
        return map_errors(context)

    # --- reading -----------------------------------------------------------------------------

    def marked(
        self, conn: psycopg.Connection[Any], *, size: bool = False
    ) -> builtins.list[MarkedDatabase]:
        """Every database with a marker of our name base."""
        extra = ", pg_database_size(d.oid)" if size else ", NULL::bigint"
        rows = conn.execute(_MARKED_SQL.format(extra=extra).encode()).fetchall()
        out = []
        for name, comment, is_template, nbytes, oid in rows:
            marker = Marker.parse(comment)
            if marker is not None and marker.base == self.base:
                out.append(MarkedDatabase(name, marker, bool(is_template), nbytes, int(oid)))
        return out

    @staticmethod
    def major(conn: psycopg.Connection[Any]) -> int:
        return conn.info.server_version // 10000

    def strategy(self, fsync: str, major: int) -> str | None:
        """The ``STRATEGY`` of ``CREATE DATABASE``: ``clone_strategy``, or by ``fsync``."""
        if major < 15:
            return None  # no STRATEGY clause before PostgreSQL 15
        choice = self.config.database.clone_strategy
        if choice == "auto":
            # Measured here: fsync off, FILE_COPY clones 12-15 ms vs 17-23 ms for WAL_LOG (and 8 at
            # once 45-55 ms vs 200-440 ms); fsync on, FILE_COPY forces checkpoints and WAL_LOG wins.
            return "FILE_COPY" if fsync.lower() in {"off", "false", "0"} else "WAL_LOG"
        return choice.upper()

    def owner_clause(self) -> sql.Composable:
        if self.client.user != self.admin.user:
            return sql.SQL(" OWNER {}").format(sql.Identifier(self.client.user))
        return sql.SQL("")

    # --- making and dropping -----------------------------------------------------------------

    def create(
        self, conn: psycopg.Connection[Any], name: str, template: str, strategy: str | None
    ) -> None:
        """``CREATE DATABASE name TEMPLATE template``, retried while the template is busy;
        :class:`CloneError` names the sessions that kept it busy for ``clone_timeout``."""
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}{}{}").format(
            ident(name),
            ident(template),
            self.owner_clause(),
            sql.SQL(f" STRATEGY {strategy}" if strategy in {"FILE_COPY", "WAL_LOG"} else ""),
        )

        def attempt() -> bool | None:
            try:
                conn.execute(statement)
            except sqlerrors.ObjectInUse:
                # "source database ... is being accessed by other users": transient, retry.
                return None
            return True

        timeout = self.config.database.clone_timeout
        try:
            wait_until(attempt, timeout=timeout, what=f"cloning {template}", clock=self.clock)
        except DeadlineExceeded:
            rows = conn.execute(
                "SELECT pid, application_name, coalesce(client_addr::text, 'local socket') "
                "FROM pg_stat_activity WHERE datname = %s",
                (template,),
            ).fetchall()
            blockers = [
                f"pid {pid} ({app or 'no application_name'}, {client})" for pid, app, client in rows
            ]
            raise CloneError(
                f"template {template} stayed busy for {timeout:g}s while cloning {name}; "
                f"sessions connected to it: {', '.join(blockers) or 'none left'}; close them "
                f"(or `SELECT pg_terminate_backend(pid)`) and retry, or raise clone_timeout",
                dbname=name,
                template=template,
                blockers=blockers,
            ) from None

    def mark(self, conn: psycopg.Connection[Any], name: str, marker: Marker) -> None:
        conn.execute(marker.comment_sql(name))

    def drop(self, conn: psycopg.Connection[Any], name: str, *, template: bool = False) -> bool:
        """Drop ``name`` if it exists, ending its sessions; idempotent. True if this call dropped
        it; False if it was gone (or another process was dropping it: "invalid database")."""
        name_sql = ident(name)
        gone = (sqlerrors.InvalidCatalogName, sqlerrors.ObjectNotInPrerequisiteState)
        if template:
            try:
                conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(name_sql))
            except (*gone, sqlerrors.UndefinedObject):
                return False
        try:
            if self.major(conn) >= 13:
                # FORCE terminates the sessions still connected (a leaked pool, a debugger).
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name_sql))
            else:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
                conn.execute(sql.SQL("DROP DATABASE {}").format(name_sql))
        except gone:
            dropped = False
        else:
            dropped = True
        # After its database, the owner goes last: a project's role, or a build's (a template's
        # name never has one: it is dropped before the build is published).
        self.roles.drop(conn, name)
        return dropped

    def settle(
        self, conn: psycopg.Connection[Any], backend: int, name: str, *, template: bool = False
    ) -> bool:
        """Make sure ``name``, whose CREATE DATABASE was sent on ``conn`` (backend pid
        ``backend``), does not exist; False (logged) when that could not be proven.

        An idle connection drops it itself. A busy one (an exception raised by a signal handler
        leaves the CREATE running: "another command is already in progress") or a broken one is
        settled from a new connection: end its backend, wait until it is gone (a CREATE that
        committed is visible then, one that did not was rolled back), drop the name."""
        if not conn.closed and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                self.drop(conn, name, template=template)
                return True
        try:
            with self.connections.lend() as fresh:
                if backend:
                    fresh.execute("SELECT pg_terminate_backend(%s)", (backend,))

                    def gone() -> bool:
                        row = fresh.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)
                        ).fetchone()
                        return row is not None and row[0] == 0

                    wait_until(  # real time: a real backend is ending
                        gone,
                        timeout=self.config.database.clone_timeout,
                        what=f"the end of the session that was creating database {name}",
                    )
                self.drop(fresh, name, template=template)
        except Exception as exc:
            line = exc.one_line() if isinstance(exc, E2EInfraError) else str(exc).strip()
            log.warning(
                "could not make sure database %s was not left behind (%s); its lease stays, so "
                "`invoke db.cleanup` drops it once this process is gone",
                name,
                " ".join(line.split()),
            )
            return False
        finally:
            with contextlib.suppress(Exception):
                conn.close()  # its backend is gone (or the connection was unusable anyway)
        return True

    # --- the leases of databases being made ----------------------------------------------------

    @staticmethod
    def making(registry: Registry, kind: str, name: str, project: str, owner: Owner) -> Lease:
        """Record the lease of a database about to be made (a spare, a template being built):
        if the maker dies between CREATE and COMMENT, it proves that the name is ours."""
        with registry.transaction() as txn:
            return txn.add(Lease(kind=kind, resource=name, project=project, owner=owner))

    @staticmethod
    def forget(registry: Registry, lease: Lease) -> None:
        with registry.transaction() as txn:
            txn.remove(lease)

    def drop_half_made(
        self,
        conn: psycopg.Connection[Any],
        marked: set[str],
        *,
        kinds: frozenset[str] = frozenset(_HALF_MADE),
        prefix: str = "",
        lock_free: Callable[[str], bool] | None = None,
    ) -> builtins.list[tuple[str, str]]:
        """For each stale lease of ``kinds`` (owner proven gone) that names no marked database of
        ours: drop the database of that exact name if it exists unmarked (its maker died between
        CREATE and COMMENT), then forget the lease. On a shared server a database lease's name
        must also be free of any owner's lock (``lock_free``). ``marked``: the marked names."""
        with self.registry.transaction() as txn:
            candidates = [
                (lease, why)
                for lease, why in txn.stale()
                if lease.kind in kinds and lease.resource.startswith(prefix)
            ]
        if not candidates:
            return []
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname = ANY(%s)",
            ([lease.resource for lease, _ in candidates],),
        ).fetchall()
        comments = {str(name): comment for name, comment in rows}
        dropped: builtins.list[tuple[str, str]] = []
        forget: builtins.list[Lease] = []
        for lease, why in candidates:
            name = lease.resource
            if name in marked:
                if lease.kind != Kind.DATABASE:
                    forget.append(lease)  # marked: the marker's own rules apply from now on
                continue
            if name in comments and comments[name] is None:
                shared_name = self.shared and lease.kind == Kind.DATABASE
                if shared_name and (lock_free is None or not lock_free(name)):
                    continue  # someone (another host?) holds that name: not proven ours
                if not self.drop(conn, name, template=lease.kind == Kind.BUILDING):
                    forget.append(lease)  # gone meanwhile: nothing dropped here
                    continue
                what = _HALF_MADE[lease.kind]
                reason = f"{what}, unmarked, named by the lease of a dead owner: {why}"
                log.info("dropped %s: %s", name, reason)
                dropped.append((name, reason))
            # Gone, just dropped, or marked by something else (not ours): only a record now.
            forget.append(lease)
        with self.registry.transaction() as txn:
            for lease in forget:
                txn.remove(lease)
        return dropped
