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
from .errors import *  # noqa: F403 -- the whole exception tree is public
from .errors import __all__ as _errors_all
from .leases import Lease, Owner, Registry, new_run_id

__all__ = [
    *_errors_all,
    "Clock",
    "Config",
    "ConnInfo",
    "DatabaseConfig",
    "Lease",
    "Owner",
    "PortRange",
    "PostgresConfig",
    "ProjectConfig",
    "Registry",
    "ServerConfig",
    "SystemClock",
    "load_config",
    "mask_secrets",
    "new_run_id",
    "validate_name",
    "wait_until",
]
