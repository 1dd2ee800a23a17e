"""The admin connection of an allocator: one kept between calls, lent to one caller at a time."""

from __future__ import annotations

import contextlib
import select
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import pq

from ..conninfo import ConnInfo
from .migrations import connect

__all__ = ["AdminConnections"]


class _Slot:
    """Where the kept connection lives; closed by :meth:`AdminConnections.close`, or when its
    owner is collected (or the process exits)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


class AdminConnections:
    """Autocommit connections to the admin URL, each with ``statement_timeout`` set and
    ``search_path`` pinned to ``pg_catalog`` (see :data:`~e2e_infra.migrations.ADMIN_OPTIONS`).

    One is kept and lent to one caller at a time: a new connection per call was ~5 ms of a ~12 ms
    warm-spare allocation. A nested caller (settling a CREATE needs one other than the busy one), a
    concurrent one (another thread) and ``reuse=False`` (callers that take session advisory
    locks) get a new connection, closed after. The kept one goes back only as it was lent: the
    body raised nothing (an interrupt may leave a statement running or a lock held) and it is idle
    and unbroken; before it is lent again, one that the server ended meanwhile (a restart,
    ``pg_terminate_backend``) is replaced (:func:`reusable`)."""

    def __init__(self, info: ConnInfo, *, statement_timeout: float) -> None:
        self.info = info
        self.statement_timeout = statement_timeout  # seconds
        self._slot = _Slot()
        # Held while the kept connection is lent; also tells a nested or concurrent caller to
        # open a connection of its own.
        self._lock = threading.Lock()
        weakref.finalize(self, self._slot.close)  # an allocator nobody closed

    @property
    def kept(self) -> psycopg.Connection[Any] | None:
        """The connection kept between calls, if any."""
        return self._slot.conn

    @contextlib.contextmanager
    def lend(self, *, reuse: bool = True) -> Iterator[psycopg.Connection[Any]]:
        if not reuse or not self._lock.acquire(blocking=False):
            fresh = self.open()
            try:
                yield fresh
            finally:
                fresh.close()
            return
        try:
            conn, self._slot.conn = self._slot.conn, None
            if conn is None or not reusable(conn):
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = self.open()
            clean = False
            try:
                yield conn
                clean = True
            finally:
                if clean and reusable(conn, probe=False):
                    self._slot.conn = conn
                else:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
        finally:
            self._lock.release()

    def open(self) -> psycopg.Connection[Any]:
        """A new admin connection (the caller closes it)."""
        conn = connect(self.info, purpose="admin", admin=True)  # search_path pinned
        try:
            # A deadline for every statement here (CREATE / DROP DATABASE wait on locks and on
            # other sessions): generous, the build timeout. Migrations run on their own
            # connections, not bound by it.
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{max(1, round(self.statement_timeout * 1000))}ms",),
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self, timeout: float) -> None:
        """Close the kept connection; a later call opens a new one. Not while another thread has
        it lent (it is put back or closed when that call ends): waits at most ``timeout``."""
        if self._lock.acquire(timeout=max(timeout, 0.0)):
            try:
                self._slot.close()
            finally:
                self._lock.release()


def reusable(conn: psycopg.Connection[Any], *, probe: bool = True) -> bool:
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
