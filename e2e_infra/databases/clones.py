"""A project's database: reserve a name under the registry lock, clone the template into it, mark
it, and settle any CREATE whose outcome is unknown.

A database for a project is named ``<base>_<project>`` (on a shared server with a host part,
``<base>_<project>_<sha256(host_id)[:4]>``), or gets a suffix while another live lease holds that
name; it is recorded as a lease of kind ``database`` and marked. A name that exists on the server
is never created over: a database there is reclaimed only on proof that its owner is gone. A clone
whose CREATE had an unknown outcome (an exception raised by a signal handler mid-statement leaves
the connection busy) is settled from a new connection (:meth:`Catalog.settle`); if even that fails
its lease stays registered, the proof ``cleanup`` needs to drop the unmarked database later.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import errors as sqlerrors

from ..errors import CloneError, DatabaseError, DatabaseLimitError
from ..resources.leases import Lease, Owner, Transaction
from .catalog import Catalog
from .markers import Kind, MarkedDatabase, Marker
from .names import database_name, host_tag, join_name
from .shared import Holds
from .sweep import why_drop

__all__ = ["Cloner"]

log = logging.getLogger("e2e_infra")

LEASE_KIND = Kind.DATABASE.value


class Cloner:
    """Reserve, clone and mark the databases of projects."""

    def __init__(self, catalog: Catalog, holds: Holds) -> None:
        self.catalog = catalog
        self.holds = holds
        # Leases whose CREATE DATABASE had an unknown outcome that could not be settled: they stay
        # registered, the proof `cleanup` needs to drop the unmarked database once we are gone.
        self.unsettled: set[str] = set()

    def holds_lease(self, txn: Transaction, lease: Lease) -> bool:
        """Whether ``lease`` still holds its database: a live owner, or a keep not yet expired."""
        keep_until = lease.data.get("keep_until")
        if isinstance(keep_until, (int, float)):
            return keep_until > self.catalog.clock.time()
        return txn.stale_reason(lease) is None

    def held(self, txn: Transaction, project: str | None = None) -> list[Lease]:
        """The database leases (of ``project``, or all) that still hold their database."""
        return [
            lease for lease in txn.find(LEASE_KIND, project=project) if self.holds_lease(txn, lease)
        ]

    def lease_marker(self, lease: Lease, kind: Kind = Kind.DATABASE) -> Marker:
        """The marker of the lease's database."""
        cat, hold = self.catalog, lease.resource in self.holds
        # An owner on a shared server that cannot hold the lock: alive until then, unless renewed.
        ttl = cat.config.lease_ttl or max(cat.config.database.keep_hours, 1.0) * 3600
        expires = cat.clock.time() + ttl if cat.shared and not hold else None
        leased_until = lease.data.get("expires")  # a lease with a time to live (--ttl)
        if isinstance(leased_until, (int, float)) and not isinstance(leased_until, bool):
            expires = float(leased_until)
        return Marker(
            kind=kind,
            base=self.catalog.base,
            lease=lease.id,
            project=lease.project,
            host=lease.owner.host,
            pid=lease.owner.pid,
            start=lease.owner.start_time,
            run=lease.owner.run_id,
            created_at=lease.created_at,
            keep_until=lease.data.get("keep_until"),
            template=lease.data.get("template"),
            seed=lease.data.get("seed"),
            # Whether a live owner holds the name's advisory lock (shared servers only).
            hold=hold,
            expires=expires,
        )

    def _host_part(self) -> str:
        return host_tag(self.catalog.registry.host) if self.catalog.shared else ""

    def reserve(
        self,
        project: str,
        owner: Owner,
        template: str,
        seed: str,
        marked: int,
        expires: float | None = None,
    ) -> tuple[Lease, builtins.list[Lease]]:
        """Choose the name and record the lease; short, and the only part under the lock. Also
        returns the leases of dead owners that name the same database: they stay until ours is
        marked, the proof that an unmarked database of that name (a clone its owner died making)
        is ours to drop. ``marked``: how many marked databases the server has; ``expires``: the
        end of a lease with a time to live (judged by it, never by its owner's pid)."""
        cat = self.catalog
        limit = cat.config.database.max_databases
        tag = self._host_part()
        plain = database_name(cat.base, project, tag)
        with cat.registry.transaction() as txn:
            leases = txn.find(LEASE_KIND)
            held = [lease for lease in leases if self.holds_lease(txn, lease)]
            live = max(marked, len(held))
            if live >= limit:
                raise DatabaseLimitError(
                    f"{live} e2e databases of this host exist, the limit is max_databases = "
                    f"{limit}; drop "
                    "leftovers with `invoke db.cleanup` or `invoke db.release --all`, or raise "
                    "database.max_databases",
                    limit=limit,
                )
            taken = {lease.resource for lease in held}
            name = plain
            if plain in taken:
                suffix = hashlib.sha256(owner.run_id.encode()).hexdigest()[:6]
                name = database_name(cat.base, project, join_name(tag, suffix))
                if name in taken:  # the same run twice: fall back to something random
                    name = database_name(cat.base, project, join_name(tag, os.urandom(3).hex()))
            dead = [lease for lease in leases if lease.resource == name and lease not in held]
            lease = txn.add(
                Lease(
                    kind=LEASE_KIND,
                    resource=name,
                    project=project,
                    owner=owner,
                    data={
                        "template": template,
                        "seed": seed,
                        "keep_until": None,
                        **({"expires": expires} if expires is not None else {}),
                    },
                )
            )
            return lease, dead

    def clone(
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
            self.holds.hold(lease)  # before the database exists: no moment without proof of life
            try:
                made = self._create_marked(conn, lease, template, strategy)
            except BaseException:
                self.holds.release(name)
                raise
            if made:
                return lease, dead
            lease, dead = self._after_duplicate(conn, lease, dead)
            if lease.resource != name:
                self.holds.release(name)
        self.holds.release(lease.resource)
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
        :meth:`Catalog.settle`; if even that fails, the lease stays registered (``unsettled``)."""
        cat = self.catalog
        name = lease.resource
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is not None:
            return False
        backend = conn.info.backend_pid
        try:
            cat.create(conn, name, template, strategy)
        except sqlerrors.DuplicateDatabase:
            return False
        except CloneError:
            raise  # the template stayed busy: the server refused every attempt
        except psycopg.Error as exc:
            if exc.sqlstate and not conn.broken:
                raise  # the server's answer: nothing was created
            if not cat.settle(conn, backend, name):
                self.unsettled.add(lease.id)
            raise
        except BaseException:  # Interrupted from a signal handler, say: the outcome is unknown
            if not cat.settle(conn, backend, name):
                self.unsettled.add(lease.id)
            raise
        try:
            # Its own role, marked with it in one transaction (see :mod:`.roles`).
            marker = self.lease_marker(lease).comment_sql(name)
            cat.roles.make(conn, name, marker, cat.roles.login(lease))
        except BaseException:
            if not cat.settle(conn, backend, name):
                self.unsettled.add(lease.id)
            raise
        return True

    def _after_duplicate(
        self, conn: psycopg.Connection[Any], lease: Lease, dead: builtins.list[Lease]
    ) -> tuple[Lease, builtins.list[Lease]]:
        """The name is taken on the server: reclaim a dead owner's database (marked, or unmarked
        and named by a dead owner's lease: it died creating it), or pick another name."""
        cat = self.catalog
        name = lease.resource
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database'), datistemplate FROM pg_database "
            "WHERE datname = %s",
            (name,),
        ).fetchone()
        if row is None:
            return lease, dead  # dropped meanwhile: try the name again
        if row[0] is None and not cat.shared and dead:
            with cat.registry.transaction() as txn:
                ids = {held.id for held in txn.find(LEASE_KIND, resource=name)}
                proof = [old for old in dead if old.id in ids and txn.stale_reason(old)]
            if proof:
                log.info(
                    "dropping %s before reusing its name: unmarked, and the lease of a process "
                    "that is gone names it (it died creating it)",
                    name,
                )
                cat.drop(conn, name)
                return lease, dead
        marker = Marker.parse(row[0])
        if marker is not None and marker.kind.is_project_database:
            with cat.registry.transaction() as txn:
                other = [
                    held
                    for held in txn.find(LEASE_KIND, resource=name)
                    if held.id == marker.lease and self.holds_lease(txn, held)
                ]
                item = MarkedDatabase(name, marker, bool(row[1]))
                now = cat.clock.time()
                why = None if other else why_drop(txn, item, None, now, shared=cat.shared)
            if why is not None:
                log.info("dropping %s before reusing its name: %s", name, why)
                cat.drop(conn, name)
                return lease, dead
        # Unmarked and not proven ours, or held by a live owner (maybe on another host): never
        # touch it. The dead owners' leases of that name stay: cleanup's proof, if it was theirs.
        new_name = database_name(
            cat.base, lease.project, join_name(self._host_part(), os.urandom(3).hex())
        )
        with cat.registry.transaction() as txn:
            return txn.update(replace(lease, resource=new_name)), []
