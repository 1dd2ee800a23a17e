"""The embedded local PostgreSQL cluster, used when no admin URL is configured.

One cluster per state folder, shared by every session on the host and outliving the process that
started it. :meth:`LocalCluster.ensure_running` is idempotent and safe to call from many processes
at once: it holds ``<state_dir>/pg.lock`` while it checks, initialises (``initdb`` once, into a
temporary folder renamed into place) and starts the server.

Layout of the cluster folder (``config.postgres.data_dir`` if set; else ``<state_dir>/pg`` for a
normal user, or ``/tmp/e2e-infra-pg-<hash>`` -- ``/dev/shm/...`` with ``tmpfs`` -- when the cluster
must be reachable by an unprivileged server user or live on tmpfs)::

    data/            PGDATA (``postgresql.conf`` includes ``e2e-infra.conf``, rewritten per start)
    sock/            the unix socket folder, 0700, owned by the server user
    postgres.log     the server log

The TCP password lives in ``<state_dir>/pg-password`` (0600, readable by the tool's user only).

When started as root the server runs as an unprivileged user (``postgres.user``, else ``postgres``,
else ``nobody``). Folders that already exist are never chmodded; the cluster folder is created
0700 and owned by the server user, and must not be reachable only through a private folder.

The server's port comes from the port allocator (project ``postgres``, port name ``postgres``) and
its lease is handed to the postmaster process, so the lease is live exactly as long as the server
runs. A postmaster killed with SIGKILL is detected by pid + data folder; its orphaned children are
killed and the next :meth:`~LocalCluster.ensure_running` starts a fresh one on a fresh lease.

Modules: :mod:`.binaries` finds initdb / pg_ctl / postgres (and copies a pip-installed PostgreSQL
where an unprivileged server user can run it); :mod:`.layout` is the server user and its private
folders; :mod:`.postmaster` finds and stops the server's processes; :mod:`.cluster` is
:class:`LocalCluster`.
"""

from __future__ import annotations

from .binaries import PgBinaries, find_binaries
from .cluster import APPLICATION_NAME, ClusterStatus, LocalCluster, admin_conninfo, check_reachable

__all__ = [
    "APPLICATION_NAME",
    "ClusterStatus",
    "LocalCluster",
    "PgBinaries",
    "admin_conninfo",
    "check_reachable",
    "find_binaries",
]
