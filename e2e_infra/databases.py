"""Isolated databases cloned from fingerprinted templates, with marked ownership.

* The **fingerprint** hashes everything that shapes the data: the migration and seed inputs (file
  names and contents, or command strings and the files they name), the seed profile, the server's
  major version and :data:`TEMPLATE_FORMAT_VERSION`.
* The **template** of a fingerprint (``<base>_tpl_<seed>_<fp[:12]>``) is built once under a
  session advisory lock held on its own connection: created as ``<base>_build_<fp[:12]>_<pid>``
  (marked ``building`` with the builder's host, pid and start time), migrated, seeded, marked
  ``IS_TEMPLATE true, ALLOW_CONNECTIONS false`` and only then published by rename. A half-built
  template is dropped on failure, and by the next builder or ``cleanup`` if its builder died.
* A **database** for a project is a clone of the template named ``<base>_<project>`` (or
  ``<base>_<project>_<suffix>`` while another live lease holds that name), recorded as a lease of
  kind ``database`` and marked with ``COMMENT ON DATABASE ... IS 'e2e-infra {json}'``.
  :meth:`DatabaseAllocator.cleanup` drops only marked databases whose owner is proven gone (or
  whose keep expired), never an unmarked one.

All SQL names are validated and composed with :class:`psycopg.sql.Identifier`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from .clock import Clock, SystemClock, wait_until
from .config import Config, validate_name
from .conninfo import ConnInfo
from .errors import (
    CloneError,
    DatabaseError,
    DatabaseLimitError,
    DatabaseNotFoundError,
    DeadlineExceeded,
    InvalidNameError,
    RegistryError,
    UsageError,
)
from .leases import Lease, Owner, Registry, Transaction, process_start_time
from .migrations import Runner, connect, migration_runner, seed_runner

if TYPE_CHECKING:
    from .ports import PortAllocator

__all__ = [
    "MARKER_PREFIX",
    "TEMPLATE_FORMAT_VERSION",
    "AllocatedDatabase",
    "DatabaseAllocator",
    "DatabaseInfo",
    "database_allocator",
    "database_name",
    "fingerprint",
    "parse_marker",
    "template_name",
    "validate_dbname",
]

log = logging.getLogger("e2e_infra")

TEMPLATE_FORMAT_VERSION = 1
MARKER_PREFIX = "e2e-infra "
TOOL = "e2e-infra"
LEASE_KIND = "database"
_DBNAME = re.compile(r"[a-z][a-z0-9_]*")
_MAX_IDENTIFIER = 63  # bytes; PostgreSQL truncates longer names silently
_START_TIME_TOLERANCE = 0.05

_MARKED_SQL = (
    "SELECT d.datname, shobj_description(d.oid, 'pg_database'), d.datistemplate{extra} "
    "FROM pg_database d WHERE shobj_description(d.oid, 'pg_database') LIKE 'e2e-infra %'"
)


def validate_dbname(name: str) -> str:
    """Return ``name`` if it is a database name we may create (``[a-z][a-z0-9_]*``, <= 63)."""
    if not isinstance(name, str) or not _DBNAME.fullmatch(name) or len(name) > _MAX_IDENTIFIER:
        raise InvalidNameError(
            f"invalid database name {str(name)[:80]!r}: use at most 63 characters, a lowercase "
            "letter first, then lowercase letters, digits or '_'",
            kind="database",
            value=name,
        )
    return name


def fingerprint(migrations: Runner, seed: Runner, seed_profile: str, server_major: int) -> str:
    """sha256 hex of everything that shapes a template's data."""
    digest = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        head = label.encode("utf-8")
        digest.update(len(head).to_bytes(4, "big") + head + len(data).to_bytes(8, "big") + data)

    put("format", str(TEMPLATE_FORMAT_VERSION).encode())
    put("server_major", str(server_major).encode())
    put("seed_profile", seed_profile.encode())
    for role, runner in (("migrations", migrations), ("seed", seed)):
        # The kind of runner is part of the data: the same files run by other code may differ.
        put(f"{role}.runner", type(runner).__name__.encode())
        for name, content in runner.inputs():
            put(f"{role}:{name}", content)
    return digest.hexdigest()


def template_name(base: str, seed: str, fp: str) -> str:
    """``<base>_tpl_<seed>_<fp[:12]>``; the seed part is shortened to fit 63 bytes (the
    fingerprint covers the full seed name, so names stay unique)."""
    room = _MAX_IDENTIFIER - len(base) - len("_tpl__") - 12
    return validate_dbname(f"{base}_tpl_{seed[: max(room, 1)]}_{fp[:12]}")


def database_name(base: str, project: str, suffix: str = "") -> str:
    """``<base>_<project>`` or, with a suffix, ``<base>_<project>_<suffix>`` within 63 bytes."""
    name = f"{base}_{project}"
    if suffix:
        name = f"{name[: _MAX_IDENTIFIER - len(suffix) - 1]}_{suffix}"
    return validate_dbname(name)


def parse_marker(comment: str | None) -> dict[str, Any] | None:
    """The marker's data if ``comment`` is an e2e-infra marker, else None."""
    if not comment or not comment.startswith(MARKER_PREFIX):
        return None
    try:
        data = json.loads(comment[len(MARKER_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return None
    return data


def _advisory_key(fp: str) -> int:
    return int.from_bytes(bytes.fromhex(fp[:16]), "big", signed=True)


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(validate_dbname(name))


@dataclass(frozen=True)
class AllocatedDatabase:
    name: str
    project: str
    seed: str
    template: str
    url: ConnInfo  # the client ConnInfo with dbname set: what DATABASE_URL gets
    lease: Lease


@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    project: str | None
    kind: str  # database | kept | template | building
    size: int | None  # bytes
    status: str  # live | stale: <why> | kept until <time> | ready | building | abandoned | ...
    owner_pid: int | None
    run_id: str | None
    created_at: float | None
    keep_until: float | None
    seed: str | None
    template: str | None


@dataclass(frozen=True)
class _Marked:
    name: str
    marker: dict[str, Any]
    is_template: bool
    size: int | None = None

    @property
    def kind(self) -> str:
        return str(self.marker.get("kind", ""))

    def owner_gone(self, host: str) -> str | None:
        """Why the process named in the marker is proven gone, or None."""
        pid, start = self.marker.get("pid"), self.marker.get("start")
        if self.marker.get("host") != host or not isinstance(pid, int):
            return None
        now_start = process_start_time(pid)
        if now_start is None:
            return f"owner pid {pid} is gone"
        if isinstance(start, (int, float)) and abs(now_start - start) > _START_TIME_TOLERANCE:
            return f"owner pid {pid} was reused by another process"
        return None


class DatabaseAllocator:
    """Allocates, releases, lists and sweeps the isolated databases of one configuration."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        admin: ConnInfo,
        *,
        client: ConnInfo | None = None,
        clock: Clock | None = None,
        build_timeout: float = 600.0,
    ) -> None:
        self.config = config
        self.registry = registry
        self.admin = admin
        self.client = client or admin
        self.clock = clock or SystemClock()
        self.build_timeout = build_timeout
        self.base = config.database.name_base

    # --- public API ------------------------------------------------------------------------------

    def allocate(self, project: str, owner: Owner, *, seed: str | None = None) -> AllocatedDatabase:
        """Clone the template of ``seed`` (default: the project's) into a database of its own."""
        validate_name(project, "project")
        seed = seed or self._project_seed(project)
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        with self._admin() as conn:
            major = self._major(conn)
            fp = fingerprint(migrations, seeds, seed, major)
            template = template_name(self.base, seed, fp)
            # One round trip: the clone strategy, whether the template is ready, the live count.
            row = conn.execute(
                "SELECT current_setting('fsync'), "
                "(SELECT datistemplate AND NOT datallowconn FROM pg_database WHERE datname = %s), "
                "(SELECT count(*) FROM pg_database d WHERE NOT d.datistemplate "
                " AND shobj_description(d.oid, 'pg_database') LIKE 'e2e-infra %%')",
                (template,),
            ).fetchone()
            assert row is not None
            fsync, ready, marked = row
            if not ready:
                self._ensure(conn, template, fp, seed, migrations, seeds, rebuild=False)
            lease = self._reserve(project, owner, template, seed, int(marked))
            strategy = self._strategy(str(fsync), major)
            try:
                try:
                    lease = self._clone(conn, lease, template, strategy)
                except pgerrors.InvalidCatalogName:
                    # The template was dropped between our check and the clone (pruned or rebuilt
                    # by another process): build it again, once.
                    self._ensure(conn, template, fp, seed, migrations, seeds, rebuild=False)
                    lease = self._clone(conn, lease, template, strategy)
            except BaseException:
                with self.registry.transaction() as txn:
                    txn.remove(lease)
                raise
        return AllocatedDatabase(
            name=lease.resource,
            project=project,
            seed=seed,
            template=template,
            url=self.client.with_dbname(lease.resource),
            lease=lease,
        )

    def ensure_template(self, seed: str, *, rebuild: bool = False) -> str:
        """Build the template of ``seed`` for the current migrations if needed; its name."""
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        with self._admin() as conn:
            fp = fingerprint(migrations, seeds, seed, self._major(conn))
            template = template_name(self.base, seed, fp)
            self._ensure(conn, template, fp, seed, migrations, seeds, rebuild=rebuild)
        return template

    def release(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        run_id: str | None = None,
        keep: bool = False,
    ) -> builtins.list[str]:
        """Drop the selected leased databases (or keep them for ``keep_hours``); idempotent."""
        if project is None and name is None and run_id is None:
            raise UsageError(
                "say which databases to release: a project, a database name or a run id "
                "(or release them all)"
            )
        if project is not None:
            validate_name(project, "project")
        if name is not None:
            validate_dbname(name)
        with self.registry.transaction() as txn:
            leases = txn.find(LEASE_KIND, project=project, resource=name, run_id=run_id)
        return self._release(leases, keep=keep)

    def release_all(self, *, keep: bool = False) -> builtins.list[str]:
        """Drop every database leased in this registry, kept ones included (or keep them all)."""
        with self.registry.transaction() as txn:
            leases = txn.find(LEASE_KIND)
        return self._release(leases, keep=keep)

    def find(self, project: str) -> AllocatedDatabase:
        """The newest live (or kept) database of ``project``; DatabaseNotFoundError if none."""
        validate_name(project, "project")
        with self.registry.transaction() as txn:
            held = [
                lease for lease in txn.find(LEASE_KIND, project=project) if self._holds(txn, lease)
            ]
        if not held:
            raise DatabaseNotFoundError(
                f"project {project!r} has no live database; allocate one with "
                f"`invoke db.allocate --project {project}`",
                project=project,
            )
        lease = max(held, key=lambda item: item.created_at)
        return AllocatedDatabase(
            name=lease.resource,
            project=project,
            seed=str(lease.data.get("seed", "")),
            template=str(lease.data.get("template", "")),
            url=self.client.with_dbname(lease.resource),
            lease=lease,
        )

    def migrate(self, project: str) -> AllocatedDatabase:
        """Apply pending migrations to the project's live database."""
        found = self.find(project)
        migration_runner(self.config).apply(found.url)
        return found

    def seed(self, project: str, profile: str) -> AllocatedDatabase:
        """Apply seed ``profile`` to the project's live database."""
        runner = seed_runner(self.config, profile)
        found = self.find(project)
        runner.apply(found.url)
        return found

    def cleanup(self) -> builtins.list[tuple[str, str]]:
        """Drop marked databases whose owner is proven gone or whose keep expired, old templates
        beyond ``keep_templates`` and half-built ones whose builder died; never unmarked ones."""
        dropped: builtins.list[tuple[str, str]] = []
        with self._admin() as conn:
            marked = self._marked(conn)
            now = self.clock.time()
            doomed: builtins.list[tuple[_Marked, str]] = []
            with self.registry.transaction() as txn:
                by_id = {lease.id: lease for lease in txn.find(LEASE_KIND)}
                names = {item.name for item in marked}
                for item in marked:
                    why = self._why_drop(txn, item, by_id.get(str(item.marker.get("lease"))), now)
                    if why:
                        doomed.append((item, why))
                # Leases whose database is gone and whose owner is gone are just records now.
                for lease in list(by_id.values()):
                    if lease.resource not in names and txn.stale_reason(lease) is not None:
                        txn.remove(lease)
            for item, why in doomed:
                self._drop(conn, item.name, template=item.is_template)
                dropped.append((item.name, why))
            dropped.extend(self._prune_templates(conn, keep=None))
        gone = {name for name, _ in dropped}
        with self.registry.transaction() as txn:
            for lease in txn.find(LEASE_KIND):
                if lease.resource in gone:
                    txn.remove(lease)
        return dropped

    def list(self) -> builtins.list[DatabaseInfo]:
        """Marked databases of this name base, joined with the leases; leases without one too."""
        with self._admin() as conn:
            marked = self._marked(conn, size=True)
        now = self.clock.time()
        out: builtins.list[DatabaseInfo] = []
        with self.registry.transaction() as txn:
            by_id = {lease.id: lease for lease in txn.find(LEASE_KIND)}
            seen: set[str] = set()
            for item in marked:
                m = item.marker
                lease = by_id.get(str(m.get("lease")))
                if lease is not None:
                    seen.add(lease.id)
                keep_until = m.get("keep_until")
                status = self._status(txn, item, lease, now)
                out.append(
                    DatabaseInfo(
                        name=item.name,
                        project=m.get("project"),
                        kind=item.kind,
                        size=item.size,
                        status=status,
                        owner_pid=m.get("pid"),
                        run_id=m.get("run"),
                        created_at=m.get("created_at"),
                        keep_until=keep_until if isinstance(keep_until, (int, float)) else None,
                        seed=m.get("seed"),
                        template=m.get("template"),
                    )
                )
            for lease in by_id.values():
                if lease.id not in seen:
                    out.append(
                        DatabaseInfo(
                            name=lease.resource,
                            project=lease.project,
                            kind="missing",
                            size=None,
                            status="lease without a database (run `invoke db.cleanup`)",
                            owner_pid=lease.owner.pid,
                            run_id=lease.owner.run_id,
                            created_at=lease.created_at,
                            keep_until=lease.data.get("keep_until"),
                            seed=lease.data.get("seed"),
                            template=lease.data.get("template"),
                        )
                    )
        order = {"template": 0, "building": 1, "database": 2, "kept": 3, "missing": 4}
        return sorted(out, key=lambda info: (order.get(info.kind, 9), info.name))

    # --- connections and small helpers -----------------------------------------------------------

    @contextlib.contextmanager
    def _admin(self) -> Iterator[psycopg.Connection[Any]]:
        conn = connect(self.admin, purpose="admin")
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _major(conn: psycopg.Connection[Any]) -> int:
        return conn.info.server_version // 10000

    def _project_seed(self, project: str) -> str:
        configured = self.config.projects.get(project)
        return configured.seed if configured is not None else self.config.database.default_seed

    def _strategy(self, fsync: str, major: int) -> str | None:
        if major < 15:
            return None  # no STRATEGY clause before PostgreSQL 15
        choice = self.config.database.clone_strategy
        if choice == "auto":
            # Measured here: fsync off, FILE_COPY clones 12-15 ms vs 17-23 ms for WAL_LOG (and 8 at
            # once 45-55 ms vs 200-440 ms); fsync on, FILE_COPY forces checkpoints and WAL_LOG wins.
            return "FILE_COPY" if fsync.lower() in {"off", "false", "0"} else "WAL_LOG"
        return choice.upper()

    def _owner_clause(self) -> sql.Composable:
        if self.client.user != self.admin.user:
            return sql.SQL(" OWNER {}").format(sql.Identifier(self.client.user))
        return sql.SQL("")

    def _marker_sql(self, name: str, marker: dict[str, Any]) -> sql.Composed:
        text = MARKER_PREFIX + json.dumps(marker, sort_keys=True, separators=(",", ":"))
        return sql.SQL("COMMENT ON DATABASE {} IS {}").format(_ident(name), sql.Literal(text))

    def _lease_marker(self, lease: Lease, kind: str = "database") -> dict[str, Any]:
        return {
            "tool": TOOL,
            "format": TEMPLATE_FORMAT_VERSION,
            "base": self.base,
            "kind": kind,
            "lease": lease.id,
            "project": lease.project,
            "host": lease.owner.host,
            "pid": lease.owner.pid,
            "start": lease.owner.start_time,
            "run": lease.owner.run_id,
            "created_at": lease.created_at,
            "keep_until": lease.data.get("keep_until"),
            "template": lease.data.get("template"),
            "seed": lease.data.get("seed"),
        }

    def _holds(self, txn: Transaction, lease: Lease) -> bool:
        """Whether ``lease`` still holds its database: a live owner, or a keep not yet expired."""
        keep_until = lease.data.get("keep_until")
        if isinstance(keep_until, (int, float)):
            return keep_until > self.clock.time()
        return txn.stale_reason(lease) is None

    def _marked(
        self, conn: psycopg.Connection[Any], *, size: bool = False
    ) -> builtins.list[_Marked]:
        extra = ", pg_database_size(d.oid)" if size else ", NULL::bigint"
        rows = conn.execute(_MARKED_SQL.format(extra=extra).encode()).fetchall()
        out = []
        for name, comment, is_template, nbytes in rows:
            marker = parse_marker(comment)
            if marker is not None and marker.get("base") == self.base:
                out.append(_Marked(name, marker, bool(is_template), nbytes))
        return out

    def _drop(self, conn: psycopg.Connection[Any], name: str, *, template: bool = False) -> None:
        ident = _ident(name)
        if template:
            with contextlib.suppress(pgerrors.InvalidCatalogName, pgerrors.UndefinedObject):
                conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
        if self._major(conn) >= 13:
            # FORCE terminates the sessions still connected (a leaked pool, a debugger).
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        else:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))

    # --- templates -------------------------------------------------------------------------------

    def _template_ready(self, conn: psycopg.Connection[Any], template: str) -> bool | None:
        """True: published; False: exists but not a finished template; None: absent."""
        row = conn.execute(
            "SELECT datistemplate AND NOT datallowconn FROM pg_database WHERE datname = %s",
            (template,),
        ).fetchone()
        return None if row is None else bool(row[0])

    def _ensure(
        self,
        conn: psycopg.Connection[Any],
        template: str,
        fp: str,
        seed: str,
        migrations: Runner,
        seeds: Runner,
        *,
        rebuild: bool,
    ) -> None:
        key = _advisory_key(fp)
        lock = connect(self.admin, purpose=f"template lock {fp[:12]}")
        try:

            def try_lock() -> bool:
                row = lock.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                return bool(row and row[0])

            wait_until(
                try_lock,
                timeout=self.build_timeout,
                what=f"the build lock of template {template} (another process is building it)",
                clock=self.clock,
                cap=0.05,
                hint="see who holds it with `invoke db.list`; raise the build timeout for slow "
                "migrations",
            )
            # Someone else may have built it while we waited.
            state = self._template_ready(conn, template)
            if state is True and not rebuild:
                return
            # We hold the lock: any build of this fingerprint left on the server is a dead one's.
            for item in self._marked(conn):
                if item.kind == "building" and item.marker.get("fingerprint") == fp:
                    log.info(
                        "dropping %s, a half-built template of a builder that is gone", item.name
                    )
                    self._drop(conn, item.name)
            if state is not None:
                self._drop(conn, template, template=True)
            self._build(conn, template, fp, seed, migrations, seeds)
        finally:
            with contextlib.suppress(psycopg.Error):
                lock.execute("SELECT pg_advisory_unlock(%s)", (key,))
            lock.close()
        self._prune_templates(conn, keep=template)

    def _build(
        self,
        conn: psycopg.Connection[Any],
        template: str,
        fp: str,
        seed: str,
        migrations: Runner,
        seeds: Runner,
    ) -> None:
        building = validate_dbname(f"{self.base}_build_{fp[:12]}_{os.getpid()}")
        me = Owner.current(host=self.registry.host, run_id=self.config.run_id)
        marker: dict[str, Any] = {
            "tool": TOOL,
            "format": TEMPLATE_FORMAT_VERSION,
            "base": self.base,
            "kind": "building",
            "fingerprint": fp,
            "seed": seed,
            "template": template,
            "host": me.host,
            "pid": me.pid,
            "start": me.start_time,
            "run": me.run_id,
            "created_at": self.clock.time(),
        }
        started = time.monotonic()
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0{}").format(
                _ident(building), self._owner_clause()
            )
        )
        try:
            conn.execute(self._marker_sql(building, marker))
            target = self.client.with_dbname(building)
            migrations.apply(target)
            seeds.apply(target)
            # A migrate command's sessions may linger a moment after it exits; rename waits on them.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (building,),
            )
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    _ident(building)
                )
            )
            conn.execute(self._marker_sql(building, {**marker, "kind": "template", "pid": None}))
            # Publication is the rename: a database with the template's name is always complete.
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(building), _ident(template))
            )
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                self._drop(conn, building, template=True)
            raise
        log.info("built template %s (seed %s) in %.2fs", template, seed, time.monotonic() - started)

    def _prune_templates(
        self, conn: psycopg.Connection[Any], *, keep: str | None
    ) -> builtins.list[tuple[str, str]]:
        """Drop templates beyond the newest ``keep_templates`` of each seed profile."""
        limit = self.config.database.keep_templates
        by_seed: dict[str, builtins.list[_Marked]] = {}
        for item in self._marked(conn):
            if item.kind == "template":
                by_seed.setdefault(str(item.marker.get("seed")), []).append(item)
        dropped = []
        for seed, items in by_seed.items():
            items.sort(
                key=lambda it: (it.name == keep, float(it.marker.get("created_at") or 0)),
                reverse=True,
            )
            for item in items[limit:]:
                self._drop(conn, item.name, template=True)
                why = f"old template of seed {seed} (keep_templates = {limit})"
                log.info("dropped %s: %s", item.name, why)
                dropped.append((item.name, why))
        return dropped

    # --- allocation ------------------------------------------------------------------------------

    def _reserve(self, project: str, owner: Owner, template: str, seed: str, marked: int) -> Lease:
        """Choose the name and record the lease; short, and the only part under the lock."""
        limit = self.config.database.max_databases
        plain = database_name(self.base, project)
        with self.registry.transaction() as txn:
            leases = txn.find(LEASE_KIND)
            held = [lease for lease in leases if self._holds(txn, lease)]
            live = max(marked, len(held))
            if live >= limit:
                raise DatabaseLimitError(
                    f"{live} e2e databases exist, the limit is max_databases = {limit}; drop "
                    "leftovers with `invoke db.cleanup` or `invoke db.release --all`, or raise "
                    "database.max_databases",
                    limit=limit,
                )
            taken = {lease.resource for lease in held}
            name = plain
            if plain in taken:
                suffix = hashlib.sha256(owner.run_id.encode()).hexdigest()[:6]
                name = database_name(self.base, project, suffix)
                if name in taken:  # the same run twice: fall back to something random
                    name = database_name(self.base, project, os.urandom(3).hex())
            for lease in leases:
                if lease.resource == name and lease not in held:
                    txn.remove(lease)  # a dead owner's record; its database is reclaimed below
            return txn.add(
                Lease(
                    kind=LEASE_KIND,
                    resource=name,
                    project=project,
                    owner=owner,
                    data={"template": template, "seed": seed, "keep_until": None},
                )
            )

    def _clone(
        self, conn: psycopg.Connection[Any], lease: Lease, template: str, strategy: str | None
    ) -> Lease:
        for _attempt in range(4):
            name = lease.resource
            try:
                self._create(conn, name, template, strategy)
            except pgerrors.DuplicateDatabase:
                lease = self._after_duplicate(conn, lease)
                continue
            try:
                conn.execute(self._marker_sql(name, self._lease_marker(lease)))
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    self._drop(conn, name)
                raise
            return lease
        raise DatabaseError(
            f"could not find a free database name for project {lease.project!r} (last tried "
            f"{lease.resource}); run `invoke db.cleanup` and retry",
            dbname=lease.resource,
        )

    def _after_duplicate(self, conn: psycopg.Connection[Any], lease: Lease) -> Lease:
        """The name is taken on the server: reclaim a dead owner's database, or pick another."""
        name = lease.resource
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database'), datistemplate FROM pg_database "
            "WHERE datname = %s",
            (name,),
        ).fetchone()
        if row is not None:
            marker = parse_marker(row[0])
            if marker is not None and marker.get("kind") in {"database", "kept"}:
                item = _Marked(name, marker, bool(row[1]))
                with self.registry.transaction() as txn:
                    other = [
                        held
                        for held in txn.find(LEASE_KIND, resource=name)
                        if held.id == marker.get("lease") and self._holds(txn, held)
                    ]
                    why = None if other else self._why_drop(txn, item, None, self.clock.time())
                if why is not None:
                    log.info("dropping %s before reusing its name: %s", name, why)
                    self._drop(conn, name)
                    return lease
        # Unmarked, or held by a live owner (maybe on another host): never touch it.
        new_name = database_name(self.base, lease.project, os.urandom(3).hex())
        with self.registry.transaction() as txn:
            return txn.update(replace(lease, resource=new_name))

    def _create(
        self, conn: psycopg.Connection[Any], name: str, template: str, strategy: str | None
    ) -> None:
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}{}{}").format(
            _ident(name),
            _ident(template),
            self._owner_clause(),
            sql.SQL(f" STRATEGY {strategy}" if strategy in {"FILE_COPY", "WAL_LOG"} else ""),
        )

        def attempt() -> bool | None:
            try:
                conn.execute(statement)
            except pgerrors.ObjectInUse:
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

    # --- release and sweeping --------------------------------------------------------------------

    def _release(self, leases: builtins.list[Lease], *, keep: bool) -> builtins.list[str]:
        if not leases:
            return []
        names = [lease.resource for lease in leases]
        if keep:
            keep_until = self.clock.time() + self.config.database.keep_hours * 3600
            kept: builtins.list[Lease] = []
            with self.registry.transaction() as txn:
                for lease in leases:
                    with contextlib.suppress(RegistryError):  # released meanwhile
                        kept.append(txn.update(lease.with_data(keep_until=keep_until)))
            with self._admin() as conn:
                for lease in kept:
                    with contextlib.suppress(pgerrors.InvalidCatalogName, pgerrors.UndefinedObject):
                        conn.execute(
                            self._marker_sql(lease.resource, self._lease_marker(lease, "kept"))
                        )
            return [lease.resource for lease in kept]
        with self._admin() as conn:
            for name in names:
                self._drop(conn, name)
        with self.registry.transaction() as txn:
            for lease in leases:
                txn.remove(lease)
        return names

    def _why_drop(
        self, txn: Transaction, item: _Marked, lease: Lease | None, now: float
    ) -> str | None:
        kind = item.kind
        if kind in {"database", "kept"}:
            keep_until = item.marker.get("keep_until")
            if lease is not None and isinstance(lease.data.get("keep_until"), (int, float)):
                keep_until = lease.data["keep_until"]
            if isinstance(keep_until, (int, float)):
                if keep_until > now:
                    return None
                return f"kept until {_when(keep_until)}, expired"
            if lease is not None:
                stale = txn.stale_reason(lease)
                return f"lease is stale: {stale}" if stale else None
            gone = item.owner_gone(txn.host)
            return f"no lease and {gone}" if gone else None
        if kind == "building":
            gone = item.owner_gone(txn.host)
            return f"half-built template whose builder is gone ({gone})" if gone else None
        return None  # templates: pruned by age, see _prune_templates

    def _status(self, txn: Transaction, item: _Marked, lease: Lease | None, now: float) -> str:
        if item.kind == "template":
            return "ready"
        if item.kind == "building":
            gone = item.owner_gone(txn.host)
            return f"abandoned: {gone}" if gone else "building"
        why = self._why_drop(txn, item, lease, now)
        if why is not None:
            return f"stale: {why}"
        keep_until = item.marker.get("keep_until")
        if isinstance(keep_until, (int, float)):
            return f"kept until {_when(keep_until)}"
        if lease is None:
            return "live (no lease here: another host or state folder)"
        return "live"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def database_allocator(
    config: Config, registry: Registry, ports: PortAllocator
) -> DatabaseAllocator:
    """The allocator for the configured server: the admin URL, or the embedded local cluster."""
    from .postgres import LocalCluster, admin_conninfo  # the cluster is an edge; import late

    admin = admin_conninfo(config, registry, ports)
    if config.database.admin_url is not None:
        return DatabaseAllocator(config, registry, admin, client=config.database.admin_url)
    client = LocalCluster(config, registry, ports).tcp_conninfo()
    return DatabaseAllocator(config, registry, admin, client=client)
