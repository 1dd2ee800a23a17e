"""e2e-infra: isolated, parallel end-to-end test projects for a monorepo.

The public surface used by ``tasks.py`` and ``noxfile.py``; everything else is private.
"""

from __future__ import annotations

from .clock import Clock, SystemClock, wait_until
from .config import (
    Config,
    DatabaseConfig,
    PortRange,
    PostgresConfig,
    ProjectConfig,
    ServerConfig,
    load_config,
    validate_name,
)
from .conninfo import ConnInfo, mask_secrets
from .databases import AllocatedDatabase, DatabaseAllocator, DatabaseInfo, database_allocator
from .errors import *  # noqa: F403 -- the whole exception tree is public
from .errors import __all__ as _errors_all
from .leases import Lease, Owner, Registry, new_run_id
from .migrations import migration_runner, seed_profiles, seed_runner
from .ports import PortAllocator, ephemeral_port_range, port_is_free
from .postgres import (
    ClusterStatus,
    LocalCluster,
    PgBinaries,
    admin_conninfo,
    check_reachable,
    find_binaries,
)
from .report import RunSummary, collect_runs, merge_junit, print_summary
from .session import ProjectEnv, ProjectSession, RunResult, make_registry, reclaim, run_project

__all__ = [
    *_errors_all,
    "ProjectEnv",
    "ProjectSession",
    "RunResult",
    "RunSummary",
    "collect_runs",
    "make_registry",
    "merge_junit",
    "print_summary",
    "reclaim",
    "run_project",
    "AllocatedDatabase",
    "Clock",
    "ClusterStatus",
    "Config",
    "ConnInfo",
    "DatabaseAllocator",
    "DatabaseConfig",
    "DatabaseInfo",
    "Lease",
    "LocalCluster",
    "Owner",
    "PgBinaries",
    "PortAllocator",
    "PortRange",
    "PostgresConfig",
    "ProjectConfig",
    "Registry",
    "ServerConfig",
    "SystemClock",
    "admin_conninfo",
    "check_reachable",
    "database_allocator",
    "ephemeral_port_range",
    "find_binaries",
    "load_config",
    "mask_secrets",
    "migration_runner",
    "new_run_id",
    "port_is_free",
    "seed_profiles",
    "seed_runner",
    "validate_name",
    "wait_until",
]
