"""The lease registry: who holds which port, database, server or cluster on this host.

One JSON document (``<state_dir>/leases.json``), read and written only while holding a
``filelock.FileLock``, replaced atomically (temp file + ``os.replace``), with a schema version.

A lease is *stale* only on proof that its owner is gone: same host, and the owner's pid is dead or
now belongs to a process with another start time. A TTL, when configured, applies only to leases
whose owner cannot be checked (another host sharing the state folder): a timer alone never reclaims
a live owner's lease.

A corrupt or truncated registry is moved aside (``leases.json.corrupt-<time>``), a warning names
it, and the registry starts again empty; ports that are still bound are skipped by the probe-bind
of the port allocator, and databases are found again by their ownership marker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import filelock
import psutil

from ..config.hostid import default_host_id
from ..errors import LockTimeoutError, RegistryError
from ..files import (
    check_writable,
    ensure_private_dir,
    folder_error,
)

__all__ = [
    "SCHEMA_VERSION",
    "Lease",
    "Owner",
    "Registry",
    "Transaction",
    "check_writable",
    "ensure_private_dir",
    "folder_error",
    "new_run_id",
    "parse_registry",
    "process_start_time",
    "process_state",
]

log = logging.getLogger("e2e_infra")

SCHEMA_VERSION = 1
REGISTRY_FILE = "leases.json"
START_TIME_TOLERANCE = 0.05  # seconds; psutil derives it from boot time + clock ticks
# filelock polls a held lock (default every 50 ms, which alone broke a 50 ms p99 for 8 allocating
# processes); a transaction holds it for about a millisecond, so poll at that scale.
_LOCK_POLL_INTERVAL = 0.002


def new_run_id() -> str:
    """A short id unique to one run: time, pid and randomness."""
    return f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def process_start_time(pid: int) -> float | None:
    """The start time of a live process, or None if there is none (zombies count as gone)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def process_state(pid: int, start_time: float) -> str:
    """``alive``, ``gone``, ``reused`` (the pid runs another process) or ``unknown``.

    ``unknown``: the pid exists but may not be inspected (another user under ``hidepid``, say).
    That is no proof of death, so callers must treat it as alive.
    """
    if pid <= 0:
        return "gone"
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "gone"
        started = proc.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return "gone"
    except psutil.AccessDenied:
        return "unknown"
    return "alive" if abs(started - start_time) <= START_TIME_TOLERANCE else "reused"


@dataclass(frozen=True)
class Owner:
    """A process, proven by pid + start time, on a host, within a run."""

    pid: int
    start_time: float
    host: str
    run_id: str

    @classmethod
    def of_pid(cls, pid: int, *, host: str | None = None, run_id: str | None = None) -> Owner:
        start = process_start_time(pid)
        if start is None:
            raise RegistryError(
                f"owner process {pid} does not exist; pass the pid of a live process"
            )
        return cls(
            pid=pid,
            start_time=start,
            host=host or default_host_id(),
            run_id=run_id or new_run_id(),
        )

    @classmethod
    def current(cls, *, host: str | None = None, run_id: str | None = None) -> Owner:
        return cls.of_pid(os.getpid(), host=host, run_id=run_id)

    def is_alive(self) -> bool:
        """True while the same process (pid and start time) runs. Only meaningful on its host."""
        return process_state(self.pid, self.start_time) in ("alive", "unknown")

    def same_process(self, other: Owner) -> bool:
        return (
            self.host == other.host
            and self.pid == other.pid
            and abs(self.start_time - other.start_time) <= START_TIME_TOLERANCE
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "host": self.host,
            "run_id": self.run_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Owner:
        pid, start, host, run_id = data["pid"], data["start_time"], data["host"], data["run_id"]
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"bad owner pid {pid!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise ValueError(f"bad owner start_time {start!r}")
        if not isinstance(host, str) or not isinstance(run_id, str):
            raise ValueError("owner host and run_id must be strings")
        return cls(pid=pid, start_time=float(start), host=host, run_id=run_id)


@dataclass(frozen=True)
class Lease:
    """One held resource. ``data`` holds kind-specific facts (port name, pgid, marker...)."""

    kind: str
    resource: str
    project: str
    owner: Owner
    created_at: float = field(default_factory=time.time)
    data: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def with_data(self, **data: Any) -> Lease:
        return replace(self, data={**self.data, **data})

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "resource": self.resource,
            "project": self.project,
            "owner": self.owner.to_json(),
            "created_at": self.created_at,
            "data": dict(self.data),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lease:
        if not isinstance(data, Mapping):
            raise ValueError("a lease must be an object")
        fields = {k: data[k] for k in ("id", "kind", "resource", "project")}
        for key, value in fields.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"lease {key} must be a non-empty string")
        created = data["created_at"]
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise ValueError("lease created_at must be a number")
        extra = data.get("data", {})
        if not isinstance(extra, Mapping):
            raise ValueError("lease data must be an object")
        return cls(
            owner=Owner.from_json(data["owner"]),
            created_at=float(created),
            data=dict(extra),
            **fields,
        )


def parse_registry(raw: bytes) -> tuple[list[Lease], list[str]]:
    """The leases of a registry document, and what was wrong with each malformed record.

    Raises ValueError when the document as a whole is not a registry of this schema.
    """
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(document, dict):
        raise ValueError("the document is not a JSON object")
    version = document.get("version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema version {version!r}, expected {SCHEMA_VERSION}")
    records = document.get("leases")
    if not isinstance(records, list):
        raise ValueError("'leases' is not a list")
    leases: list[Lease] = []
    malformed: list[str] = []
    for index, record in enumerate(records):
        try:
            leases.append(Lease.from_json(record))
        except (KeyError, TypeError, ValueError) as exc:
            malformed.append(f"malformed record #{index} ({exc})")
    return leases, malformed


class Transaction:
    """The registry's leases while the lock is held; changes are written on a clean exit."""

    def __init__(self, leases: list[Lease], *, host: str, ttl: float | None, now: float) -> None:
        self._leases = leases
        self.host = host
        self.ttl = ttl
        self.now = now
        self.dirty = False
        # One /proc read per owner pid per transaction, not one per lease (a project holds several).
        self._states: dict[tuple[int, float], str] = {}

    @property
    def leases(self) -> tuple[Lease, ...]:
        return tuple(self._leases)

    def find(
        self,
        kind: str | None = None,
        *,
        project: str | None = None,
        resource: str | None = None,
        run_id: str | None = None,
    ) -> list[Lease]:
        return [
            lease
            for lease in self._leases
            if (kind is None or lease.kind == kind)
            and (project is None or lease.project == project)
            and (resource is None or lease.resource == resource)
            and (run_id is None or lease.owner.run_id == run_id)
        ]

    def add(self, lease: Lease) -> Lease:
        self._leases.append(lease)
        self.dirty = True
        return lease

    def update(self, lease: Lease) -> Lease:
        for index, current in enumerate(self._leases):
            if current.id == lease.id:
                self._leases[index] = lease
                self.dirty = True
                return lease
        raise RegistryError(f"lease {lease.id} ({lease.kind} {lease.resource}) is not registered")

    def remove(self, lease: Lease | str) -> bool:
        """Remove a lease (or id); False if it was already gone. Idempotent."""
        lease_id = lease if isinstance(lease, str) else lease.id
        before = len(self._leases)
        self._leases = [item for item in self._leases if item.id != lease_id]
        removed = len(self._leases) != before
        self.dirty = self.dirty or removed
        return removed

    def stale_reason(self, lease: Lease) -> str | None:
        """Why ``lease`` may be reclaimed, or None while its owner is (or may be) alive.

        A lease with an expiry (``data["expires"]``: taken with ``--ttl`` for steps of a CI job,
        each a shell that is gone before the next starts) is judged by that time alone, never by
        its owner's pid: it lives until it expires or is released."""
        expires = lease.data.get("expires")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool):
            if self.now > expires:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
                return f"its time to live ran out at {stamp}"
            return None
        owner = lease.owner
        if owner.host == self.host:
            key = (owner.pid, owner.start_time)
            if key not in self._states:
                self._states[key] = process_state(owner.pid, owner.start_time)
            state = self._states[key]
            if state == "gone":
                return f"owner pid {owner.pid} is gone"
            if state == "reused":
                return f"owner pid {owner.pid} was reused by another process"
            return None  # alive, or not inspectable: no proof of death
        if self.ttl is not None and self.now - lease.created_at > self.ttl:
            return f"owner on host {owner.host} cannot be checked and the lease is older than the TTL ({self.ttl:g}s)"  # noqa: E501
        return None

    def stale(self, kind: str | None = None) -> list[tuple[Lease, str]]:
        out = []
        for lease in self.find(kind):
            reason = self.stale_reason(lease)
            if reason is not None:
                out.append((lease, reason))
        return out


class Registry:
    """The lease registry of one state folder."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str | None = None,
        lock_timeout: float = 30.0,
        ttl: float | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / REGISTRY_FILE
        self.lock_path = self.state_dir / (REGISTRY_FILE + ".lock")
        self.host = host or default_host_id()
        self.lock_timeout = lock_timeout
        self.ttl = ttl
        # thread_local=False: one lock per Registry object, usable from any thread of the process.
        self._lock: filelock.BaseFileLock | None = None

    def _filelock(self) -> filelock.BaseFileLock:
        if self._lock is None:
            ensure_private_dir(self.state_dir)
            self._lock = filelock.FileLock(
                str(self.lock_path), timeout=self.lock_timeout, mode=0o600, thread_local=False
            )
        return self._lock

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Hold the lock, yield the leases, write them back atomically if changed."""
        lock = self._filelock()
        try:
            lock.acquire(poll_interval=_LOCK_POLL_INTERVAL)
        except filelock.Timeout:
            raise LockTimeoutError(
                f"the lease registry lock {self.lock_path} was held by another process for more "
                f"than {self.lock_timeout:g}s; retry, or raise E2E_LOCK_TIMEOUT",
                lock_path=str(self.lock_path),
                timeout=self.lock_timeout,
            ) from None
        except OSError as exc:  # (after Timeout, an OSError too) a read-only or vanished folder
            raise folder_error(self.state_dir, exc, what="lock the lease registry in") from None
        try:
            txn = Transaction(self._load(), host=self.host, ttl=self.ttl, now=time.time())
            yield txn
            if txn.dirty:
                self._write(txn.leases)
        finally:
            lock.release()

    def snapshot(self) -> tuple[Lease, ...]:
        with self.transaction() as txn:
            return txn.leases

    # --- file handling, always under the lock ---------------------------------------------------

    def _load(self) -> list[Lease]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RegistryError(
                f"cannot read the lease registry {self.path}: {exc.strerror}"
            ) from None
        try:
            leases, malformed = parse_registry(raw)
        except ValueError as exc:
            self._move_aside(f"it is not a valid registry ({exc})")
            return []
        for problem in malformed:
            log.warning("lease registry %s: dropped %s", self.path, problem)
        return leases

    def _move_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{REGISTRY_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        with contextlib.suppress(FileExistsError):
            aside = Path(f"{aside}-{uuid.uuid4().hex[:6]}") if aside.exists() else aside
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            raise folder_error(self.path, exc, what="move aside the broken registry") from None
        log.warning(
            "lease registry %s: %s; kept it as %s and started a new one "
            "(run `invoke e2e.cleanup` to sweep leftovers)",
            self.path,
            why,
            aside,
        )

    def _write(self, leases: tuple[Lease, ...]) -> None:
        # One lease per line, readable, and written by json's C encoder (indent= forces the slow
        # pure-Python one, which dominated an allocation's time).
        records = ",\n".join(json.dumps(lease.to_json(), sort_keys=True) for lease in leases)
        text = f'{{"version": {SCHEMA_VERSION}, "leases": [\n{records}\n]}}\n'
        payload = text.encode("utf-8")
        # Atomic: the old registry stays whole until the new one is complete, so a full disk or
        # a crash mid-write loses only this change (whose caller gets the error), never the file.
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=REGISTRY_FILE + ".", suffix=".tmp", dir=self.state_dir
            )
        except OSError as exc:
            raise self._write_error(exc) from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            # No fsync: the registry guards processes of this boot; a power loss ends them all.
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise self._write_error(exc) from None
            raise

    def _write_error(self, exc: OSError) -> RegistryError:
        folder = folder_error(self.state_dir, exc, what="update the lease registry in")
        return RegistryError(
            f"{folder}; the registry was left as it was (leases of live owners stay valid; "
            "those of ended ones are reclaimed by `invoke e2e.cleanup`)"
        )
