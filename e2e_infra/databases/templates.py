"""Templates: built once per fingerprint under an advisory lock, published by rename, pruned by age.

The template of a fingerprint (``<base>_tpl_<seed>_<fp[:12]>``) is built under a session advisory
lock held on a connection of its own: created as ``<base>_build_<fp[:12]>_<pid>`` (marked
``building`` with the builder's host, pid and start time), migrated, seeded, marked
``IS_TEMPLATE true, ALLOW_CONNECTIONS false`` and only then published by rename, so a database
with the template's name is always complete. A half-built template is dropped on failure, and by
the next builder or ``cleanup`` if its builder died.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import time
from typing import Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..leases import Owner
from ..migrations import Runner, advisory_lock, connect
from .catalog import Catalog
from .markers import Kind, Marker, stale_spares, templates_to_prune
from .names import build_key, build_name, build_prefix, ident

__all__ = ["Templates"]

log = logging.getLogger("e2e_infra")


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
    ) -> None:
        """Build ``template`` unless it is ready (always with ``rebuild``), under its build lock;
        then prune the old ones."""
        cat = self.catalog
        key = build_key(fp)
        lock = connect(cat.admin, purpose=f"template lock {fp[:12]}")
        try:
            advisory_lock(
                lock,
                key,
                timeout=cat.build_timeout,
                what=f"the build lock of template {template} (another process is building it)",
                clock=cat.clock,
                hint="see who holds it with `invoke db.list`; raise the build timeout for slow "
                "migrations",
            )
            # Someone else may have built it while we waited.
            state = self.ready(conn, template)
            if state is True and not rebuild:
                return
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
            cat.mark(conn, building, marker)
            target = cat.client.with_dbname(building)
            migrations.apply(target)
            seeds.apply(target)
            cat.roles.grant_template(conn, building)  # what the project roles may use
            # A migrate command's sessions may linger a moment after it exits; rename waits on them.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (building,),
            )
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
        """Drop templates beyond the newest ``keep_templates`` of each seed profile, then the
        spares of templates that are gone or no longer the newest (the template changed)."""
        cat = self.catalog
        dropped = []
        limit = cat.config.database.keep_templates
        for item, why in templates_to_prune(cat.marked(conn), keep=keep, limit=limit):
            cat.drop(conn, item.name, template=True)
            log.info("dropped %s: %s", item.name, why)
            dropped.append((item.name, why))
        for item, why in stale_spares(cat.marked(conn), cat.config.database.spares):
            cat.drop(conn, item.name)
            log.info("dropped %s: %s", item.name, why)
            dropped.append((item.name, why))
        return dropped
