"""Sweeping and listing: observe the facts about each marked database, let the policy of
:mod:`.markers` decide, drop what it proves dead.

:meth:`Sweeper.cleanup` drops marked databases whose owner is proven gone (or whose keep expired),
old templates beyond ``keep_templates``, half-built ones whose builder died, and what a process
that died before marking it left: an unmarked database named exactly by a stale lease of ours (the
lease is the proof it was ours). Never any other unmarked database.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass

from ..leases import Lease, Transaction, process_start_time
from .catalog import Catalog
from .markers import Action, Facts, Kind, MarkedDatabase, Marker, decide, stale_spares, status
from .shared import DeathProof
from .templates import Templates

__all__ = ["DatabaseInfo", "Sweeper", "facts", "owner_gone", "why_drop"]

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
    txn: Transaction, marker: Marker, lease: Lease | None, now: float, *, shared: bool
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
    )


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

    def cleanup(self) -> builtins.list[tuple[str, str]]:
        """Drop what is proven dead (see the module); ``(name, why)`` of each database dropped."""
        cat = self.catalog
        dropped: builtins.list[tuple[str, str]] = []
        with cat.connections.lend(reuse=False) as conn:  # it takes session advisory locks
            marked = cat.marked(conn)
            now = cat.clock.time()
            doomed: builtins.list[tuple[MarkedDatabase, str]] = []
            proof = DeathProof(conn)  # keys taken to prove another host's owner gone
            with cat.registry.transaction() as txn:
                by_id = {lease.id: lease for lease in txn.find(LEASE_KIND)}
                for item in marked:
                    lease = by_id.get(str(item.marker.lease))
                    why = why_drop(txn, item, lease, now, shared=cat.shared, lock_free=proof)
                    if why is not None:
                        doomed.append((item, why))
            doomed.extend(stale_spares(marked, cat.config.database.spares))
            try:
                for item, why in doomed:
                    cat.drop(conn, item.name, template=item.is_template)
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

    def list(self) -> builtins.list[DatabaseInfo]:
        """Marked databases of this name base, joined with the leases; leases without one too."""
        cat = self.catalog
        with cat.connections.lend() as conn:
            marked = cat.marked(conn, size=True)
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
                        status=status(m, facts(txn, m, lease, now, shared=cat.shared)),
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
