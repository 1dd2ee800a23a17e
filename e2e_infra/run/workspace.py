"""The composition root: one :class:`Config` -> registry, ports, cluster, databases.

Everything that needs more than the config (the CLI, a project session, the guardian, the doctor,
``reclaim``, the tests and the benches) builds its parts here instead of wiring them again::

    with Workspace(load_config()) as ws:
        ws.ports.allocate("auth_tests", ["backend"], owner)
        db = ws.databases.allocate("auth_tests", owner)

The parts are made on first use, so a command that only reads the registry never reaches
PostgreSQL and never imports psycopg; closing the workspace closes the database allocator's
connections (idempotent).
"""

from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import E2EInfraError
from ..resources.leases import Registry
from ..resources.ports import PortAllocator

if TYPE_CHECKING:
    from ..conninfo import ConnInfo
    from ..databases import DatabaseAllocator
    from ..postgres import LocalCluster

__all__ = ["Workspace", "make_registry"]


def make_registry(config: Config) -> Registry:
    """The lease registry of ``config``'s state folder."""
    return Registry(
        config.state_dir,
        host=config.host_id,
        lock_timeout=config.lock_timeout,
        ttl=config.lease_ttl,
    )


class Workspace:
    """The parts one configuration needs, each made once and on first use."""

    def __init__(self, config: Config, *, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or make_registry(config)
        self.ports = PortAllocator.from_config(config, self.registry)

    def __repr__(self) -> str:
        return f"Workspace(root={str(self.config.root)!r})"

    @property
    def external(self) -> bool:
        """True when ``database.admin_url`` names a server of the user's (no local cluster)."""
        return self.config.database.admin_url is not None

    @functools.cached_property
    def cluster(self) -> LocalCluster:
        """The embedded local cluster under the state folder (not started by this property)."""
        from ..postgres import LocalCluster  # an edge: psutil and the binaries search

        return LocalCluster(self.config, self.registry, self.ports)

    @functools.cached_property
    def databases(self) -> DatabaseAllocator:
        """The database allocator for the admin URL, or the local cluster (started if needed)."""
        from ..databases import DatabaseAllocator

        admin = self.admin_conninfo()
        admin_url = self.config.database.admin_url
        client = admin_url if admin_url is not None else self.cluster.tcp_conninfo()
        return DatabaseAllocator(self.config, self.registry, admin, client=client)

    def admin_conninfo(self) -> ConnInfo:
        """How the tool connects as administrator: the admin URL, else the running cluster."""
        admin_url = self.config.database.admin_url
        if admin_url is not None:
            return admin_url
        return self.cluster.ensure_running()

    def cluster_running(self) -> bool:
        """Whether the local cluster runs now (never starts it); False with an admin URL."""
        if self.external:
            return False
        try:
            return self.cluster.status().running
        except E2EInfraError:
            return False

    def close(self) -> None:
        """Close the database allocator's connections if it was made; idempotent."""
        allocator = self.__dict__.pop("databases", None)
        if allocator is not None:
            allocator.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()
