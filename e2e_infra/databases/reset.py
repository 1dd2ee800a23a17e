"""Reset a leased database in place: the same name, lease, role and password; fresh contents.

For an environment kept up (``invoke e2e.up``) whose servers keep running: they hold connections
to the database (a pool), so the database cannot be swapped under them. :func:`reset_in_place`,
on the admin connection and all while the lease stays registered (no moment when cleanup could
take the name for free):

1. ends the database's sessions: ``ALLOW_CONNECTIONS false`` first (a pool that reconnects at
   once cannot slip in between), then ``pg_terminate_backend`` for each, then waits (polled in
   milliseconds, under a deadline) until they are gone. ``DROP ... WITH (FORCE)`` alone would
   do the same, but it checks the backends it signalled only every 100 ms (measured: 106 ms with
   one client connected);
2. drops the database and its role;
3. swaps in a warm spare of the current template (``ALTER DATABASE ... RENAME``, its role renamed
   and given the lease's password again, marked: one implicit transaction, see
   :mod:`.spares`) or, with none, clones the template under the name;
4. marks it as the lease's database again, keeping what the owner's marker said about its proof
   of life (``hold``, ``expires``: the owner is another process).

The password derives from the lease id and the name (see :mod:`.roles`), neither of which
changes, so ``DATABASE_URL`` stays valid: a pool's next connection just works. A reset that fails
half-way (interrupted, the server gone) leaves the name free and the lease in place; running it
again finishes it, and releasing the lease drops whatever is there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as sqlerrors
from psycopg import sql

from ..clock import wait_until
from ..resources.leases import Lease
from .markers import Marker
from .names import ident

if TYPE_CHECKING:
    from .catalog import Catalog
    from .clones import Cloner
    from .spares import Spares
    from .templates import Templates

__all__ = ["ResetReport", "end_sessions", "reset_in_place"]


@dataclass(frozen=True)
class ResetReport:
    """What a reset did."""

    name: str
    template: str
    spare: bool  # a warm spare was swapped in (else a new clone of the template)
    seconds: float  # from ending the sessions to handing the database back
    ended: int  # sessions ended (the servers' connections)

    def line(self) -> str:
        how = "a warm spare" if self.spare else "a new clone"
        return (
            f"reset {self.name} in {self.seconds * 1000:.1f} ms ({how} of {self.template}; "
            f"{self.ended} connection(s) ended)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.name,
            "template": self.template,
            "spare": self.spare,
            "ms": round(self.seconds * 1000, 2),
            "connections_ended": self.ended,
        }


def end_sessions(catalog: Catalog, conn: psycopg.Connection[Any], name: str) -> int:
    """Refuse new connections to ``name`` and end the ones it has; return how many. 0 when the
    database does not exist (a reset that failed half-way)."""
    name_sql = ident(name)
    try:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name_sql))
    except sqlerrors.InvalidCatalogName:
        return 0
    except sqlerrors.InsufficientPrivilege:
        pass  # an admin that does not own it: the drop's FORCE ends latecomers (more slowly)
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    ).fetchall()
    if rows:

        def gone() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchone()
            return row is not None and row[0] == 0

        wait_until(
            gone,
            timeout=catalog.config.database.clone_timeout,
            what=f"the end of the sessions connected to database {name}",
            hint="a session that ignores pg_terminate_backend is stuck in the server; retry",
            clock=catalog.clock,
            first=0.0005,
            cap=0.005,
        )
    return len(rows)


def reset_in_place(
    *,
    catalog: Catalog,
    clones: Cloner,
    spares: Spares,
    templates: Templates,
    conn: psycopg.Connection[Any],
    lease: Lease,
    template: str,
    candidates: list[str],
    strategy: str | None,
) -> ResetReport:
    """Give ``lease``'s database fresh contents from ``template`` (see the module); the spare
    ``candidates`` are tried first."""
    name = lease.resource
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (name,),
    ).fetchone()
    before = Marker.parse(row[0]) if row else None
    marker = clones.lease_marker(lease.with_data(template=template))
    if before is not None:  # the owner's own word on its proof of life, not ours
        marker = dataclasses.replace(marker, hold=before.hold, expires=before.expires)
    login = catalog.roles.login(lease)
    started = catalog.clock.monotonic()
    ended = end_sessions(catalog, conn, name)
    catalog.drop(conn, name)
    spare = bool(candidates) and spares.claim(conn, name, marker, candidates, login)
    if spare:
        seconds = catalog.clock.monotonic() - started
        templates.touch(conn, template)
    else:
        with templates.using(conn, template):
            catalog.create(conn, name, template, strategy)
            catalog.roles.make(conn, name, marker.comment_sql(name), login)
            seconds = catalog.clock.monotonic() - started
    return ResetReport(name, template, spare, seconds, ended)
