"""Warm spares: clones of the current template made off the suite's critical path.

A spare (``spares`` > 0) is made after a release, in a background thread the allocator joins in
``close``: created by ``CREATE DATABASE ... TEMPLATE`` (atomic) as
``<base>_spare_<fp[:12]>_<random>`` while a registry lease of kind ``spare`` names it (so a maker
that dies before marking it leaves proof of what to drop), then marked ``kind spare`` with the
template's name, OID and fingerprint. At most ``spares`` per template, made under an advisory
lock; they count toward the maker's ``max_databases`` (on a shared server, any host may claim
them). The next allocation claims one with
``ALTER DATABASE spare RENAME TO target; COMMENT ...`` in one implicit transaction: only a spare of
the current template (same OID, so not from before a rebuild) is taken, and losing a race to
another claimer just means trying the next, or cloning. Spares of old templates are dropped when a
template is built or pruned, and by ``cleanup``.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import random
import threading
from typing import Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..resources.leases import Owner, Registry
from .catalog import Catalog
from .markers import Kind, Marker, count_databases, stale_spares
from .names import ident, spare_key, spare_name
from .roles import Roles
from .shared import CreationGate

__all__ = ["Spares"]

log = logging.getLogger("e2e_infra")


class Spares:
    """Make, claim and top up the warm spares of one name base."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- claiming (the allocation's critical path) ---------------------------------------------

    def claimable(
        self, rows: Any, template: str, template_oid: int | None, fp: str
    ) -> builtins.list[str]:
        """The spares (``(name, comment)`` rows) made from this very template, shuffled so that
        concurrent claimers rarely race for the same one."""
        out = []
        for name, comment in rows or ():
            marker = Marker.parse(comment)
            if marker is not None and marker.is_spare_of(
                self.catalog.base, template, template_oid, fp
            ):
                out.append(str(name))
        random.shuffle(out)
        return out

    @staticmethod
    def claim(
        conn: psycopg.Connection[Any],
        name: str,
        marker: Marker,
        spares: builtins.list[str],
        login: sql.Composable,
    ) -> bool:
        """Rename one of ``spares`` and its role to ``name``, let the role log in (``login``) and
        mark it, atomically; False if none was won."""
        comment = marker.comment_sql(name)
        for spare in spares[:4]:
            # One simple query is one implicit transaction: renamed and re-marked, or neither.
            statement = sql.SQL("ALTER DATABASE {} RENAME TO {}; {}; {}").format(
                ident(spare), ident(name), Roles.claim_statements(spare, name, login), comment
            )
            try:
                conn.execute(statement)
            except (sqlerrors.DuplicateDatabase, sqlerrors.DuplicateObject):
                return False  # the name is taken on the server: the clone path sorts that out
            except (
                sqlerrors.InvalidCatalogName,
                sqlerrors.ObjectInUse,
                sqlerrors.UndefinedObject,
            ):
                continue  # another allocator claimed it (or cleanup dropped it) first
            log.debug("claimed warm spare %s as %s", spare, name)
            return True
        return False

    # --- topping up --------------------------------------------------------------------------

    def prepare(self, template: str, *, cap: int | None = None) -> builtins.list[str]:
        """Top up the warm spares of ``template`` to ``spares`` (or ``cap``: an environment kept
        up keeps one for its resets); the names made. Only one process tops up a template at a
        time (an advisory lock; the others skip), spares of an older template of the same seed
        are dropped first, and ``max_databases`` is respected."""
        cat = self.catalog
        cap = cat.config.database.spares if cap is None else cap
        made: builtins.list[str] = []
        if cap <= 0:
            return made
        # A connection of its own: it takes a session advisory lock (and runs in the spare thread).
        with cat.connections.lend(reuse=False) as conn:
            row = conn.execute(
                "SELECT oid, shobj_description(oid, 'pg_database'), "
                "datistemplate AND NOT datallowconn FROM pg_database WHERE datname = %s",
                (template,),
            ).fetchone()
            marker = Marker.parse(row[1]) if row else None
            if row is None or not row[2] or marker is None or marker.kind is not Kind.TEMPLATE:
                return made  # pruned or rebuilt meanwhile: nothing to prepare for
            fp = marker.fingerprint or ""
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (spare_key(fp),)).fetchone()
            if not (locked and locked[0]):
                return made  # another process is topping up this template
            try:
                marked = cat.marked(conn)
                for item, why in stale_spares(marked, cap):
                    log.info("dropped %s: %s", item.name, why)
                    cat.drop(conn, item.name)
                    marked.remove(item)
                current = [
                    item
                    for item in marked
                    if item.kind is Kind.SPARE and item.marker.template_oid == row[0]
                ]
                # Counted and made under the allocators' creation gate: the caps hold.
                with CreationGate.of(cat.config, cat.registry.host, timeout=cat.build_timeout).held(
                    conn, cat.clock
                ):
                    for _ in range(min(cap - len(current), self._room(conn))):
                        made.append(self._make(conn, template, int(row[0]), marker))
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (spare_key(fp),))
        return made

    def _room(self, conn: psycopg.Connection[Any]) -> int:
        """How many more databases the caps allow: ``max_databases`` counts this host's (on a
        shared server; every other host's spares are theirs), ``server_max_databases`` all."""
        cat = self.catalog
        db = cat.config.database
        mine, everyone = count_databases(cat.marked(conn), cat.registry.host)
        room = db.max_databases - (mine if cat.shared else everyone)
        if db.server_max_databases:
            room = min(room, db.server_max_databases - everyone)
        return room

    def _make(
        self, conn: psycopg.Connection[Any], template: str, template_oid: int, of: Marker
    ) -> str:
        cat = self.catalog
        name = spare_name(cat.base, str(of.fingerprint))
        me = Owner.current(host=cat.registry.host, run_id=cat.config.run_id)
        # Its own Registry (so its own lock file handle): the registry's FileLock is re-entrant
        # across threads, and this runs beside the session's thread.
        registry = Registry(
            cat.registry.state_dir,
            host=cat.registry.host,
            lock_timeout=cat.registry.lock_timeout,
            ttl=cat.registry.ttl,
        )
        # The lease first: if we die between CREATE and COMMENT, cleanup knows the name is ours;
        # it goes only once the spare is marked, or proven not to exist.
        making = cat.making(registry, Kind.SPARE.value, name, "(spares)", me)
        row = conn.execute("SELECT current_setting('fsync')").fetchone()
        strategy = cat.strategy(str(row[0] if row else "on"), cat.major(conn))
        backend = conn.info.backend_pid
        try:
            try:
                cat.create(conn, name, template, strategy)
            except sqlerrors.DuplicateDatabase:
                cat.forget(registry, making)  # another's: never drop it
                raise
            marker = Marker(
                kind=Kind.SPARE,
                base=cat.base,
                template=template,
                template_oid=template_oid,
                fingerprint=of.fingerprint,
                seed=of.seed,
                host=me.host,
                created_at=cat.clock.time(),
            )
            # Its role (NOLOGIN until claimed) and grants now, off the critical path.
            cat.roles.make(conn, name, marker.comment_sql(name), None)
        except sqlerrors.DuplicateDatabase:
            raise
        except BaseException:
            if cat.settle(conn, backend, name):
                cat.forget(registry, making)
            raise
        cat.forget(registry, making)
        log.info("prepared warm spare %s of %s", name, template)
        return name

    def drop_all(self, template: str) -> builtins.list[str]:
        """Drop every warm spare of ``template``; the names dropped. A spare being claimed
        meanwhile is either renamed first (not dropped) or gone for its claimer (who clones)."""
        cat = self.catalog
        dropped: builtins.list[str] = []
        with cat.connections.lend() as conn:
            for item in cat.marked(conn):
                ours = item.kind is Kind.SPARE and item.marker.template == template
                if ours and cat.drop(conn, item.name):
                    dropped.append(item.name)
        return dropped

    # --- the background thread ---------------------------------------------------------------

    def prepare_later(self, templates: builtins.list[str], *, cap: int | None = None) -> None:
        """Top up the spares of ``templates`` in a background thread, after any earlier one."""
        cat = self.catalog

        def work(previous: threading.Thread | None) -> None:
            if previous is not None:
                previous.join(cat.config.database.clone_timeout)
            for template in templates:
                try:
                    with cat.errors("prepare warm spares"):
                        self.prepare(template, cap=cap)
                except Exception as exc:  # a spare is an optimisation: never fail a run for it
                    log.warning("could not prepare a warm spare of %s: %s", template, exc)

        with self._lock:
            thread = threading.Thread(
                target=work, args=(self._thread,), name="e2e-infra spares", daemon=False
            )
            self._thread = thread
            thread.start()

    def join(self, limit: float) -> None:
        """Wait (at most ``limit``) for the spare being prepared in the background, if any."""
        with self._lock:
            thread, self._thread = self._thread, None
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
