"""The port allocator: named TCP ports per project, leased in the registry, probe-bound first.

All the ports a project needs are chosen in one registry transaction: stale port leases (owner
provably gone) are reclaimed, the same owner's live leases are reused, and the rest are picked from
the configured range, skipping ports leased by anyone and ports a probe-bind finds taken. A range
that overlaps the kernel's ephemeral range is refused unless forced: any outgoing connection can
take a port there at any moment.

Only ``kind="port"`` leases hold ports; other kinds share the registry and are ignored here.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..config import RESERVED_PROJECT_NAMES, Config, PortRange, validate_name
from ..errors import PortRangeError, PortsExhaustedError, UsageError
from .leases import Lease, Owner, Registry, Transaction

__all__ = [
    "DEFAULT_PROBE_HOSTS",
    "PORT_KIND",
    "PortAllocator",
    "ephemeral_port_range",
    "port_is_free",
]

log = logging.getLogger("e2e_infra")

PORT_KIND = "port"
DEFAULT_PROBE_HOSTS: tuple[str, ...] = ("127.0.0.1", "0.0.0.0")
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# A host we cannot bind on at all (no IPv6, address not local) says nothing about the port.
_UNPROBEABLE = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


def ephemeral_port_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's ephemeral port range (Linux), or None where it cannot be read."""
    try:
        parts = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(parts) != 2 or not all((part.isascii() and part.isdigit()) for part in parts):
        return None
    low, high = int(parts[0]), int(parts[1])
    return (low, high) if 0 < low <= high <= 65535 else None


def port_is_free(port: int, hosts: Sequence[str] = DEFAULT_PROBE_HOSTS) -> bool:
    """True if a server could bind ``port`` on every host in ``hosts`` right now.

    The probe sets SO_REUSEADDR, as servers do (asyncio/uvicorn, socketserver, Node, Go's
    net.Listen): a socket left in TIME_WAIT by the previous server on the port blocks a bind
    without it, yet does not block the next server. A listening socket, or one bound without
    SO_REUSEADDR, still makes the bind fail on Linux, which is what "taken" means here.
    """
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as exc:
            if exc.errno in _UNPROBEABLE:
                continue
            return False  # EADDRINUSE, EACCES (privileged port), anything else: not usable
    return True


def _port_of(lease: Lease) -> int | None:
    return int(lease.resource) if (lease.resource.isascii() and lease.resource.isdigit()) else None


class PortAllocator:
    """Named ports per project from one range, leased in a
    :class:`~e2e_infra.resources.leases.Registry`."""

    def __init__(
        self,
        registry: Registry,
        port_range: PortRange,
        *,
        allow_ephemeral_overlap: bool = False,
        ephemeral_range: tuple[int, int] | None = None,
        probe_hosts: tuple[str, ...] = DEFAULT_PROBE_HOSTS,
        probe: Callable[[int], bool] | None = None,
    ) -> None:
        """``ephemeral_range`` None reads the kernel's; ``probe`` replaces the bind (for tests)."""
        self.registry = registry
        self.port_range = port_range
        self.probe_hosts = tuple(probe_hosts)
        self._probe = probe or functools.partial(port_is_free, hosts=self.probe_hosts)
        ephemeral = ephemeral_range if ephemeral_range is not None else ephemeral_port_range()
        self.ephemeral_range = ephemeral
        if ephemeral and not allow_ephemeral_overlap:
            low, high = ephemeral
            if port_range.low <= high and low <= port_range.high:
                raise PortRangeError(
                    f"port range {port_range} overlaps the kernel's ephemeral range {low}-{high} "
                    f"({EPHEMERAL_RANGE_FILE}), where any outgoing connection can take a port; "
                    f"choose a range below {low}, e.g. port_range = '3100-5500' (E2E_PORT_RANGE), "
                    "or set allow_ephemeral_overlap = true (E2E_ALLOW_EPHEMERAL_OVERLAP=1)",
                    low=port_range.low,
                    high=port_range.high,
                )

    @classmethod
    def from_config(cls, config: Config, registry: Registry) -> PortAllocator:
        return cls(
            registry, config.port_range, allow_ephemeral_overlap=config.allow_ephemeral_overlap
        )

    # --- public operations, each one registry transaction ---------------------------------------

    def allocate(
        self, project: str, names: Sequence[str], owner: Owner, *, kind: str = PORT_KIND
    ) -> dict[str, int]:
        """Lease one port per name for ``project``; the same owner asking again gets the same."""
        with self.registry.transaction() as txn:
            ports = self.allocate_in(txn, project, names, owner, kind=kind)
        if isinstance(ports, PortsExhaustedError):
            raise ports  # outside the transaction: reclaims are kept, no partial allocation is
        return ports

    def allocate_for_run(
        self, project: str, names: Sequence[str], owner: Owner
    ) -> tuple[dict[str, int], bool]:
        """:meth:`allocate`, and whether another run of ``project`` holds ports now (it runs, and
        writes into the project's results folder): one transaction, stale leases dropped first."""
        with self.registry.transaction() as txn:
            ports = self.allocate_in(txn, project, names, owner)
            others = any(
                lease.owner.run_id != owner.run_id for lease in txn.find(PORT_KIND, project=project)
            )
        if isinstance(ports, PortsExhaustedError):
            raise ports
        return ports, others

    def allocate_in(
        self,
        txn: Transaction,
        project: str,
        names: Sequence[str],
        owner: Owner,
        *,
        kind: str = PORT_KIND,
    ) -> dict[str, int] | PortsExhaustedError:
        """:meth:`allocate` inside the caller's transaction (which may read more of the registry
        on the same lock). Exhausted: the error is returned, to be raised once the transaction
        is written, and no lease is added."""
        validate_name(project, "project")
        wanted = _check_port_names(names)
        self._reclaim(txn)
        result: dict[str, int] = {}
        for lease in txn.find(kind, project=project):
            name, port = lease.data.get("name"), _port_of(lease)
            if name in wanted and _same_owner(lease.owner, owner):
                if port is not None and port in self.port_range and name not in result:
                    result[name] = port
                else:  # outside a range that has since changed, or a duplicate: replace it
                    txn.remove(lease)
        missing = [name for name in wanted if name not in result]
        picked, busy = self._pick(project, len(missing), self._held(txn, kind))
        if len(picked) == len(missing):
            for name, port in zip(missing, picked, strict=True):
                txn.add(_port_lease(kind, port, project, owner, name))
                result[name] = port
            return {name: result[name] for name in wanted}
        return self._exhausted(txn, project, len(missing), len(picked), busy)

    def reallocate(self, project: str, name: str, owner: Owner) -> int:
        """Drop the owner's lease of ``name`` and lease a different free port for it."""
        validate_name(project, "project")
        validate_name(name, "port")
        with self.registry.transaction() as txn:
            self._reclaim(txn)
            old = [
                lease
                for lease in txn.find(PORT_KIND, project=project)
                if lease.data.get("name") == name and _same_owner(lease.owner, owner)
            ]
            picked, busy = self._pick(project, 1, self._held(txn, PORT_KIND))
            if picked:
                for lease in old:
                    txn.remove(lease)
                txn.add(_port_lease(PORT_KIND, picked[0], project, owner, name))
                return picked[0]
            error = self._exhausted(txn, project, 1, 0, busy)
        raise error

    def release(
        self, project: str, *, run_id: str | None = None, kind: str = PORT_KIND
    ) -> list[Lease]:
        """Drop ``project``'s port leases (of one run, if given); releasing twice is fine."""
        validate_name(project, "project")
        with self.registry.transaction() as txn:
            released = txn.find(kind, project=project, run_id=run_id)
            for lease in released:
                txn.remove(lease)
        return _by_port(released)

    def release_all(self, *, kind: str = PORT_KIND) -> list[Lease]:
        """Drop every port lease but a live embedded cluster's own (``pg.stop`` releases it)."""
        with self.registry.transaction() as txn:
            released = [
                lease
                for lease in txn.find(kind)
                if lease.project not in RESERVED_PROJECT_NAMES or txn.stale_reason(lease)
            ]
            for lease in released:
                txn.remove(lease)
        return _by_port(released)

    def reclaim_stale(self) -> list[tuple[Lease, str]]:
        """Drop port leases whose owner is provably gone; return them with the reason."""
        with self.registry.transaction() as txn:
            return self._reclaim(txn)

    def leases(self) -> list[Lease]:
        return _by_port([lease for lease in self.registry.snapshot() if lease.kind == PORT_KIND])

    def leases_with_status(self) -> list[tuple[Lease, str | None]]:
        """Every port lease with the reason it is stale, or None while its owner lives."""
        with self.registry.transaction() as txn:
            return [(lease, txn.stale_reason(lease)) for lease in _by_port(txn.find(PORT_KIND))]

    # --- inside a transaction -------------------------------------------------------------------

    def _reclaim(self, txn: Transaction) -> list[tuple[Lease, str]]:
        stale = txn.stale(PORT_KIND)
        for lease, reason in stale:
            txn.remove(lease)
            log.info(
                "reclaimed port %s (%s) of project %s: %s",
                lease.resource,
                lease.data.get("name", "?"),
                lease.project,
                reason,
            )
        return stale

    @staticmethod
    def _held(txn: Transaction, kind: str) -> set[int]:
        return {
            port
            for lease in txn.leases
            if lease.kind in (PORT_KIND, kind) and (port := _port_of(lease)) is not None
        }

    def _candidates(self, project: str) -> Iterator[int]:
        # Start where the project's name hashes to and wrap around: a project tends to get the same
        # ports run after run, and projects do not all probe the same lowest ports first.
        low, high = self.port_range.low, self.port_range.high
        start = low + zlib.crc32(project.encode("utf-8")) % len(self.port_range)
        yield from range(start, high + 1)
        yield from range(low, start)

    def _pick(self, project: str, count: int, held: set[int]) -> tuple[list[int], int]:
        """Up to ``count`` free ports not in ``held``, and how many probes found a port taken."""
        picked: list[int] = []
        busy = 0
        if count == 0:
            return picked, busy
        for port in self._candidates(project):
            if port in held:
                continue
            if self._probe(port):
                picked.append(port)
                if len(picked) == count:
                    break
            else:
                busy += 1
        return picked, busy

    def _exhausted(
        self, txn: Transaction, project: str, wanted: int, found: int, busy: int
    ) -> PortsExhaustedError:
        per_project = Counter(
            lease.project
            for lease in txn.find(PORT_KIND)
            if (port := _port_of(lease)) is not None and port in self.port_range
        )
        holders = ", ".join(f"{name}: {count}" for name, count in per_project.most_common(8))
        if len(per_project) > 8:
            holders += f", and {len(per_project) - 8} more projects"
        leased = sum(per_project.values())
        return PortsExhaustedError(
            f"no free port for project {project!r} in {self.port_range}: needed {wanted}, "
            f"found {found}; {leased} of {len(self.port_range)} ports are leased by live owners"
            f"{f' ({holders})' if holders else ''} and {busy} are taken by other processes; "
            "widen port_range (E2E_PORT_RANGE), or free ports with "
            "`invoke ports.release --project NAME` (see `invoke ports.list`)",
            low=self.port_range.low,
            high=self.port_range.high,
            wanted=wanted,
            leased=dict(per_project),
        )


def _same_owner(a: Owner, b: Owner) -> bool:
    return a.same_process(b) and a.run_id == b.run_id


def _check_port_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]  # a lone name, not its letters
    wanted = [validate_name(name, "port") for name in names]
    if not wanted:
        raise UsageError("no port names given; name at least one, e.g. backend")
    if len(set(wanted)) != len(wanted):
        raise UsageError(f"duplicate port names in {wanted}; name each port once")
    return wanted


def _port_lease(kind: str, port: int, project: str, owner: Owner, name: str) -> Lease:
    return Lease(kind=kind, resource=str(port), project=project, owner=owner, data={"name": name})


def _by_port(leases: Sequence[Lease]) -> list[Lease]:
    return sorted(leases, key=lambda lease: (_port_of(lease) or 0, lease.resource))
