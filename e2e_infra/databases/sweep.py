"""Sweeping and listing: observe the facts about each marked database, let the policy of
:mod:`.markers` decide, drop what it proves dead.

:meth:`Sweeper.cleanup` drops marked databases whose owner is proven gone (or whose keep expired),
old templates beyond ``keep_templates``, half-built ones whose builder died (on a shared server:
whose build lock was found free twice, as for any owner there), and what a process
that died before marking it left: an unmarked database named exactly by a stale lease of ours (the
lease is the proof it was ours). Never any other unmarked database.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..resources.leases import Lease, Transaction, process_start_time
from .catalog import Catalog
from .markers import Action, Facts, Kind, MarkedDatabase, Marker, decide, stale_spares, status
from .names import build_key, ident, name_key
from .shared import DEATH_GRACE, DeathProof, held_keys
from .templates import Templates

__all__ = ["DatabaseInfo", "Sweeper", "facts", "owner_gone", "proof_key", "why_drop"]

log = logging.getLogger("e2e_infra")

LEASE_KIND = Kind.DATABASE.value
_START_TIME_TOLERANCE = 0.05  # seconds between two readings of one process's start time


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


def owner_gone(marker: Marker, host: str) -> str | None:
    """Why the process named in the marker is proven gone, or None (also when it runs on another
    host: its pid means nothing here)."""
    pid, start = marker.pid, marker.start
    if marker.host != host or pid is None:
        return None
    now_start = process_start_time(pid)
    if now_start is None:
        return f"owner pid {pid} is gone"
    if start is not None and abs(now_start - start) > _START_TIME_TOLERANCE:
        return f"owner pid {pid} was reused by another process"
    return None


def facts(
    txn: Transaction,
    marker: Marker,
    lease: Lease | None,
    now: float,
    *,
    shared: bool,
    locked: bool | None = None,
) -> Facts:
    """What the registry and the process table say about the owner of ``marker``; ``lease``:
    ours that the marker names, if any."""
    keep = lease.data.get("keep_until") if lease is not None else None
    return Facts(
        now=now,
        host=txn.host,
        shared=shared,
        ttl=txn.ttl,
        owner_gone=owner_gone(marker, txn.host),
        has_lease=lease is not None,
        lease_keep_until=keep if isinstance(keep, (int, float)) else None,
        lease_stale=txn.stale_reason(lease) if lease is not None else None,
        locked=locked,
    )


def proof_key(item: MarkedDatabase) -> int | None:
    """The advisory key whose holder proves the owner of ``item`` alive on a shared server: a
    half-built template's builder holds its fingerprint's build lock for the whole build; any
    other owner holds the name's key. None: nothing can prove it (a marker without a usable
    fingerprint), so it is never dropped on lock proof."""
    if item.kind is Kind.BUILDING:
        fp = item.marker.fingerprint or ""
        try:
            return build_key(fp) if len(fp) >= 16 else None
        except ValueError:  # not hex: not written by this tool
            return None
    return name_key(item.name)


def why_drop(
    txn: Transaction,
    item: MarkedDatabase,
    lease: Lease | None,
    now: float,
    *,
    shared: bool,
    lock_free: Callable[[str], bool] | None = None,
) -> str | None:
    """Why ``item`` may be dropped, or None: :func:`.markers.decide` on the facts observed now.
    ``lock_free(name)`` takes the name's advisory key exclusively if nobody holds it (a shared
    server's proof that another host's owner is gone); it is asked only about a database whose
    owner said it holds the key. Without it, another host's database is never proven dead."""
    verdict = decide(item.marker, facts(txn, item.marker, lease, now, shared=shared))
    if verdict.action is Action.DROP_IF_UNLOCKED:
        return verdict.reason if lock_free is not None and lock_free(item.name) else None
    return verdict.reason if verdict.drop else None


class Sweeper:
    """``db.cleanup`` and ``db.list`` for one name base."""

    def __init__(self, catalog: Catalog, templates: Templates) -> None:
        self.catalog = catalog
        self.templates = templates

    def cleanup(self, *, grace: float = DEATH_GRACE) -> builtins.list[tuple[str, str]]:
        """Drop what is proven dead (see the module); ``(name, why)`` of each database dropped.

        Another owner's database on a shared server is judged twice: its lock found free and
        taken, held for ``grace`` seconds (longer than an owner's re-take after losing its
        connection) while nobody asked for it, and judged again; a project database that any
        session is connected to is never dropped."""
        cat = self.catalog
        dropped: builtins.list[tuple[str, str]] = []
        with cat.connections.lend(reuse=False) as conn:  # it takes session advisory locks
            marked = cat.marked(conn)
            proof = DeathProof(conn)  # keys taken to prove another owner gone
            doomed = self._judge(marked, proof.take)
            suspects = [item for item, why, needs_proof in doomed if needs_proof]
            if suspects:
                # Hold their keys through the grace: an owner re-taking its lock waits for it,
                # is seen, and gets it at once. Then judge again, from fresh facts.
                alive = proof.watch(grace, cat.clock)
                marked = cat.marked(conn)
                again = {item.name for item in suspects if proof_key(item) not in alive}
                judged = self._judge(marked, lambda key: key not in alive and proof.take(key))
                doomed = [entry for entry in judged if not entry[2] or entry[0].name in again]
            try:
                for item, why, _ in doomed:
                    if item.kind.is_project_database:
                        if drop_unused(cat, conn, item.name):
                            dropped.append((item.name, why))
                    elif cat.drop(conn, item.name, template=item.is_template):
                        dropped.append((item.name, why))
                for item, why in stale_spares(marked, cat.config.database.spares):
                    if cat.drop(conn, item.name):
                        dropped.append((item.name, why))
                names = {item.name for item in marked}
                dropped.extend(cat.drop_half_made(conn, names, lock_free=proof))
            finally:
                proof.release()
            dropped.extend(self.templates.prune(conn, keep=None))
            cat.roles.drop_orphans(conn)  # logged; roles are not databases
        gone = {name for name, _ in dropped}
        with cat.registry.transaction() as txn:
            for lease in txn.find(LEASE_KIND):
                if lease.resource in gone:
                    txn.remove(lease)
        return dropped

    def _judge(
        self, marked: builtins.list[MarkedDatabase], lock_free: Callable[[int], bool]
    ) -> builtins.list[tuple[MarkedDatabase, str, bool]]:
        """``(item, why, needed the lock proof)`` of each database the policy lets go now;
        ``lock_free(key)`` looks at (or takes) the item's :func:`proof_key`."""
        cat = self.catalog
        now = cat.clock.time()
        out: builtins.list[tuple[MarkedDatabase, str, bool]] = []
        with cat.registry.transaction() as txn:
            by_id = {lease.id: lease for lease in txn.find(LEASE_KIND)}
            for item in marked:
                lease = by_id.get(str(item.marker.lease))
                verdict = decide(
                    item.marker, facts(txn, item.marker, lease, now, shared=cat.shared)
                )
                if verdict.action is Action.DROP_IF_UNLOCKED:
                    key = proof_key(item)
                    if key is not None and lock_free(key):
                        out.append((item, verdict.reason, True))
                elif verdict.drop:
                    out.append((item, verdict.reason, False))
        return out

    def list(self) -> builtins.list[DatabaseInfo]:
        """Marked databases of this name base, joined with the leases; leases without one too."""
        cat = self.catalog
        with cat.connections.lend() as conn:
            marked = cat.marked(conn, size=True)
            locks = held_keys(conn) if cat.shared else None
        now = cat.clock.time()
        out: builtins.list[DatabaseInfo] = []
        with cat.registry.transaction() as txn:
            by_id = {lease.id: lease for lease in txn.find(LEASE_KIND)}
            seen: set[str] = set()
            for item in marked:
                m = item.marker
                lease = by_id.get(str(m.lease))
                if lease is not None:
                    seen.add(lease.id)
                out.append(
                    DatabaseInfo(
                        name=item.name,
                        project=m.project,
                        kind=item.kind.value,
                        size=item.size,
                        status=status(
                            m,
                            facts(
                                txn,
                                m,
                                lease,
                                now,
                                shared=cat.shared,
                                locked=None if locks is None else proof_key(item) in locks,
                            ),
                        ),
                        owner_pid=m.pid,
                        run_id=m.run,
                        created_at=m.created_at,
                        keep_until=m.keep_until,
                        seed=m.seed,
                        template=m.template,
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


def drop_unused(cat: Catalog, conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop project database ``name`` unless a session is connected to it: new connections are
    refused first, then the sessions counted, so none can slip in between. True if it was dropped
    (False: in use, or already gone)."""
    name_sql = ident(name)
    try:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name_sql))
    except (sqlerrors.InvalidCatalogName, sqlerrors.ObjectNotInPrerequisiteState):
        return False  # gone, or being dropped by another cleanup
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
    ).fetchone()
    if row is not None and row[0]:
        log.info("kept %s: %d session(s) connected to it", name, row[0])
        try:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name_sql))
        except (sqlerrors.InvalidCatalogName, sqlerrors.ObjectNotInPrerequisiteState):
            return False
        return False
    return cat.drop(conn, name)
