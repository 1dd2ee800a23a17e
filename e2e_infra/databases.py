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
  :meth:`DatabaseAllocator.cleanup` drops marked databases whose owner is proven gone (or whose
  keep expired). An unmarked one only when a stale lease of ours names it exactly: a clone, spare
  or template build keeps its lease until it is marked (or proven absent), so a maker that died
  between ``CREATE`` and ``COMMENT`` leaves that proof. A ``CREATE`` whose outcome is unknown (an
  exception raised by a signal handler mid-statement leaves the connection busy) is settled from a
  new connection: end the old backend, wait until it is gone, drop the name.
* A **warm spare** (``spares`` > 0) is a clone of the current template made after a release, off
  the suite's critical path (a background thread the allocator joins in :meth:`close`): created
  by ``CREATE DATABASE ... TEMPLATE`` (atomic) as ``<base>_spare_<fp[:12]>_<random>`` while a
  registry lease of kind ``spare`` names it (so a maker that dies before marking it leaves proof of
  what to drop), then marked ``kind spare`` with the template's name, OID and fingerprint. At most
  ``spares`` per template, made under an advisory lock; they count toward ``max_databases``. The
  next allocation claims one with ``ALTER DATABASE spare RENAME TO target; COMMENT ...`` in one
  implicit transaction: only a spare of the current template (same OID, so not from before a
  rebuild) is taken, and losing a race to another claimer just means trying the next, or cloning.
  Spares of old templates are dropped when a template is built or pruned, and by ``cleanup``.
* **A shared server** (``admin_url`` set): several hosts allocate on one server. Database names
  get a host part (``<base>_<project>_<sha256(host_id)[:4]>``), and an allocation holds
  ``pg_advisory_lock_shared(<key of the name>)`` on a connection of its own (to the admin URL's
  database) from before the database exists until it is released or the owner dies (the server
  ends the connection and the lock with it). ``cleanup`` on any host drops another host's database
  only when it can take that key exclusively (proof that no owner holds it), and holds it while it
  drops. An allocation whose owner is another process (``invoke db.allocate`` records its parent
  shell) cannot hold the lock: its marker says ``hold: false`` and other hosts treat it as live
  until ``lease_ttl`` has passed (forever when unset); its own host still proves death by pid.

All SQL names are validated and composed with :class:`psycopg.sql.Identifier`.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import pq, sql

from .clock import Clock, SystemClock, wait_until
from .config import Config, validate_name
from .conninfo import ConnInfo, mask_secrets
from .errors import (
    CloneError,
    DatabaseError,
    DatabaseLimitError,
    DatabaseNotFoundError,
    DeadlineExceeded,
    E2EInfraError,
    InvalidNameError,
    RegistryError,
    ServerUnreachableError,
    UsageError,
)
from .leases import Lease, Owner, Registry, Transaction, process_start_time
from .migrations import (
    Runner,
    advisory_lock,
    connect,
    migration_runner,
    seed_runner,
)
from .pgerrors import server_message

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
    "host_tag",
    "parse_marker",
    "spare_name",
    "template_name",
    "validate_dbname",
]

log = logging.getLogger("e2e_infra")

TEMPLATE_FORMAT_VERSION = 1
MARKER_PREFIX = "e2e-infra "
TOOL = "e2e-infra"
LEASE_KIND = "database"
SPARE_KIND = "spare"  # the marker kind of a warm spare, and the registry lease while making one
BUILD_KIND = "building"  # the marker kind of a template being built, and its registry lease
_DBNAME = re.compile(r"[a-z][a-z0-9_]*")
_MAX_IDENTIFIER = 63  # bytes; PostgreSQL truncates longer names silently
_START_TIME_TOLERANCE = 0.05
# Input files changed less than this long ago are hashed again on every allocation (see
# DatabaseAllocator._fingerprint): longer than any filesystem's timestamp tick.
_RACY_SECONDS = 2

_MARKED_SQL = (
    "SELECT d.datname, shobj_description(d.oid, 'pg_database'), d.datistemplate{extra}, d.oid "
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


def spare_name(base: str, fp: str) -> str:
    """``<base>_spare_<fp[:12]>_<random>``: unique without coordination, findable by prefix."""
    return validate_dbname(f"{_spare_prefix(base, fp)}{os.urandom(3).hex()}")


def _spare_prefix(base: str, fp: str) -> str:
    return f"{base}_spare_{fp[:12]}_"


def host_tag(host_id: str) -> str:
    """Four hex digits of the host id: the part of a name that keeps hosts apart on a shared
    server (a clash of two hosts' tags only costs a suffix: a name in use is never taken)."""
    return hashlib.sha256(host_id.encode("utf-8")).hexdigest()[:4]


def _name_key(name: str) -> int:
    """The advisory lock key that a live owner holds (shared) for database ``name``."""
    digest = hashlib.sha256(b"e2e-infra database " + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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


def _spare_key(fp: str) -> int:
    """The advisory lock key under which spares of fingerprint ``fp`` are made (not the build's)."""
    return _advisory_key(fp) ^ 0x5350415245  # "SPARE"


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(validate_dbname(name))


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _server_errors(
    action: str,
) -> Callable[
    [Callable[Concatenate[DatabaseAllocator, _P], _R]],
    Callable[Concatenate[DatabaseAllocator, _P], _R],
]:
    """The library edge of a public method: a psycopg error the method did not handle becomes a
    :class:`DatabaseError` (or :class:`ServerUnreachableError`) with a masked one-line message
    that names the fix, never a traceback."""

    def decorate(
        fn: Callable[Concatenate[DatabaseAllocator, _P], _R],
    ) -> Callable[Concatenate[DatabaseAllocator, _P], _R]:
        @functools.wraps(fn)
        def wrapper(self: DatabaseAllocator, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(self, *args, **kwargs)
            except psycopg.Error as exc:
                raise self._server_error(exc, action) from exc

        return wrapper

    return decorate


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
    kind: str  # database | kept | template | building | spare | missing
    size: int | None  # bytes
    status: str  # live | stale: <why> | kept until <time> | ready | building | abandoned | ...
    owner_pid: int | None
    run_id: str | None
    created_at: float | None
    keep_until: float | None
    seed: str | None
    template: str | None


class _AdminSlot:
    """The admin connection a :class:`DatabaseAllocator` keeps between calls; closed by
    :meth:`DatabaseAllocator.close`, or when the allocator is collected (or the process exits)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


@dataclass(frozen=True)
class _Marked:
    name: str
    marker: dict[str, Any]
    is_template: bool
    size: int | None = None
    oid: int | None = None

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
        shared: bool | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.admin = admin
        self.client = client or admin
        self.clock = clock or SystemClock()
        self.build_timeout = build_timeout
        self.base = config.database.name_base
        # A shared server (admin_url set) is used by other hosts too: host-tagged names and
        # liveness proven by advisory locks. The embedded cluster is this host's alone.
        self.shared = config.database.admin_url is not None if shared is None else shared
        self._holders: dict[str, psycopg.Connection[Any]] = {}  # database -> lock connection
        self._spare_thread: threading.Thread | None = None
        self._spare_lock = threading.Lock()
        # Leases whose CREATE DATABASE had an unknown outcome that could not be settled: they stay
        # registered, the proof `cleanup` needs to drop the unmarked database once we are gone.
        self._unsettled: set[str] = set()
        # One admin connection, lent to one caller at a time (see _admin); the lock also tells a
        # nested or concurrent caller to open a connection of its own.
        self._admin_slot = _AdminSlot()
        self._admin_lock = threading.Lock()
        weakref.finalize(self, self._admin_slot.close)  # an allocator nobody closed
        # Fingerprints by the inputs' file stamps (see _fingerprint).
        self._fingerprints: dict[tuple[object, ...], str] = {}

    # --- public API ------------------------------------------------------------------------------

    @_server_errors("allocate a database")
    def allocate(self, project: str, owner: Owner, *, seed: str | None = None) -> AllocatedDatabase:
        """Clone the template of ``seed`` (default: the project's) into a database of its own."""
        validate_name(project, "project")
        seed = seed or self._project_seed(project)
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        with self._admin() as conn:
            major = self._major(conn)
            fp = self._fingerprint(migrations, seeds, seed, major)
            template = template_name(self.base, seed, fp)
            # One round trip: the clone strategy, whether the template is ready (and its OID),
            # the marked count and the warm spares of this fingerprint.
            row = conn.execute(
                "SELECT current_setting('fsync'), t.ready, t.oid, "
                "(SELECT count(*) FROM pg_database d WHERE NOT d.datistemplate "
                " AND shobj_description(d.oid, 'pg_database') LIKE 'e2e-infra %%'), "
                "(SELECT json_agg(json_build_array(d.datname, "
                " shobj_description(d.oid, 'pg_database'))) "
                " FROM pg_database d WHERE %s AND starts_with(d.datname, %s)) "
                "FROM (SELECT (SELECT datistemplate AND NOT datallowconn FROM pg_database "
                " WHERE datname = %s) AS ready, "
                " (SELECT oid FROM pg_database WHERE datname = %s) AS oid) t",
                (
                    self.config.database.spares > 0,
                    _spare_prefix(self.base, fp),
                    template,
                    template,
                ),
            ).fetchone()
            assert row is not None
            fsync, ready, template_oid, marked, spare_rows = row
            run = owner.run_id
            if not ready:
                self._ensure(conn, template, fp, seed, migrations, seeds, rebuild=False, run=run)
            spares = self._claimable(spare_rows, template, template_oid, fp) if ready else []
            # A claimed spare turns into the new database: it does not add to the count.
            count = int(marked) - min(len(spares), 1)
            lease, dead = self._reserve(project, owner, template, seed, count)
            strategy = self._strategy(str(fsync), major)
            try:
                claimed = self._claim(conn, lease, spares)
                if claimed is not None:
                    lease = claimed
                else:
                    try:
                        lease, dead = self._clone(conn, lease, template, strategy, dead)
                    except pgerrors.InvalidCatalogName:
                        # The template was dropped between our check and the clone (pruned or
                        # rebuilt by another process): build it again, once.
                        self._ensure(
                            conn, template, fp, seed, migrations, seeds, rebuild=False, run=run
                        )
                        lease, dead = self._clone(conn, lease, template, strategy, dead)
            except BaseException:
                self._unhold(lease.resource)
                if lease.id in self._unsettled:
                    self._unsettled.discard(lease.id)  # kept: the proof for cleanup
                else:
                    with self.registry.transaction() as txn:
                        txn.remove(lease)
                raise
            if dead:
                # Records of dead owners of this name: the name is ours now, and marked.
                with self.registry.transaction() as txn:
                    for old in dead:
                        txn.remove(old)
        return AllocatedDatabase(
            name=lease.resource,
            project=project,
            seed=seed,
            template=template,
            url=self.client.with_dbname(lease.resource),
            lease=lease,
        )

    @_server_errors("build a template")
    def ensure_template(self, seed: str, *, rebuild: bool = False) -> str:
        """Build the template of ``seed`` for the current migrations if needed; its name."""
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        with self._admin() as conn:
            fp = self._fingerprint(migrations, seeds, seed, self._major(conn))
            template = template_name(self.base, seed, fp)
            self._ensure(
                conn, template, fp, seed, migrations, seeds, rebuild=rebuild, run=self.config.run_id
            )
        return template

    @_server_errors("release databases")
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

    @_server_errors("release databases")
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

    @_server_errors("migrate a database")
    def migrate(self, project: str) -> AllocatedDatabase:
        """Apply pending migrations to the project's live database."""
        found = self.find(project)
        migration_runner(self.config).apply(found.url)
        return found

    @_server_errors("seed a database")
    def seed(self, project: str, profile: str) -> AllocatedDatabase:
        """Apply seed ``profile`` to the project's live database."""
        runner = seed_runner(self.config, profile)
        found = self.find(project)
        runner.apply(found.url)
        return found

    @_server_errors("prepare warm spares")
    def prepare_spares(self, template: str) -> builtins.list[str]:
        """Top up the warm spares of ``template`` to ``spares``; the names made.

        Runs after a release, in a background thread (see :meth:`close`); callable directly. Only
        one process tops up a template at a time (an advisory lock; the others skip), spares of an
        older template of the same seed are dropped first, and ``max_databases`` is respected.
        """
        cap = self.config.database.spares
        made: builtins.list[str] = []
        if cap <= 0:
            return made
        # A connection of its own: it takes a session advisory lock (and runs in the spare thread).
        with self._admin(reuse=False) as conn:
            row = conn.execute(
                "SELECT oid, shobj_description(oid, 'pg_database'), "
                "datistemplate AND NOT datallowconn FROM pg_database WHERE datname = %s",
                (template,),
            ).fetchone()
            marker = parse_marker(row[1]) if row else None
            if row is None or not row[2] or marker is None or marker.get("kind") != "template":
                return made  # pruned or rebuilt meanwhile: nothing to prepare for
            fp = str(marker.get("fingerprint") or "")
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (_spare_key(fp),)).fetchone()
            if not (locked and locked[0]):
                return made  # another process is topping up this template
            try:
                marked = self._marked(conn)
                for item, why in self._stale_spares(marked):
                    log.info("dropped %s: %s", item.name, why)
                    self._drop(conn, item.name)
                    marked.remove(item)
                current = [
                    item
                    for item in marked
                    if item.kind == SPARE_KIND and item.marker.get("template_oid") == row[0]
                ]
                count = sum(1 for item in marked if not item.is_template)
                room = self.config.database.max_databases - count
                for _ in range(min(cap - len(current), room)):
                    made.append(self._make_spare(conn, template, int(row[0]), marker))
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (_spare_key(fp),))
        return made

    def close(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``, default ``clone_timeout``) for the spare being prepared and
        let go of the locks held for live databases (only call it once they are released: on a
        shared server the locks prove they are in use). Idempotent; a session calls it last,
        when the suite is long done."""
        limit = self.config.database.clone_timeout if timeout is None else timeout
        self._join_spares(limit)
        for name in builtins.list(self._holders):
            self._unhold(name)
        # The admin connection; a later call opens a new one. Not while another thread has it
        # lent (it is put back or closed when that call ends).
        if self._admin_lock.acquire(timeout=max(limit, 0.0)):
            try:
                self._admin_slot.close()
            finally:
                self._admin_lock.release()

    def _join_spares(self, limit: float) -> None:
        """Wait (at most ``limit``) for the spare being prepared in the background, if any."""
        with self._spare_lock:
            thread, self._spare_thread = self._spare_thread, None
        if thread is not None:
            thread.join(limit)
            if thread.is_alive():
                # Its statements are bounded (statement_timeout) and a half-made spare keeps its
                # lease, so cleanup drops it if this process exits first.
                log.warning(
                    "the warm spare being prepared was not ready within %gs; leaving it to "
                    "finish in the background",
                    limit,
                )

    @_server_errors("clean up databases")
    def cleanup(self) -> builtins.list[tuple[str, str]]:
        """Drop marked databases whose owner is proven gone or whose keep expired, old templates
        beyond ``keep_templates``, half-built ones whose builder died, and what a process that
        died before marking it left: an unmarked database named exactly by a stale lease of ours
        (the lease is the proof it was ours). Never any other unmarked database."""
        dropped: builtins.list[tuple[str, str]] = []
        with self._admin(reuse=False) as conn:  # it takes session advisory locks
            marked = self._marked(conn)
            now = self.clock.time()
            doomed: builtins.list[tuple[_Marked, str]] = []
            # Keys taken exclusively to prove another host's owner gone; held until the drop.
            proved: builtins.list[int] = []

            def lock_free(name: str) -> bool:
                key = _name_key(name)
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                if row and row[0]:
                    proved.append(key)
                    return True
                return False

            with self.registry.transaction() as txn:
                by_id = {lease.id: lease for lease in txn.find(LEASE_KIND)}
                for item in marked:
                    lease = by_id.get(str(item.marker.get("lease")))
                    why = self._why_drop(txn, item, lease, now, lock_free=lock_free)
                    if why:
                        doomed.append((item, why))
            doomed.extend(self._stale_spares(marked))
            try:
                for item, why in doomed:
                    self._drop(conn, item.name, template=item.is_template)
                    dropped.append((item.name, why))
                names = {item.name for item in marked}
                dropped.extend(self._drop_half_made(conn, names, lock_free=lock_free))
            finally:
                for key in proved:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            dropped.extend(self._prune_templates(conn, keep=None))
        gone = {name for name, _ in dropped}
        with self.registry.transaction() as txn:
            for lease in txn.find(LEASE_KIND):
                if lease.resource in gone:
                    txn.remove(lease)
        return dropped

    def _drop_half_made(
        self,
        conn: psycopg.Connection[Any],
        marked: set[str],
        *,
        kinds: frozenset[str] = frozenset({LEASE_KIND, SPARE_KIND, BUILD_KIND}),
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
        what = {
            LEASE_KIND: "half-made database",
            SPARE_KIND: "half-made spare",
            BUILD_KIND: "half-built template",
        }
        dropped: builtins.list[tuple[str, str]] = []
        forget: builtins.list[Lease] = []
        for lease, why in candidates:
            name = lease.resource
            if name in marked:
                if lease.kind != LEASE_KIND:
                    forget.append(lease)  # marked: the marker's own rules apply from now on
                continue
            if name in comments and comments[name] is None:
                shared_name = self.shared and lease.kind == LEASE_KIND
                if shared_name and (lock_free is None or not lock_free(name)):
                    continue  # someone (another host?) holds that name: not proven ours
                self._drop(conn, name, template=lease.kind == BUILD_KIND)
                reason = f"{what[lease.kind]}, unmarked, named by the lease of a dead owner: {why}"
                log.info("dropped %s: %s", name, reason)
                dropped.append((name, reason))
            # Gone, just dropped, or marked by something else (not ours): only a record now.
            forget.append(lease)
        with self.registry.transaction() as txn:
            for lease in forget:
                txn.remove(lease)
        return dropped

    @_server_errors("list databases")
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
        order = {"template": 0, "building": 1, "spare": 2, "database": 3, "kept": 4, "missing": 5}
        return sorted(out, key=lambda info: (order.get(info.kind, 9), info.name))

    # --- connections and small helpers -----------------------------------------------------------

    @contextlib.contextmanager
    def _admin(self, *, reuse: bool = True) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit admin connection with ``statement_timeout`` set.

        The allocator keeps one and lends it to one caller at a time: a new connection per call
        was ~5 ms of a ~12 ms warm-spare allocation. A nested caller (``_settle`` needs one other
        than the busy one), a concurrent one (another thread) and ``reuse=False`` (callers that
        take session advisory locks) get a new connection, closed after. The kept one goes back
        only as it was lent: the body raised nothing (an interrupt may leave a statement running
        or a lock held) and it is idle and unbroken; before it is lent again, one that the server
        ended meanwhile (a restart, ``pg_terminate_backend``) is replaced (:func:`_reusable`)."""
        if not reuse or not self._admin_lock.acquire(blocking=False):
            fresh = self._connect_admin()
            try:
                yield fresh
            finally:
                fresh.close()
            return
        try:
            conn, self._admin_slot.conn = self._admin_slot.conn, None
            if conn is None or not _reusable(conn):
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = self._connect_admin()
            clean = False
            try:
                yield conn
                clean = True
            finally:
                if clean and _reusable(conn, probe=False):
                    self._admin_slot.conn = conn
                else:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
        finally:
            self._admin_lock.release()

    def _connect_admin(self) -> psycopg.Connection[Any]:
        conn = connect(self.admin, purpose="admin")
        try:
            # A deadline for every statement here (CREATE / DROP DATABASE wait on locks and on
            # other sessions): generous, the build timeout. Migrations run on their own
            # connections, not bound by it.
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{max(1, round(self.build_timeout * 1000))}ms",),
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _fingerprint(self, migrations: Runner, seeds: Runner, seed: str, major: int) -> str:
        """:func:`fingerprint`, remembered by the inputs' file stamps (name, size, mtime, ctime,
        inode: ``stat`` instead of reading and hashing every file on each allocation).

        A long-lived allocator must never hand out a stale template, so the stamps are taken on
        every call (a file added, removed, rewritten or replaced changes them), and a result is
        remembered only when every input is older than :data:`_RACY_SECONDS`: a second write
        within one timestamp tick, of the same size, would leave the stamp as it was (git's
        "racy clean" rule). A runner without ``stamp`` is hashed every time."""
        stamps = []
        for runner in (migrations, seeds):
            stamp = getattr(runner, "stamp", None)
            if stamp is None:
                return fingerprint(migrations, seeds, seed, major)
            stamps.append((type(runner).__name__, stamp()))
        key = (*stamps, seed, major)
        known = self._fingerprints.get(key)
        if known is not None:
            return known
        fp = fingerprint(migrations, seeds, seed, major)
        times = [
            t
            for _kind, stamp in stamps
            for part in stamp
            if isinstance(part, tuple)
            for t in part[2:4]
        ]
        settled = time.time_ns() - _RACY_SECONDS * 1_000_000_000
        if all(t < settled for t in times):
            if len(self._fingerprints) >= 16:
                self._fingerprints.clear()  # inputs changed many times: forget the old ones
            self._fingerprints[key] = fp
        return fp

    def _server_error(self, exc: psycopg.Error, action: str) -> E2EInfraError:
        """A one-line, masked error for a psycopg error that reached the library edge."""
        secrets = tuple(p for p in (self.admin.password, self.client.password) if p)
        reason = (
            server_message(exc, secrets)
            if exc.diag.message_primary
            else " ".join(mask_secrets(str(exc), secrets).split())
        )
        where = self.admin.masked
        user = self.admin.user
        role = sql.Identifier(user).as_string(None) if not _DBNAME.fullmatch(user) else user
        if isinstance(exc, pgerrors.InsufficientPrivilege):
            if "create database" in reason.lower():
                fix = (
                    f"the admin user {user} needs CREATEDB: ALTER ROLE {role} CREATEDB (or use a "
                    "superuser in E2E_ADMIN_DATABASE_URL)"
                )
            else:
                fix = (
                    f"the admin user {user} lacks a privilege: use a superuser (or the owner of "
                    f"the e2e databases, with CREATEDB: ALTER ROLE {role} CREATEDB) in "
                    "E2E_ADMIN_DATABASE_URL"
                )
        elif isinstance(exc, pgerrors.QueryCanceled):
            fix = (
                f"a statement ran past statement_timeout ({self.build_timeout:g}s): look for "
                "sessions holding locks in pg_stat_activity, then retry"
            )
        elif isinstance(exc, psycopg.OperationalError):
            return ServerUnreachableError(
                f"lost the connection to PostgreSQL at {where} trying to {action} ({reason}); "
                "check that the server is up (`invoke pg.status`) and retry",
                url=where,
            )
        else:
            fix = "see the server log, then retry (`invoke doctor` checks the setup)"
        return DatabaseError(f"PostgreSQL at {where} could not {action}: {reason}; {fix}")

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
            # Whether a live owner holds the name's advisory lock (shared servers only).
            "hold": lease.resource in self._holders,
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
        for name, comment, is_template, nbytes, oid in rows:
            marker = parse_marker(comment)
            if marker is not None and marker.get("base") == self.base:
                out.append(_Marked(name, marker, bool(is_template), nbytes, int(oid)))
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
        run: str | None,
    ) -> None:
        key = _advisory_key(fp)
        lock = connect(self.admin, purpose=f"template lock {fp[:12]}")
        try:
            advisory_lock(
                lock,
                key,
                timeout=self.build_timeout,
                what=f"the build lock of template {template} (another process is building it)",
                clock=self.clock,
                hint="see who holds it with `invoke db.list`; raise the build timeout for slow "
                "migrations",
            )
            # Someone else may have built it while we waited.
            state = self._template_ready(conn, template)
            if state is True and not rebuild:
                return
            # We hold the lock: any build of this fingerprint left on the server is a dead one's.
            marked = self._marked(conn)
            for item in marked:
                if item.kind == BUILD_KIND and item.marker.get("fingerprint") == fp:
                    log.info(
                        "dropping %s, a half-built template of a builder that is gone", item.name
                    )
                    self._drop(conn, item.name)
            # And one that died before marking it, if its lease is in our registry.
            self._drop_half_made(
                conn,
                {item.name for item in marked},
                kinds=frozenset({BUILD_KIND}),
                prefix=f"{self.base}_build_{fp[:12]}_",
            )
            if state is not None:
                self._drop(conn, template, template=True)
            self._build(conn, template, fp, seed, migrations, seeds, run=run)
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
        *,
        run: str | None,
    ) -> None:
        building = validate_dbname(f"{self.base}_build_{fp[:12]}_{os.getpid()}")
        me = Owner.current(host=self.registry.host, run_id=run)
        marker: dict[str, Any] = {
            "tool": TOOL,
            "format": TEMPLATE_FORMAT_VERSION,
            "base": self.base,
            "kind": BUILD_KIND,
            "fingerprint": fp,
            "seed": seed,
            "template": template,
            "host": me.host,
            "pid": me.pid,
            "start": me.start_time,
            "run": run,  # the run that built it (None for `invoke db.template`)
            "created_at": self.clock.time(),
        }
        started = time.monotonic()
        # The lease first: if we die between CREATE and COMMENT, cleanup knows the name is ours.
        making = self._making(self.registry, BUILD_KIND, building, "(templates)", me)
        backend = conn.info.backend_pid
        try:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0{}").format(
                    _ident(building), self._owner_clause()
                )
            )
        except pgerrors.DuplicateDatabase:
            self._forget(self.registry, making)  # not ours: never drop it
            raise
        except BaseException:
            if self._settle(conn, backend, building, template=True):
                self._forget(self.registry, making)
            raise
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
            if self._settle(conn, backend, building, template=True):
                self._forget(self.registry, making)
            raise
        self._forget(self.registry, making)
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
        # Spares of templates that are gone or no longer the newest: the template changed.
        for item, why in self._stale_spares(self._marked(conn)):
            self._drop(conn, item.name)
            log.info("dropped %s: %s", item.name, why)
            dropped.append((item.name, why))
        return dropped

    # --- allocation ------------------------------------------------------------------------------

    def _reserve(
        self, project: str, owner: Owner, template: str, seed: str, marked: int
    ) -> tuple[Lease, builtins.list[Lease]]:
        """Choose the name and record the lease; short, and the only part under the lock. Also
        returns the leases of dead owners that name the same database: they stay until ours is
        marked, the proof that an unmarked database of that name (a clone its owner died making)
        is ours to drop."""
        limit = self.config.database.max_databases
        tag = host_tag(self.registry.host) if self.shared else ""
        plain = database_name(self.base, project, tag)
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
                name = database_name(self.base, project, _join(tag, suffix))
                if name in taken:  # the same run twice: fall back to something random
                    name = database_name(self.base, project, _join(tag, os.urandom(3).hex()))
            dead = [lease for lease in leases if lease.resource == name and lease not in held]
            lease = txn.add(
                Lease(
                    kind=LEASE_KIND,
                    resource=name,
                    project=project,
                    owner=owner,
                    data={"template": template, "seed": seed, "keep_until": None},
                )
            )
            return lease, dead

    def _clone(
        self,
        conn: psycopg.Connection[Any],
        lease: Lease,
        template: str,
        strategy: str | None,
        dead: builtins.list[Lease],
    ) -> tuple[Lease, builtins.list[Lease]]:
        """Clone ``template`` into the lease's database and mark it; the lease (renamed if the
        name was taken) and the dead owners' leases of its name, to forget once it is marked."""
        for _attempt in range(4):
            name = lease.resource
            self._hold(lease)  # before the database exists: no moment without proof of life
            try:
                made = self._create_marked(conn, lease, template, strategy)
            except BaseException:
                self._unhold(name)
                raise
            if made:
                return lease, dead
            lease, dead = self._after_duplicate(conn, lease, dead)
            if lease.resource != name:
                self._unhold(name)
        self._unhold(lease.resource)
        raise DatabaseError(
            f"could not find a free database name for project {lease.project!r} (last tried "
            f"{lease.resource}); run `invoke db.cleanup` and retry",
            dbname=lease.resource,
        )

    def _create_marked(
        self, conn: psycopg.Connection[Any], lease: Lease, template: str, strategy: str | None
    ) -> bool:
        """CREATE the lease's database from ``template`` and mark it; False if the name is taken.

        A name that exists is never created over (an unmarked database there is not known to be
        ours). Once CREATE is sent, any failure whose outcome is unknown (an exception raised by a
        signal handler mid-statement, a lost connection) or a failure to mark it is settled by
        :meth:`_settle`; if even that fails, the lease stays registered (see allocate)."""
        name = lease.resource
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is not None:
            return False
        backend = conn.info.backend_pid
        try:
            self._create(conn, name, template, strategy)
        except pgerrors.DuplicateDatabase:
            return False
        except CloneError:
            raise  # the template stayed busy: the server refused every attempt
        except psycopg.Error as exc:
            if exc.sqlstate and not conn.broken:
                raise  # the server's answer: nothing was created
            if not self._settle(conn, backend, name):
                self._unsettled.add(lease.id)
            raise
        except BaseException:  # Interrupted from a signal handler, say: the outcome is unknown
            if not self._settle(conn, backend, name):
                self._unsettled.add(lease.id)
            raise
        try:
            conn.execute(self._marker_sql(name, self._lease_marker(lease)))
        except BaseException:
            if not self._settle(conn, backend, name):
                self._unsettled.add(lease.id)
            raise
        return True

    def _settle(
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
                self._drop(conn, name, template=template)
                return True
        try:
            with self._admin() as fresh:
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
                self._drop(fresh, name, template=template)
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

    @staticmethod
    def _making(registry: Registry, kind: str, name: str, project: str, owner: Owner) -> Lease:
        """Record the lease of a database about to be made (a spare, a template being built)."""
        with registry.transaction() as txn:
            return txn.add(Lease(kind=kind, resource=name, project=project, owner=owner))

    @staticmethod
    def _forget(registry: Registry, lease: Lease) -> None:
        with registry.transaction() as txn:
            txn.remove(lease)

    def _after_duplicate(
        self, conn: psycopg.Connection[Any], lease: Lease, dead: builtins.list[Lease]
    ) -> tuple[Lease, builtins.list[Lease]]:
        """The name is taken on the server: reclaim a dead owner's database (marked, or unmarked
        and named by a dead owner's lease: it died creating it), or pick another name."""
        name = lease.resource
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database'), datistemplate FROM pg_database "
            "WHERE datname = %s",
            (name,),
        ).fetchone()
        if row is None:
            return lease, dead  # dropped meanwhile: try the name again
        if row[0] is None and not self.shared and dead:
            with self.registry.transaction() as txn:
                ids = {held.id for held in txn.find(LEASE_KIND, resource=name)}
                proof = [old for old in dead if old.id in ids and txn.stale_reason(old)]
            if proof:
                log.info(
                    "dropping %s before reusing its name: unmarked, and the lease of a process "
                    "that is gone names it (it died creating it)",
                    name,
                )
                self._drop(conn, name)
                return lease, dead
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
                    return lease, dead
        # Unmarked and not proven ours, or held by a live owner (maybe on another host): never
        # touch it. The dead owners' leases of that name stay: cleanup's proof, if it was theirs.
        tag = host_tag(self.registry.host) if self.shared else ""
        new_name = database_name(self.base, lease.project, _join(tag, os.urandom(3).hex()))
        with self.registry.transaction() as txn:
            return txn.update(replace(lease, resource=new_name)), []

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

    # --- warm spares ------------------------------------------------------------------------------

    def _claimable(
        self, rows: Any, template: str, template_oid: int | None, fp: str
    ) -> builtins.list[str]:
        """The spares (from the allocation query) made from this very template, shuffled so that
        concurrent claimers rarely race for the same one."""
        out = []
        for name, comment in rows or ():
            marker = parse_marker(comment)
            if (
                marker is not None
                and marker.get("kind") == SPARE_KIND
                and marker.get("base") == self.base
                and marker.get("template") == template
                and marker.get("fingerprint") == fp
                and template_oid is not None
                and marker.get("template_oid") == int(template_oid)
            ):
                out.append(str(name))
        random.shuffle(out)
        return out

    def _claim(
        self, conn: psycopg.Connection[Any], lease: Lease, spares: builtins.list[str]
    ) -> Lease | None:
        """Rename a spare to the lease's name and mark it, atomically; None if none was won."""
        if not spares:
            return None
        name = lease.resource
        self._hold(lease)
        marker = self._marker_sql(name, self._lease_marker(lease))
        for spare in spares[:4]:
            # One simple query is one implicit transaction: renamed and re-marked, or neither.
            statement = sql.SQL("ALTER DATABASE {} RENAME TO {}; {}").format(
                _ident(spare), _ident(name), marker
            )
            try:
                conn.execute(statement)
            except pgerrors.DuplicateDatabase:
                return None  # the name is taken on the server: the clone path sorts that out
            except (pgerrors.InvalidCatalogName, pgerrors.ObjectInUse):
                continue  # another allocator claimed it (or cleanup dropped it) first
            log.debug("claimed warm spare %s as %s", spare, name)
            return lease
        return None

    def _prepare_spares_later(self, templates: builtins.list[str]) -> None:
        """Top up the spares of ``templates`` in a background thread, after any earlier one."""

        def work(previous: threading.Thread | None) -> None:
            if previous is not None:
                previous.join(self.config.database.clone_timeout)
            for template in templates:
                try:
                    self.prepare_spares(template)
                except Exception as exc:  # a spare is an optimisation: never fail a run for it
                    log.warning("could not prepare a warm spare of %s: %s", template, exc)

        with self._spare_lock:
            thread = threading.Thread(
                target=work, args=(self._spare_thread,), name="e2e-infra spares", daemon=False
            )
            self._spare_thread = thread
            thread.start()

    def _make_spare(
        self,
        conn: psycopg.Connection[Any],
        template: str,
        template_oid: int,
        template_marker: dict[str, Any],
    ) -> str:
        name = spare_name(self.base, str(template_marker.get("fingerprint")))
        me = Owner.current(host=self.registry.host, run_id=self.config.run_id)
        # Its own Registry (so its own lock file handle): the registry's FileLock is re-entrant
        # across threads, and this runs beside the session's thread.
        registry = Registry(
            self.registry.state_dir,
            host=self.registry.host,
            lock_timeout=self.registry.lock_timeout,
            ttl=self.registry.ttl,
        )
        # The lease first: if we die between CREATE and COMMENT, cleanup knows the name is ours;
        # it goes only once the spare is marked, or proven not to exist.
        making = self._making(registry, SPARE_KIND, name, "(spares)", me)
        row = conn.execute("SELECT current_setting('fsync')").fetchone()
        strategy = self._strategy(str(row[0] if row else "on"), self._major(conn))
        backend = conn.info.backend_pid
        try:
            try:
                self._create(conn, name, template, strategy)
            except pgerrors.DuplicateDatabase:
                self._forget(registry, making)  # another's: never drop it
                raise
            marker = {
                "tool": TOOL,
                "format": TEMPLATE_FORMAT_VERSION,
                "base": self.base,
                "kind": SPARE_KIND,
                "template": template,
                "template_oid": template_oid,
                "fingerprint": template_marker.get("fingerprint"),
                "seed": template_marker.get("seed"),
                "host": me.host,
                "created_at": self.clock.time(),
            }
            conn.execute(self._marker_sql(name, marker))
        except pgerrors.DuplicateDatabase:
            raise
        except BaseException:
            if self._settle(conn, backend, name):
                self._forget(registry, making)
            raise
        self._forget(registry, making)
        log.info("prepared warm spare %s of %s", name, template)
        return name

    def _stale_spares(self, marked: builtins.list[_Marked]) -> builtins.list[tuple[_Marked, str]]:
        """Spares to drop: their template is gone, was rebuilt (another OID), is not the newest
        of its seed, or they are beyond ``spares`` for their template."""
        templates = {item.name: item for item in marked if item.kind == "template"}
        newest: dict[str, _Marked] = {}
        for item in templates.values():
            seed = str(item.marker.get("seed"))
            created = float(item.marker.get("created_at") or 0)
            if seed not in newest or created > float(newest[seed].marker.get("created_at") or 0):
                newest[seed] = item
        cap = self.config.database.spares
        kept: dict[str, int] = {}
        out = []
        spares = [item for item in marked if item.kind == SPARE_KIND]
        spares.sort(key=lambda it: float(it.marker.get("created_at") or 0))
        for item in spares:
            name = str(item.marker.get("template"))
            template = templates.get(name)
            if template is None:
                out.append((item, f"spare of template {name}, which is gone"))
            elif template.oid != item.marker.get("template_oid"):
                out.append((item, f"spare of an earlier build of {name}"))
            elif newest.get(str(template.marker.get("seed"))) is not template:
                out.append((item, f"spare of {name}, no longer the newest template of its seed"))
            elif kept.get(name, 0) >= cap:
                out.append((item, f"spare beyond spares = {cap} for {name}"))
            else:
                kept[name] = kept.get(name, 0) + 1
        return out

    # --- shared servers: proof of life by advisory lock ---------------------------------------

    def _hold(self, lease: Lease) -> None:
        """On a shared server, hold the key of the lease's name (shared) on a connection of its
        own for as long as this process uses the database; idempotent. Waits out a cleanup that
        holds it. When the owner is another process (``invoke db.allocate`` records its parent),
        nothing here can live as long as the owner: the marker then says ``hold: false``."""
        name = lease.resource
        if not self.shared or name in self._holders or lease.owner.pid != os.getpid():
            return
        key = _name_key(name)
        conn = connect(self.admin, purpose=f"hold {name}")
        try:
            advisory_lock(
                conn,
                key,
                shared=True,
                timeout=self.config.database.clone_timeout,
                what=f"the lock of database name {name} (a cleanup is dropping a database of "
                "that name)",
                clock=self.clock,
            )
        except BaseException:
            conn.close()
            raise
        self._holders[name] = conn

    def _unhold(self, name: str) -> None:
        conn = self._holders.pop(name, None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()  # the session ends, and its advisory locks with it

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
            for lease in kept:
                self._unhold(lease.resource)  # the keep in the marker protects it from now on
            return [lease.resource for lease in kept]
        with self._admin() as conn:
            for name in names:
                self._drop(conn, name)
        for name in names:
            self._unhold(name)
        with self.registry.transaction() as txn:
            for lease in leases:
                txn.remove(lease)
        templates = {str(lease.data.get("template") or "") for lease in leases} - {""}
        if self.config.database.spares > 0 and templates:
            self._prepare_spares_later(sorted(templates))
        return names

    def _why_drop(
        self,
        txn: Transaction,
        item: _Marked,
        lease: Lease | None,
        now: float,
        *,
        lock_free: Callable[[str], bool] | None = None,
    ) -> str | None:
        """Why ``item`` may be dropped, or None. ``lock_free(name)`` takes the name's advisory
        key exclusively if nobody holds it (a shared server's proof that another host's owner is
        gone); without it, another host's database is never proven dead."""
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
            host = item.marker.get("host")
            if host == txn.host or not self.shared:
                gone = item.owner_gone(txn.host)
                return f"no lease and {gone}" if gone else None
            # Another host's database on a shared server.
            if item.marker.get("hold"):
                if lock_free is not None and lock_free(item.name):
                    return f"its owner on host {host} holds no lock on it any more (gone)"
                return None
            created = item.marker.get("created_at")
            ttl = txn.ttl
            if ttl is not None and isinstance(created, (int, float)) and now - created > ttl:
                return (
                    f"owner on host {host} cannot be checked (allocated by a command) and it is "
                    f"older than lease_ttl ({ttl:g}s)"
                )
            return None
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
        if item.kind == SPARE_KIND:
            return f"spare of {item.marker.get('template')}"
        why = self._why_drop(txn, item, lease, now)
        if why is not None:
            return f"stale: {why}"
        keep_until = item.marker.get("keep_until")
        if isinstance(keep_until, (int, float)):
            return f"kept until {_when(keep_until)}"
        if lease is None:
            host = item.marker.get("host")
            if self.shared and host != txn.host:
                how = "holds its lock" if item.marker.get("hold") else "allocated by a command"
                return f"live (host {host} {how})"
            return "live (no lease here: another host or state folder)"
        return "live"


def _reusable(conn: psycopg.Connection[Any], *, probe: bool = True) -> bool:
    """Whether the kept admin connection can serve another call: open, unbroken, idle, and (with
    ``probe``) with nothing to read -- an idle connection that has something to read was ended by
    the server (a restart, ``pg_terminate_backend``: the notice, then EOF); a zero-timeout
    ``poll`` sees that without a round trip."""
    if conn.closed or conn.broken:
        return False
    if conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return False
    if not probe:
        return True
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError, psycopg.Error):
        return False


def _join(*parts: str) -> str:
    return "_".join(part for part in parts if part)


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
