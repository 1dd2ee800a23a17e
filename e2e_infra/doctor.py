"""``invoke e2e.doctor``: is this machine ready to run the E2E projects, and if not, what to fix.

Each check says ``ok``, ``warn`` (works, but worth a look) or ``fail`` (a run would break), with
the detail it found and the fix. The doctor changes nothing: it does not start PostgreSQL, take a
lock for long, reclaim a lease or move a broken registry aside; it only reads and probes.

Checks: the PostgreSQL binaries (only needed for the embedded cluster), PostgreSQL itself (the
admin URL reachable, or the embedded cluster running or startable) and its version, the port range
against the kernel's ephemeral range, the lease registry (readable, schema, records), stale leases,
the free ports left in the range, that the state and results folders are writable, and cluster
folders left in memory by checkouts that are gone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .errors import E2EInfraError
from .postgres import LocalCluster, PgBinaries, check_reachable, find_binaries
from .postgres.folders import SCAN_ROOTS, ClusterFolder, scan_cluster_folders
from .resources.leases import (
    REGISTRY_FILE,
    SCHEMA_VERSION,
    Lease,
    Registry,
    Transaction,
    parse_registry,
)
from .resources.ports import EPHEMERAL_RANGE_FILE, PortAllocator, ephemeral_port_range, port_is_free

__all__ = [
    "MIN_POSTGRES_MAJOR",
    "Check",
    "DoctorReport",
    "check_binaries",
    "check_cluster_folders",
    "check_folders",
    "check_free_ports",
    "check_port_range",
    "check_postgres",
    "check_registry",
    "run_doctor",
]

OK, WARN, FAIL = "ok", "warn", "fail"
#: Older servers lack what the tool relies on; below 15 cloning cannot pick its strategy.
MIN_POSTGRES_MAJOR = 12
RECOMMENDED_POSTGRES_MAJOR = 15


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARN]

    @property
    def exit_code(self) -> int:
        """1 on a real problem; warnings alone are 0."""
        return 1 if self.failures else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.failures,
            "failures": len(self.failures),
            "warnings": len(self.warnings),
            "checks": [c.to_json() for c in self.checks],
        }


# --- the checks -----------------------------------------------------------------------------------


def check_binaries(
    config: Config, environ: Mapping[str, str] | None = None
) -> tuple[Check, PgBinaries | None]:
    external = config.database.admin_url is not None
    try:
        found = find_binaries(config.postgres, environ)
    except E2EInfraError as exc:
        if external:
            return Check("binaries", OK, "not needed: the admin URL points at a server"), None
        return Check("binaries", FAIL, exc.one_line(), _fix_of(exc.one_line())), None
    return (
        Check("binaries", OK, f"PostgreSQL {found.version} in {found.bin_dir}"),
        found,
    )


def _fix_of(message: str) -> str:
    """The fix is the part of a library message after its last ';' (they end with what to do)."""
    return message.rsplit(";", 1)[-1].strip() if ";" in message else ""


def _version_check(major: int, version: str, where: str) -> Check:
    if major < MIN_POSTGRES_MAJOR:
        return Check(
            "postgres version",
            FAIL,
            f"{where} is PostgreSQL {version}; e2e-infra needs {MIN_POSTGRES_MAJOR} or newer",
            f"use PostgreSQL {RECOMMENDED_POSTGRES_MAJOR}+",
        )
    if major < RECOMMENDED_POSTGRES_MAJOR:
        return Check(
            "postgres version",
            WARN,
            f"{where} is PostgreSQL {version}: clones cannot choose FILE_COPY / WAL_LOG "
            f"(CREATE DATABASE ... STRATEGY needs {RECOMMENDED_POSTGRES_MAJOR})",
            f"use PostgreSQL {RECOMMENDED_POSTGRES_MAJOR}+ for faster clones",
        )
    return Check("postgres version", OK, f"{where} is PostgreSQL {version}")


def _server_version(info: Any) -> tuple[int, str]:
    import psycopg

    with psycopg.connect(info.conninfo(connect_timeout=5), autocommit=True) as conn:
        number = conn.info.server_version
        row = conn.execute("SHOW server_version").fetchone()
    text = str(row[0]).split()[0] if row else str(number)
    return number // 10000, text


def check_postgres(config: Config, binaries: PgBinaries | None) -> list[Check]:
    """The admin URL reachable, or the embedded cluster running or startable; its version."""
    info = config.database.admin_url
    if info is not None:
        try:
            check_reachable(info, external=True)
            major, version = _server_version(info)
        except E2EInfraError as exc:
            # The user's own server: ours to diagnose, not to start (no `invoke pg.start`).
            fix = _fix_of(exc.one_line()) or "check that the server runs and accepts connections"
            return [Check("postgres", FAIL, exc.one_line(), fix)]
        except Exception as exc:  # a driver error while reading the version
            return [Check("postgres", FAIL, f"{info.masked}: {exc}".splitlines()[0])]
        return [
            Check("postgres", OK, f"the admin URL {info.masked} is reachable"),
            _version_check(major, version, info.masked),
        ]

    registry = Registry(config.state_dir, host=config.host_id, lock_timeout=1.0)
    # Only to build the cluster object: the range itself is judged by check_port_range.
    ports = PortAllocator(registry, config.port_range, allow_ephemeral_overlap=True)
    cluster = LocalCluster(config, registry, ports)
    try:
        status = cluster.status()
    except (E2EInfraError, OSError) as exc:
        text = exc.one_line() if isinstance(exc, E2EInfraError) else str(exc)
        return [Check("postgres", FAIL, f"cannot read the embedded cluster's state: {text}")]
    if status.running:
        checks = [
            Check(
                "postgres",
                OK,
                f"the embedded cluster runs (pid {status.pid}, port {status.port}, "
                f"data {status.data_dir})",
            )
        ]
        try:
            check_reachable(cluster.admin_conninfo())
        except E2EInfraError as exc:
            checks.append(
                Check(
                    "postgres",
                    FAIL,
                    f"the embedded cluster runs but does not answer: {exc.one_line()}",
                    "run `invoke pg.stop` then `invoke pg.start`",
                )
            )
    elif binaries is None:
        return [
            Check(
                "postgres",
                FAIL,
                "the embedded cluster is not running and cannot start without binaries",
                "install PostgreSQL or set E2E_ADMIN_DATABASE_URL (see the binaries check)",
            )
        ]
    else:
        checks = [_startable(cluster, binaries)]
    if binaries is not None:
        checks.append(_version_check(binaries.major, binaries.version, str(binaries.bin_dir)))
    return checks


def _startable(cluster: LocalCluster, binaries: PgBinaries) -> Check:
    made_by_file = cluster.data_dir / "PG_VERSION"
    if made_by_file.is_file():
        made_by = made_by_file.read_text(encoding="utf-8").strip()
        if made_by != str(binaries.major):
            return Check(
                "postgres",
                FAIL,
                f"the embedded cluster in {cluster.data_dir} was made by PostgreSQL {made_by} "
                f"but the binaries are {binaries.version}: it cannot start",
                f"remove {cluster.cluster_dir} (test data only) or point postgres.bin_dir at "
                f"PostgreSQL {made_by}",
            )
        return Check(
            "postgres",
            OK,
            f"the embedded cluster is not running; startable (initialised in {cluster.data_dir}); "
            "a run starts it, or `invoke pg.start`",
        )
    parent = next(p for p in (cluster.cluster_dir, *cluster.cluster_dir.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return Check(
            "postgres",
            FAIL,
            f"the embedded cluster cannot be created: {parent} is not writable",
            "set postgres.data_dir (E2E_PG_DATA_DIR) to a writable folder",
        )
    return Check(
        "postgres",
        OK,
        f"the embedded cluster is not running and not initialised yet; startable (initdb into "
        f"{cluster.data_dir} on first use, about 1 s)",
    )


def check_port_range(config: Config, ephemeral: tuple[int, int] | None) -> Check:
    rng = config.port_range
    if ephemeral is None:
        return Check(
            "port range",
            WARN,
            f"port range {rng}; cannot read the kernel's ephemeral range ({EPHEMERAL_RANGE_FILE})",
            "make sure the range lies outside the ephemeral range of this system",
        )
    low, high = ephemeral
    if rng.low <= high and low <= rng.high:
        detail = (
            f"port range {rng} overlaps the kernel's ephemeral range {low}-{high}: any outgoing "
            "connection can take a port of it"
        )
        fix = f"choose a range below {low}, e.g. port_range = '3100-5500' (E2E_PORT_RANGE)"
        if config.allow_ephemeral_overlap:
            return Check("port range", WARN, detail + " (allowed by allow_ephemeral_overlap)", fix)
        return Check("port range", FAIL, detail, fix)
    return Check("port range", OK, f"port range {rng} is outside the ephemeral range {low}-{high}")


def _load_registry(path: Path) -> tuple[list[Lease] | None, Check, int]:
    """(leases or None, health check, malformed records) without changing the file."""
    name = "registry"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], Check(name, OK, f"no lease registry yet ({path}): nothing leased"), 0
    except OSError as exc:
        return (
            None,
            Check(
                name,
                FAIL,
                f"cannot read the lease registry {path}: {exc.strerror}",
                f"fix the permissions of {path.parent}",
            ),
            0,
        )
    try:
        leases, malformed = parse_registry(raw)
    except ValueError as exc:
        return (
            None,
            Check(
                name,
                FAIL,
                f"the lease registry {path} is not valid ({exc})",
                "run `invoke e2e.cleanup`: the registry is kept aside as leases.json.corrupt-* "
                "and a new one started, then leftovers are swept",
            ),
            0,
        )
    bad = len(malformed)
    if bad:
        check = Check(
            name,
            WARN,
            f"the lease registry {path} has {bad} malformed record(s) (of "
            f"{bad + len(leases)}); they are dropped at the next write",
            "run `invoke e2e.cleanup`",
        )
    else:
        check = Check(name, OK, f"{path}: schema {SCHEMA_VERSION}, {len(leases)} lease(s)")
    return leases, check, bad


def check_registry(config: Config, *, now: float | None = None) -> tuple[list[Check], list[Lease]]:
    """Registry health and stale leases; also returns the leases read (for the port count)."""
    leases, health, _bad = _load_registry(config.state_dir / REGISTRY_FILE)
    if leases is None:
        return [health], []
    txn = Transaction(
        list(leases),
        host=config.host_id,
        ttl=config.lease_ttl,
        now=time.time() if now is None else now,
    )
    stale = txn.stale()
    if stale:
        shown = "; ".join(
            f"{lease.kind} {lease.resource} of {lease.project}: {why}" for lease, why in stale[:5]
        )
        more = f" (and {len(stale) - 5} more)" if len(stale) > 5 else ""
        check = Check(
            "stale leases",
            WARN,
            f"{len(stale)} stale lease(s): {shown}{more}",
            "run `invoke e2e.cleanup` (runs also reclaim them as they go)",
        )
    else:
        check = Check("stale leases", OK, "none")
    return [health, check], leases


def check_free_ports(
    config: Config,
    leases: Sequence[Lease],
    *,
    probe: Callable[[int], bool] = port_is_free,
) -> Check:
    """How many ports of the range are neither leased nor taken; enough for every project?"""
    rng = config.port_range
    leased = {
        int(lease.resource)
        for lease in leases
        if (lease.resource.isascii() and lease.resource.isdigit())
    }
    free = sum(1 for port in range(rng.low, rng.high + 1) if port not in leased and probe(port))
    per_project = len(config.port_names)
    everyone = per_project * max(1, len(config.projects)) + 1  # + the embedded cluster
    detail = (
        f"{free} of {len(rng)} ports free in {rng} ({len(leased)} leased); a project needs "
        f"{per_project}, all {len(config.projects)} at once {everyone}"
    )
    if free < per_project + 1:
        return Check(
            "free ports", FAIL, detail, "widen port_range, or free the ports (`invoke ports.list`)"
        )
    if free < everyone:
        return Check(
            "free ports",
            WARN,
            detail,
            "widen port_range, or run fewer projects at once (`invoke e2e.all --jobs N`)",
        )
    return Check("free ports", OK, detail)


def check_folders(config: Config) -> Check:
    bad = []
    for label, folder in (("state_dir", config.state_dir), ("results_dir", config.results_dir)):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            bad.append(f"{label} {folder}")
    if bad:
        return Check(
            "folders",
            FAIL,
            f"not writable: {', '.join(bad)}",
            "fix the permissions or point state_dir / results_dir elsewhere",
        )
    return Check("folders", OK, f"state {config.state_dir}, results {config.results_dir}")


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MB"


def check_cluster_folders(roots: Sequence[Path] = SCAN_ROOTS) -> Check:
    """Cluster folders (in /dev/shm, /tmp) whose checkout is gone, or whose owner is unknown."""
    folders = scan_cluster_folders(roots)
    orphans = [f for f in folders if f.state == "orphaned"]
    unknown = [f for f in folders if f.state == "unknown"]

    def listed(items: list[ClusterFolder]) -> str:
        shown = ", ".join(f"{f.path} ({_size(f.size)}: {f.why})" for f in items[:5])
        return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    if not orphans and not unknown:
        return Check("cluster folders", OK, f"{len(folders)} in use, none left by a gone checkout")
    parts: list[str] = []
    fixes: list[str] = []
    if orphans:
        total = _size(sum(f.size for f in orphans))
        parts.append(f"{len(orphans)} left by a gone checkout ({total}): {listed(orphans)}")
        fixes.append("run `invoke e2e.cleanup` (removes those whose server is not running)")
    if unknown:
        total = _size(sum(f.size for f in unknown))
        parts.append(f"{len(unknown)} of unknown owner ({total}): {listed(unknown)}")
        fixes.append("`invoke pg.stop --purge` from the checkout using one, or remove it by hand")
    # Unknown ones alone are reported, not warned about: they may well be in use (made by an
    # older version, before owner.json), and nothing here can tell.
    return Check("cluster folders", WARN if orphans else OK, "; ".join(parts), "; ".join(fixes))


def run_doctor(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    ephemeral: Callable[[], tuple[int, int] | None] = ephemeral_port_range,
    probe: Callable[[int], bool] = port_is_free,
) -> DoctorReport:
    """Run every check; nothing is started, reclaimed or rewritten."""
    checks: list[Check] = []
    binaries_check, binaries = check_binaries(config, environ)
    checks.append(binaries_check)
    checks += check_postgres(config, binaries)
    checks.append(check_port_range(config, ephemeral()))
    registry_checks, leases = check_registry(config)
    checks += registry_checks
    checks.append(check_free_ports(config, leases, probe=probe))
    checks.append(check_folders(config))
    checks.append(check_cluster_folders())
    return DoctorReport(tuple(checks))
