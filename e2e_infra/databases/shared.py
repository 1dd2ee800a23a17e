"""Proof of life on a shared server: advisory locks held for the names of live databases.

On a server that several hosts use (``admin_url`` set), a host cannot check another host's pids.
So an allocation holds ``pg_advisory_lock_shared(<key of its name>)`` on a connection of its own
from before the database exists until it is released or its owner dies (the server ends the
connection, and the lock with it). A cleanup on any host drops another host's database only when
it can take that key exclusively (:class:`DeathProof`), and holds it while it drops.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from typing import Any

import psycopg

from ..clock import Clock
from ..conninfo import ConnInfo
from ..leases import Lease
from ..migrations import advisory_lock, connect
from .names import name_key

__all__ = ["DeathProof", "Holds"]


class Holds:
    """The name locks this process holds for its live databases (a no-op unless ``enabled``)."""

    def __init__(self, admin: ConnInfo, *, enabled: bool, timeout: float, clock: Clock) -> None:
        self.admin = admin
        self.enabled = enabled
        self.timeout = timeout  # waiting out a cleanup that holds the key
        self.clock = clock
        self._conns: dict[str, psycopg.Connection[Any]] = {}  # database -> lock connection

    def __contains__(self, name: str) -> bool:
        return name in self._conns

    def hold(self, lease: Lease) -> None:
        """Hold the key of the lease's name (shared) on a connection of its own for as long as
        this process uses the database; idempotent. Waits out a cleanup that holds it. When the
        owner is another process (``invoke db.allocate`` records its parent), nothing here can
        live as long as the owner: the marker then says ``hold: false``."""
        name = lease.resource
        if not self.enabled or name in self._conns or lease.owner.pid != os.getpid():
            return
        conn = connect(self.admin, purpose=f"hold {name}")
        try:
            advisory_lock(
                conn,
                name_key(name),
                shared=True,
                timeout=self.timeout,
                what=f"the lock of database name {name} (a cleanup is dropping a database of "
                "that name)",
                clock=self.clock,
            )
        except BaseException:
            conn.close()
            raise
        self._conns[name] = conn

    def release(self, name: str) -> None:
        """Let go of the name's key (idempotent): the database is dropped or kept by a marker."""
        conn = self._conns.pop(name, None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()  # the session ends, and its advisory locks with it

    def release_all(self) -> None:
        for name in builtins.list(self._conns):
            self.release(name)


class DeathProof:
    """Called with a name, takes its key exclusively if nobody holds it: proof that no owner
    holds the name any more. The keys taken stay held (so no owner appears meanwhile) until
    :meth:`release`, after the drops."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._keys: builtins.list[int] = []

    def __call__(self, name: str) -> bool:
        key = name_key(name)
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if row and row[0]:
            self._keys.append(key)
            return True
        return False

    def release(self) -> None:
        for key in self._keys:
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        self._keys.clear()
