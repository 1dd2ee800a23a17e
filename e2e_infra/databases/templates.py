"""Templates: built once per fingerprint under an advisory lock, published by rename, pruned by age.

The template of a fingerprint (``<base>_tpl_<seed>_<fp[:12]>``) is built under a session advisory
lock held on a connection of its own: created as ``<base>_build_<fp[:12]>_<pid>`` (marked
``building`` with the builder's host, pid and start time), migrated, seeded, marked
``IS_TEMPLATE true, ALLOW_CONNECTIONS false`` and only then published by rename, so a database
with the template's name is always complete. A half-built template is dropped on failure (with its
build role), and by the next builder or ``cleanup`` if its builder died. The migrations and seeds
run as the build database's own login role, never as the admin (see :mod:`.roles`): a template is
only ever touched by the tool and that role, never by a project role (spares and clones are copies
of a published template; a rebuild builds a new one from ``template0``).

Templates are kept by last use, per fingerprint: each clone records its template's last use in
the marker (rate-limited), and pruning drops only those not used for ``template_keep_hours``
beyond the ``keep_templates`` most recently used of their seed, never one a clone is being made
from (see :meth:`Templates.prune`).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..resources.leases import Owner
from .catalog import Catalog
from .markers import Kind, MarkedDatabase, Marker, stale_spares, templates_to_prune
from .migrations import Runner, advisory_lock, connect
from .names import build_key, build_name, build_prefix, ident, name_key

__all__ = ["Templates"]

log = logging.getLogger("e2e_infra")

# A template's last use is written to its marker at most this often (seconds): enough for an age
# counted in hours, and cheap.
_TOUCH_EVERY = 300.0


class Templates:
    """Build, rebuild and prune the templates of one name base."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @staticmethod
    def ready(conn: psycopg.Connection[Any], template: str) -> bool | None:
        """True: published; False: exists but not a finished template; None: absent."""
        row = conn.execute(
            "SELECT datistemplate AND NOT datallowconn FROM pg_database WHERE datname = %s",
            (template,),
        ).fetchone()
        return None if row is None else bool(row[0])

    def ensure(
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
    ) -> bool:
        """Build ``template`` unless it is ready (always with ``rebuild``), under its build lock;
        then prune the old ones. Whether this call built it (False: another process had, while
        this one waited for the lock)."""
        cat = self.catalog
        key = build_key(fp)
        lock = connect(cat.admin, purpose=f"template lock {fp[:12]}", admin=True)
        try:
            advisory_lock(
                lock,
                key,
                timeout=cat.build_timeout,
                what=f"the build lock of template {template} (another process is building it)",
                clock=cat.clock,
                hint="see who holds it with `invoke db.list`; raise database.build_timeout "
                "(E2E_BUILD_TIMEOUT) for slow migrations",
            )
            # Someone else may have built it while we waited.
            state = self.ready(conn, template)
            if state is True and not rebuild:
                return False
            # We hold the lock: any build of this fingerprint left on the server is a dead one's.
            marked = cat.marked(conn)
            for item in marked:
                if item.kind is Kind.BUILDING and item.marker.fingerprint == fp:
                    log.info(
                        "dropping %s, a half-built template of a builder that is gone", item.name
                    )
                    cat.drop(conn, item.name)
            # And one that died before marking it, if its lease is in our registry.
            cat.drop_half_made(
                conn,
                {item.name for item in marked},
                kinds=frozenset({Kind.BUILDING.value}),
                prefix=build_prefix(cat.base, fp),
            )
            if state is not None:
                cat.drop(conn, template, template=True)
            self._build(conn, template, fp, seed, migrations, seeds, run=run)
        finally:
            with contextlib.suppress(psycopg.Error):
                lock.execute("SELECT pg_advisory_unlock(%s)", (key,))
            lock.close()
        self.prune(conn, keep=template)
        return True

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
        cat = self.catalog
        me = Owner.current(host=cat.registry.host, run_id=run)
        building = build_name(cat.base, fp, me.pid)
        marker = Marker(
            kind=Kind.BUILDING,
            base=cat.base,
            fingerprint=fp,
            seed=seed,
            template=template,
            host=me.host,
            pid=me.pid,
            start=me.start_time,
            run=run,  # the run that built it (None for `invoke db.template`)
            created_at=cat.clock.time(),
        )
        started = time.monotonic()
        # The lease first: if we die between CREATE and COMMENT, cleanup knows the name is ours.
        making = cat.making(cat.registry, Kind.BUILDING.value, building, "(templates)", me)
        backend = conn.info.backend_pid
        try:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0{}").format(
                    ident(building), cat.owner_clause()
                )
            )
        except sqlerrors.DuplicateDatabase:
            cat.forget(cat.registry, making)  # not ours: never drop it
            raise
        except BaseException:
            if cat.settle(conn, backend, building, template=True):
                cat.forget(cat.registry, making)
            raise
        try:
            # Marked with its own login role, which owns it while it is built: the migrations
            # and seeds run as that role, never as the admin (see .roles).
            cat.roles.make(conn, building, marker.comment_sql(building), cat.roles.login(making))
            cat.roles.prepare_build(conn, building)
            if not cat.shared:
                cat.roles.lock_down_server(conn)
            target = cat.roles.url(making)
            migrations.apply(target)
            seeds.apply(target)
            # A migrate command's sessions may linger a moment after it exits; rename waits on them.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (building,),
            )
            cat.roles.finish_build(conn, building)  # its objects to the group; the role goes
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    ident(building)
                )
            )
            cat.mark(conn, building, dataclasses.replace(marker, kind=Kind.TEMPLATE, pid=None))
            # Publication is the rename: a database with the template's name is always complete.
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(ident(building), ident(template))
            )
        except BaseException:
            if cat.settle(conn, backend, building, template=True):
                cat.forget(cat.registry, making)
            raise
        cat.forget(cat.registry, making)
        log.info("built template %s (seed %s) in %.2fs", template, seed, time.monotonic() - started)

    def prune(
        self, conn: psycopg.Connection[Any], *, keep: str | None
    ) -> builtins.list[tuple[str, str]]:
        """Drop the templates that were not used recently (see
        :func:`.markers.templates_to_prune`), then the spares of templates that are gone.

        Several hosts may prune at once, and clones may be in flight: each template is dropped
        only under its name's advisory lock taken exclusively with ``pg_try_advisory_lock`` (a
        clone holds it shared while it copies, see :meth:`using`; another pruner holds it while
        it drops), and judged again from a fresh marker under that lock."""
        cat = self.catalog
        dropped = []
        db = cat.config.database
        max_age = db.template_keep_hours * 3600

        def doomed() -> builtins.list[tuple[MarkedDatabase, str]]:
            return templates_to_prune(
                cat.marked(conn),
                keep=keep,
                limit=db.keep_templates,
                now=cat.clock.time(),
                max_age=max_age,
            )

        for item, _why in doomed():
            key = name_key(item.name)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not (row and row[0]):
                continue  # being cloned from, or another pruner has it
            try:
                again = {it.name: why for it, why in doomed()}
                if item.name in again and cat.drop(conn, item.name, template=True):
                    log.info("dropped %s: %s", item.name, again[item.name])
                    dropped.append((item.name, again[item.name]))
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        for item, why in stale_spares(cat.marked(conn), db.spares):
            if cat.drop(conn, item.name):
                log.info("dropped %s: %s", item.name, why)
                dropped.append((item.name, why))
        return dropped

    @contextlib.contextmanager
    def using(self, conn: psycopg.Connection[Any], template: str) -> Iterator[None]:
        """Hold ``template``'s name lock shared while cloning from it (no pruner drops it
        meanwhile); then record its last use in its marker (see :meth:`touch`)."""
        key = name_key(template)
        advisory_lock(
            conn,
            key,
            shared=True,
            timeout=self.catalog.config.database.clone_timeout,
            what=f"template {template} (another process is dropping it)",
            clock=self.catalog.clock,
        )
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_shared(%s)", (key,))
        self.touch(conn, template)

    def touch(self, conn: psycopg.Connection[Any], template: str) -> None:
        """Record now as the template's last use in its marker, at most every
        :data:`_TOUCH_EVERY` seconds, and never waiting on a clone in flight (COMMENT takes a
        lock that conflicts with CREATE DATABASE's on the template): skipped if not granted at
        once. Pruning is by last use, so templates in use stay."""
        cat = self.catalog
        now = cat.clock.time()
        try:
            row = conn.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (template,),
            ).fetchone()
            marker = Marker.parse(row[0]) if row else None
            if marker is None or marker.kind is not Kind.TEMPLATE:
                return
            if now - max(marker.last_used or 0.0, marker.created_at or 0.0) < _TOUCH_EVERY:
                return
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '50ms'")
                conn.execute(dataclasses.replace(marker, last_used=now).comment_sql(template))
        except (sqlerrors.LockNotAvailable, sqlerrors.InvalidCatalogName):
            pass  # busy or gone: the next clone records it
