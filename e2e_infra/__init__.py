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
    from .databases.migrations import migration_runner, seed_profiles, seed_runner
    from .doctor import Check, DoctorReport, run_doctor
    from .plan.affected import (
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
    from .plan.matrix import Shard, parse_shard, plan_shards, shard_projects
    from .postgres import (
        ClusterStatus,
        LocalCluster,
        PgBinaries,
        admin_conninfo,
        check_reachable,
        find_binaries,
    )
    from .report.html import write_html_report
    from .report.progress import StatusWriter, follow_run, use_live_display
    from .report.summary import RunSummary, collect_runs, merge_junit, print_summary
    from .resources.leases import Lease, Owner, Registry, new_run_id
    from .resources.ports import PortAllocator, ephemeral_port_range, port_is_free
    from .results.durations import last_durations
    from .results.record import Result, RunRecord
    from .run.playwright import merge_playwright_reports
    from .run.reclaim import reclaim
    from .run.session import ProjectEnv, ProjectSession, RunResult, run_project
    from .run.workspace import Workspace, make_registry

# public name -> the submodule that defines it; tests/unit/test_init.py checks it against
# __all__ and the imports above.
_LAZY: dict[str, str] = {
    "Affected": "plan.affected",
    "affected_by_ranges": "plan.affected",
    "default_branch_base": "plan.affected",
    "git_toplevel": "plan.affected",
    "install_pre_push_hook": "plan.affected",
    "match_path": "plan.affected",
    "parse_pre_push": "plan.affected",
    "push_ranges": "plan.affected",
    "uninstall_pre_push_hook": "plan.affected",
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
    "write_html_report": "report.html",
    "Lease": "resources.leases",
    "Owner": "resources.leases",
    "Registry": "resources.leases",
    "new_run_id": "resources.leases",
    "Shard": "plan.matrix",
    "last_durations": "results.durations",
    "parse_shard": "plan.matrix",
    "plan_shards": "plan.matrix",
    "shard_projects": "plan.matrix",
    "migration_runner": "databases.migrations",
    "seed_profiles": "databases.migrations",
    "seed_runner": "databases.migrations",
    "PortAllocator": "resources.ports",
    "ephemeral_port_range": "resources.ports",
    "port_is_free": "resources.ports",
    "ClusterStatus": "postgres",
    "LocalCluster": "postgres",
    "PgBinaries": "postgres",
    "admin_conninfo": "postgres",
    "check_reachable": "postgres",
    "find_binaries": "postgres",
    "merge_playwright_reports": "run.playwright",
    "StatusWriter": "report.progress",
    "follow_run": "report.progress",
    "use_live_display": "report.progress",
    "RunSummary": "report.summary",
    "collect_runs": "report.summary",
    "merge_junit": "report.summary",
    "print_summary": "report.summary",
    "ProjectEnv": "run.session",
    "ProjectSession": "run.session",
    "RunResult": "run.session",
    "make_registry": "run.workspace",
    "Workspace": "run.workspace",
    "reclaim": "run.reclaim",
    "Result": "results.record",
    "RunRecord": "results.record",
    "run_project": "run.session",
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
