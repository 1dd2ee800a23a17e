"""Reclaim what dead owners left: orphan server groups, marked processes, ports and databases.

Used by every session at its start (for what a SIGKILLed run left), by the guardian when its
session died, and by ``invoke e2e.cleanup``. Only what is provably dead goes: a lease whose owner's
pid + start time no longer match a live process, a process group whose leader is still the one
recorded, a process carrying a dead run's environment marker
(:mod:`e2e_infra.processes.containment`), a marked database with no live lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import E2EInfraError
from ..processes.containment import CONTAINED_KIND, sweep_dead
from ..resources.leases import Registry
from .workspace import Workspace

__all__ = ["SERVER_KIND", "ReclaimReport", "reclaim"]

SERVER_KIND = "server"


@dataclass
class ReclaimReport:
    servers: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)
    databases: list[tuple[str, str]] = field(default_factory=list)
    ports: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.servers or self.databases or self.ports)

    def to_json(self) -> dict[str, Any]:
        def rows(items: list[tuple[str, str]]) -> list[dict[str, str]]:
            return [{"resource": what, "reason": why} for what, why in items]

        return {
            "servers": rows(self.servers),
            "databases": rows(self.databases),
            "ports": rows(self.ports),
            "errors": self.errors,
        }


def reclaim(
    config: Config,
    *,
    registry: Registry | None = None,
    run_id: str | None = None,
    databases: bool = True,
    ports: bool = True,
) -> ReclaimReport:
    """Reclaim everything whose owner is provably gone (only ``run_id``'s, when given).

    Orphan server process groups are killed only if they are still ours (pid + start time);
    marked databases without a live lease are dropped (never unmarked ones); stale port leases are
    released (``ports=False``: the caller allocates ports next, which drops them on the way). The
    local PostgreSQL cluster is not started just to clean up.
    """
    from .servers import ProcessRecord, kill_group_if_ours, kill_tree_if_ours

    ws = Workspace(config, registry=registry)
    registry = ws.registry
    report = ReclaimReport()
    with registry.transaction() as txn:
        stale_servers = [
            (lease, why)
            for lease, why in txn.stale(SERVER_KIND)
            if run_id is None or lease.owner.run_id == run_id
        ]
        stale_runs = [
            (lease, why)
            for lease, why in txn.stale(CONTAINED_KIND)
            if run_id is None or lease.owner.run_id == run_id
        ]
    for lease, why in stale_servers:
        data = lease.data
        try:
            record = ProcessRecord(
                pid=int(data["pid"]), pgid=int(data["pgid"]), start_time=float(data["start_time"])
            )
            # A suite shares the group of the run that started it: end its own tree only.
            kill = kill_tree_if_ours if data.get("scope") == "tree" else kill_group_if_ours
            killed = kill(record, grace=2.0)
        except (KeyError, TypeError, ValueError) as exc:
            report.errors.append(f"server lease {lease.id} is malformed: {exc}")
            killed = False
        with registry.transaction() as txn:
            txn.remove(lease)
        state = "killed its process group" if killed else "its processes were already gone"
        report.servers.append((f"{lease.project}/{data.get('name', '?')}", f"{why}; {state}"))
    # Then what no server lease names: daemons, children of the suite, migrate commands, and a
    # process spawned just before a SIGKILL could record it. Before the databases: a migrate
    # command still connected would hold up the drop.
    for lease, why in stale_runs:
        try:
            ended = sweep_dead(lease)
        except (KeyError, TypeError, ValueError) as exc:
            report.errors.append(f"contained lease {lease.id} is malformed: {exc}")
            ended = 0
        with registry.transaction() as txn:
            txn.remove(lease)
        if ended:
            report.servers.append(
                (f"{lease.project}/processes", f"{why}; ended {ended} marked process(es)")
            )
    # Ports before databases: reaching the local cluster allocates its port, which would reclaim
    # the stale port leases on the way without reporting them.
    for lease, why in ws.ports.reclaim_stale() if ports else ():
        if run_id is None or lease.owner.run_id == run_id:
            report.ports.append((f"{lease.resource} ({lease.project})", why))
    if databases:
        with ws:
            _reclaim_databases(ws, report, run_id)
    return report


def _reclaim_databases(ws: Workspace, report: ReclaimReport, run_id: str | None) -> None:
    leases = ws.registry.snapshot()
    db_leases = [lease for lease in leases if lease.kind == "database"]
    if not ws.external and not ws.cluster_running():
        if db_leases:
            report.errors.append(
                "the local PostgreSQL cluster is not running, so its databases were not checked; "
                "run `invoke pg.start` then `invoke db.cleanup`"
            )
        return
    try:
        allocator = ws.databases
        if run_id is None:
            report.databases.extend(allocator.cleanup())
        else:
            with ws.registry.transaction() as txn:
                # A kept database outlives its run on purpose: db.cleanup drops it once expired.
                mine = [
                    lease
                    for lease, _why in txn.stale("database")
                    if lease.owner.run_id == run_id and not lease.data.get("keep_until")
                ]
            for lease in mine:
                for name in allocator.release(name=lease.resource):
                    report.databases.append((name, f"owner of run {run_id} is gone"))
    except E2EInfraError as exc:
        report.errors.append(exc.one_line())
