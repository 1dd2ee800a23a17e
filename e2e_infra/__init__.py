"""e2e-infra: isolated, parallel end-to-end test projects for a monorepo.

The public surface used by ``tasks.py`` and ``noxfile.py``; everything else is private.

Only the exception tree is imported with the package; every other name is imported from its
submodule on first use (module ``__getattr__``), so ``invoke --list``, a nox worker and the
guardian do not pay for psycopg, psutil or rich until they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F403 -- the whole exception tree is public
from .errors import __all__ as _errors_all

__version__ = "0.2.0"

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports on first use
    from .affected import (
        Affected,
        affected_by_ranges,
        default_branch_base,
        git_toplevel,
        install_pre_push_hook,
        match_path,
        parse_pre_push,
        push_ranges,
        uninstall_pre_push_hook,
    )
    from .clock import Clock, SystemClock, wait_until
    from .config import (
        Config,
        DatabaseConfig,
        PortRange,
        PostgresConfig,
        ProjectConfig,
        ServerConfig,
        find_config_file,
        load_config,
        validate_name,
        validate_project_name,
    )
    from .conninfo import ConnInfo, mask_secrets
    from .databases import AllocatedDatabase, DatabaseAllocator, DatabaseInfo
    from .doctor import Check, DoctorReport, run_doctor
    from .html_report import write_html_report
    from .leases import Lease, Owner, Registry, new_run_id
    from .matrix import Shard, last_durations, parse_shard, plan_shards, shard_projects
    from .migrations import migration_runner, seed_profiles, seed_runner
    from .playwright import merge_playwright_reports
    from .ports import PortAllocator, ephemeral_port_range, port_is_free
    from .postgres import (
        ClusterStatus,
        LocalCluster,
        PgBinaries,
        admin_conninfo,
        check_reachable,
        find_binaries,
    )
    from .progress import StatusWriter, follow_run, use_live_display
    from .reclaim import reclaim
    from .record import Result, RunRecord
    from .report import RunSummary, collect_runs, merge_junit, print_summary
    from .session import ProjectEnv, ProjectSession, RunResult, run_project
    from .workspace import Workspace, make_registry

# public name -> the submodule that defines it; tests/unit/test_init.py checks it against
# __all__ and the imports above.
_LAZY: dict[str, str] = {
    "Affected": "affected",
    "affected_by_ranges": "affected",
    "default_branch_base": "affected",
    "git_toplevel": "affected",
    "install_pre_push_hook": "affected",
    "match_path": "affected",
    "parse_pre_push": "affected",
    "push_ranges": "affected",
    "uninstall_pre_push_hook": "affected",
    "Clock": "clock",
    "SystemClock": "clock",
    "wait_until": "clock",
    "Config": "config",
    "DatabaseConfig": "config",
    "PortRange": "config",
    "PostgresConfig": "config",
    "ProjectConfig": "config",
    "ServerConfig": "config",
    "find_config_file": "config",
    "load_config": "config",
    "validate_name": "config",
    "validate_project_name": "config",
    "ConnInfo": "conninfo",
    "mask_secrets": "conninfo",
    "AllocatedDatabase": "databases",
    "DatabaseAllocator": "databases",
    "DatabaseInfo": "databases",
    "Check": "doctor",
    "DoctorReport": "doctor",
    "run_doctor": "doctor",
    "write_html_report": "html_report",
    "Lease": "leases",
    "Owner": "leases",
    "Registry": "leases",
    "new_run_id": "leases",
    "Shard": "matrix",
    "last_durations": "matrix",
    "parse_shard": "matrix",
    "plan_shards": "matrix",
    "shard_projects": "matrix",
    "migration_runner": "migrations",
    "seed_profiles": "migrations",
    "seed_runner": "migrations",
    "PortAllocator": "ports",
    "ephemeral_port_range": "ports",
    "port_is_free": "ports",
    "ClusterStatus": "postgres",
    "LocalCluster": "postgres",
    "PgBinaries": "postgres",
    "admin_conninfo": "postgres",
    "check_reachable": "postgres",
    "find_binaries": "postgres",
    "merge_playwright_reports": "playwright",
    "StatusWriter": "progress",
    "follow_run": "progress",
    "use_live_display": "progress",
    "RunSummary": "report",
    "collect_runs": "report",
    "merge_junit": "report",
    "print_summary": "report",
    "ProjectEnv": "session",
    "ProjectSession": "session",
    "RunResult": "session",
    "make_registry": "workspace",
    "Workspace": "workspace",
    "reclaim": "reclaim",
    "Result": "record",
    "RunRecord": "record",
    "run_project": "session",
}

__all__ = [
    *_errors_all,
    "Affected",
    "Check",
    "DoctorReport",
    "Shard",
    "StatusWriter",
    "affected_by_ranges",
    "default_branch_base",
    "find_config_file",
    "follow_run",
    "git_toplevel",
    "install_pre_push_hook",
    "last_durations",
    "match_path",
    "parse_pre_push",
    "parse_shard",
    "plan_shards",
    "push_ranges",
    "run_doctor",
    "shard_projects",
    "uninstall_pre_push_hook",
    "use_live_display",
    "write_html_report",
    "ProjectEnv",
    "ProjectSession",
    "RunResult",
    "RunSummary",
    "Result",
    "RunRecord",
    "collect_runs",
    "make_registry",
    "Workspace",
    "merge_junit",
    "merge_playwright_reports",
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
    "validate_project_name",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups do not come here again
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
