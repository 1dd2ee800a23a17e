"""Proof of life on a shared server: advisory locks held for the names of live databases.

On a server that several hosts use (``admin_url`` set), a host cannot check another host's pids
(nor can a host in another pid namespace, even with the same ``host_id``). So an allocation holds
``pg_advisory_lock_shared(<key of its name>)`` on a connection of its own from before the database
exists until it is released or its owner dies (the server ends the connection, and the lock with
it).

A connection can also end while its owner lives: a server restart or failover,
``idle_session_timeout``, ``pg_terminate_backend``, a proxy cutting idle connections. So the hold
connections use TCP keepalives and are watched for the whole run by :class:`Holds`' watcher thread:
every :data:`WATCH_INTERVAL` it runs one short query on each (which also keeps them from ever being
idle for long); on a loss it re-takes the lock at once, on a new connection, within
``retake_timeout``. A hold that cannot be re-taken in time (or whose database was dropped while
the lock was lost) is *lost for good*: logged at once, reported to ``on_lost``, and raised by
:meth:`Holds.check`, which the session calls after the suite.

The other side, :class:`DeathProof`: a cleanup on any host that finds the key free takes it
exclusively and keeps it for :data:`DEATH_GRACE` (longer than a re-take), looking all the while
for a request for that key waiting in the server's queue: an owner re-taking its lock *waits*
for it (it never polls), so an owner that tries at any moment of the grace is seen, gets its lock
at once, and keeps its database. Only a key nobody asked for during the whole grace, and still
free when judged again, lets the database go (a project database's; or a half-built template's,
whose builder holds the fingerprint's build lock instead). The key stays taken until the drop is
done. A database that any session
is connected to is never dropped (see :mod:`.sweep`).

:class:`CreationGate`: ``max_databases`` (per host) and ``server_max_databases`` are checked and
the database made under an advisory lock of their own, so concurrent allocators cannot all pass
the same count.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg import errors as sqlerrors

from ..clock import Clock, SystemClock, wait_until
from ..config import Config
from ..conninfo import ConnInfo
from ..errors import DatabaseError, DeadlineExceeded, E2EInfraError
from ..postgres.pgerrors import ErrorContext, Phase, map_errors
from ..resources.leases import Lease
from .migrations import CONNECT_TIMEOUT, admin_options, advisory_lock
from .names import name_key

__all__ = [
    "DEATH_GRACE",
    "KEEPALIVES",
    "LOOK_EVERY",
    "RETAKE_TIMEOUT",
    "WATCH_INTERVAL",
    "CreationGate",
    "DeathProof",
    "Holds",
    "gate_key",
    "held_keys",
    "hold_connect",
    "waiting_keys",
]

log = logging.getLogger("e2e_infra")

# How often the watcher checks (and uses) each hold connection, seconds.
WATCH_INTERVAL = 1.0
# How long a lost hold may take to be re-taken (a restart, a failover) before the run fails.
RETAKE_TIMEOUT = 30.0
# How long a cleanup holds a key it found free, watching for its owner to ask for it, before it
# judges again: longer than a re-take after a loss seen by the watcher (WATCH_INTERVAL, then a
# reconnect of a few ms to a server that is up).
DEATH_GRACE = 5.0
# How often a cleanup looks for a waiting owner during the grace.
LOOK_EVERY = 0.1
# A re-take waits in the server's queue this long at most per attempt (then tries again, on a new
# connection if that one broke): the request is what a cleanup watching the key sees.
_RETAKE_WAIT = 2.0
# libpq: probe an idle TCP connection after 5 s, every 2 s, give up after 3 misses; and fail a
# write nobody acknowledges within 10 s. A dead path is seen within ~11 s instead of hours.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def hold_connect(
    info: ConnInfo, *, purpose: str, connect_timeout: float = CONNECT_TIMEOUT
) -> psycopg.Connection[Any]:
    """An autocommit admin connection with TCP keepalives, named ``e2e-infra <purpose> <pid>``,
    its ``search_path`` pinned like every admin connection's."""
    with map_errors(ErrorContext(Phase.CONNECT, info)):
        return psycopg.connect(
            info.conninfo(
                application_name=f"e2e-infra {purpose} {os.getpid()}"[:63],
                connect_timeout=max(1, round(connect_timeout)),
                options=admin_options(info),
                **KEEPALIVES,
            ),
            autocommit=True,
        )


def held_keys(conn: psycopg.Connection[Any]) -> set[int]:
    """The bigint advisory keys some session holds now (granted, shared or exclusive) in the
    database of ``conn``: advisory locks are per database, and ``pg_locks`` shows every database's
    (a project role taking our key numbers in its own database holds nothing of ours)."""
    return _keys(conn, granted=True)


def waiting_keys(conn: psycopg.Connection[Any]) -> set[int]:
    """The bigint advisory keys some session is waiting for now (a request in the queue), in the
    database of ``conn``."""
    return _keys(conn, granted=False)


def _keys(conn: psycopg.Connection[Any], *, granted: bool) -> set[int]:
    rows = conn.execute(
        "SELECT DISTINCT (classid::bigint << 32) | objid::bigint FROM pg_locks "
        "WHERE locktype = 'advisory' AND objsubid = 1 AND granted = %s "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (granted,),
    ).fetchall()
    out = set()
    for (value,) in rows:
        key = int(value) & 0xFFFFFFFFFFFFFFFF
        out.add(key - (1 << 64) if key >= 1 << 63 else key)
    return out


def gate_key(base: str, scope: str) -> int:
    """The key of the creation gate of name base ``base`` for ``scope`` (a host id, or ``*``)."""
    return name_key(f"gate {base} {scope}")


class Holds:
    """The name locks this process holds for its live databases (a no-op unless ``enabled``),
    watched and re-taken by a background thread while any is held."""

    def __init__(
        self,
        admin: ConnInfo,
        *,
        enabled: bool,
        timeout: float,
        clock: Clock,
        retake_timeout: float = RETAKE_TIMEOUT,
        interval: float = WATCH_INTERVAL,
        on_lost: Callable[[str, str], None] | None = None,
    ) -> None:
        self.admin = admin
        self.enabled = enabled
        self.timeout = timeout  # waiting out a cleanup that holds the key
        self.clock = clock
        self.retake_timeout = retake_timeout
        self.interval = interval
        self.on_lost = on_lost
        self.retakes = 0  # how many holds were re-taken after a loss (for tests and reports)
        self._conns: dict[str, psycopg.Connection[Any]] = {}  # database -> lock connection
        self._busy: set[str] = set()  # names whose connection the watcher is using now
        self._seen: set[str] = set()  # names whose database the watcher saw exist
        self._lost: dict[str, str] = {}  # name -> why its hold was lost for good
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._conns

    @property
    def lost(self) -> dict[str, str]:
        with self._lock:
            return dict(self._lost)

    def hold(self, lease: Lease) -> None:
        """Hold the key of the lease's name (shared) on a connection of its own for as long as
        this process uses the database; idempotent. Waits out a cleanup that holds it. When the
        owner is another process (``invoke db.allocate`` records its parent), nothing here can
        live as long as the owner: the marker then says ``hold: false`` and carries an expiry."""
        name = lease.resource
        if not self.enabled or name in self or lease.owner.pid != os.getpid():
            return
        conn = hold_connect(self.admin, purpose=f"hold {name}")
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
        with self._lock:
            self._conns[name] = conn
            self._lost.pop(name, None)
            self._seen.discard(name)
            if self._watcher is None or not self._watcher.is_alive():
                self._stop = threading.Event()
                self._watcher = threading.Thread(
                    target=self._watch, args=(self._stop,), name="e2e-infra holds", daemon=True
                )
                self._watcher.start()

    def release(self, name: str) -> None:
        """Let go of the name's key (idempotent): the database is dropped or kept by a marker."""
        with self._lock:
            conn = self._conns.pop(name, None)
            busy = name in self._busy
            self._seen.discard(name)
            stop = self._stop if not self._conns else None
        if stop is not None:
            stop.set()
        if conn is not None and not busy:  # a busy one is closed by the watcher when done
            _close(conn)

    def release_all(self) -> None:
        with self._lock:
            names = builtins.list(self._conns)
        for name in names:
            self.release(name)
        with self._lock:
            watcher, self._watcher = self._watcher, None
        self._stop.set()
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(self.interval + CONNECT_TIMEOUT + 1)

    def check(self) -> None:
        """Raise :class:`DatabaseError` if a hold was lost for good (see the module)."""
        lost = self.lost
        if lost:
            name, why = sorted(lost.items())[0]
            more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
            raise DatabaseError(
                f"lost the proof of life of database {name}{more}: {why}; another host's cleanup "
                "may have dropped it meanwhile, so this run's results are not trustworthy: check "
                "the server's availability (restarts, idle_session_timeout, proxies) and rerun",
                dbname=name,
            )

    # --- the watcher -------------------------------------------------------------------------

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.watch_once()
            except Exception as exc:  # never die silently: the holds would go unwatched
                log.error("the watcher of database locks failed a pass: %s", exc)

    def watch_once(self) -> None:
        """One pass of the watcher: use each hold connection; re-take the lost ones."""
        with self._lock:
            names = builtins.list(self._conns)
        for name in names:
            with self._lock:
                conn = self._conns.get(name)
                if conn is None:
                    continue
                self._busy.add(name)
            exists: bool | None = None
            try:
                row = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = %s)", (name,)
                ).fetchone()
                exists = bool(row and row[0])
            except psycopg.Error:
                exists = None  # the connection (and the lock with it) is gone
            with self._lock:
                self._busy.discard(name)
                current = self._conns.get(name) is conn
                if exists:
                    self._seen.add(name)
                seen = name in self._seen
            if not current:
                _close(conn)  # released meanwhile
                continue
            if exists is None:
                _close(conn)
                self._retake(name, conn, seen=seen)

    def _retake(self, name: str, old: psycopg.Connection[Any], *, seen: bool) -> None:
        log.warning("the lock connection of database %s was lost; taking the lock again", name)
        clock = SystemClock()  # real time: a real server is coming back
        deadline = clock.monotonic() + self.retake_timeout
        state: dict[str, Any] = {}

        def dropped(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = %s)", (name,)
            ).fetchone()
            if seen and not (row and row[0]):
                state["why"] = "the database was dropped while its lock was lost"
                return True
            return False

        def attempt() -> bool:
            remaining = deadline - clock.monotonic()
            try:
                conn = state.get("conn")
                if conn is None or conn.closed or conn.broken:
                    conn = state["conn"] = hold_connect(
                        self.admin,
                        purpose=f"hold {name}",
                        connect_timeout=max(1.0, min(CONNECT_TIMEOUT, remaining)),
                    )
                if dropped(conn):
                    return True
                # Wait in the server's queue, never poll: a cleanup holding the key while it
                # judges sees this request and lets go (see DeathProof.watch).
                wait_ms = f"{max(0.05, min(_RETAKE_WAIT, remaining)) * 1000:.0f}"
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (wait_ms,))
                try:
                    conn.execute("SELECT pg_advisory_lock_shared(%s)", (name_key(name),))
                except sqlerrors.LockNotAvailable:
                    return False  # still held by another: wait again
                dropped(conn)  # the key was held to drop it: the database is gone now
                return True
            except (psycopg.Error, E2EInfraError) as exc:  # the server is away: try again
                state["error"] = " ".join(str(exc).split())[:200]
                bad = state.pop("conn", None)
                if bad is not None:
                    _close(bad)
                return False

        why: str | None = None
        try:
            wait_until(
                attempt,
                timeout=self.retake_timeout,
                what=f"the lock of database {name} again",
                clock=clock,
                first=0.05,
                cap=0.5,
            )
            why = state.get("why")
        except DeadlineExceeded:
            last = state.get("error")
            why = (
                f"its lock connection ended and the lock could not be taken again within "
                f"{self.retake_timeout:g}s" + (f" (last error: {last})" if last else "")
            )
        conn = state.get("conn")
        with self._lock:
            current = self._conns.get(name) is old
            if current and why is None and conn is not None:
                self._conns[name] = conn
                self.retakes += 1
                conn = None
            elif current:
                self._conns.pop(name, None)
                self._lost[name] = str(why)
        if conn is not None:
            _close(conn)
        if not current:
            return
        if why is None:
            log.warning("took the lock of database %s again", name)
            return
        log.error("lost the proof of life of database %s for good: %s", name, why)
        if self.on_lost is not None:
            with contextlib.suppress(Exception):
                self.on_lost(name, why)


class DeathProof:
    """Takes advisory keys exclusively if nobody holds them: proof that no owner holds them now.
    The keys taken stay held (so no owner appears unseen) until :meth:`release`, after the
    drops; :meth:`watch` lets go of those an owner asks for meanwhile. Called with a database
    name, it takes the name's key (:meth:`take`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._keys: builtins.list[int] = []

    def take(self, key: int) -> bool:
        if key in self._keys:
            return True
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if row and row[0]:
            self._keys.append(key)
            return True
        return False

    def __call__(self, name: str) -> bool:
        return self.take(name_key(name))

    def watch(self, seconds: float, clock: Clock, every: float = LOOK_EVERY) -> set[int]:
        """Keep the keys taken for ``seconds``, looking every ``every`` for a request waiting
        for one of them (an owner re-taking its lock: proof of life); let go of those at once,
        so the owner gets its lock, and return them."""
        alive: set[int] = set()
        deadline = clock.monotonic() + seconds
        while self._keys:
            for key in waiting_keys(self.conn) & set(self._keys):
                self._let_go(key)
                alive.add(key)
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                break
            clock.sleep(min(every, remaining))
        return alive

    def release(self) -> None:
        for key in builtins.list(self._keys):
            self._let_go(key)

    def _let_go(self, key: int) -> None:
        self._keys.remove(key)
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


class CreationGate:
    """The advisory locks under which databases are counted and made (see the module)."""

    @classmethod
    def of(cls, config: Config, host: str, *, timeout: float) -> CreationGate:
        db = config.database
        return cls(db.name_base, host, server_wide=db.server_max_databases > 0, timeout=timeout)

    def __init__(self, base: str, host: str, *, server_wide: bool, timeout: float) -> None:
        self.keys = [gate_key(base, host)]
        if server_wide:
            self.keys.insert(0, gate_key(base, "*"))  # always in this order: no deadlock
        self.timeout = timeout

    @contextlib.contextmanager
    def held(self, conn: psycopg.Connection[Any], clock: Clock) -> Iterator[None]:
        taken: builtins.list[int] = []
        try:
            for key in self.keys:
                advisory_lock(
                    conn,
                    key,
                    timeout=self.timeout,
                    what="the database creation lock (other allocators are making databases)",
                    clock=clock,
                    hint="raise database.clone_timeout if the server is slow to clone",
                )
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _close(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):
        conn.close()
