"""The database side of a project run, as the session sees it: the seam a second engine (another
server kind, a pool of ready databases elsewhere) would implement.

:class:`~.allocator.DatabaseAllocator` is the one implementation; the session depends only on
these protocols, so it never reaches past them into templates, clones or markers.
"""

from __future__ import annotations

from typing import Protocol

from ..conninfo import ConnInfo
from ..resources.leases import Lease, Owner

__all__ = ["Allocated", "DatabaseEngine"]


class Allocated(Protocol):
    """A database handed to one project's run."""

    @property
    def name(self) -> str: ...

    @property
    def seed(self) -> str: ...

    @property
    def url(self) -> ConnInfo:
        """The project's own role on its own database: what ``DATABASE_URL`` gets."""
        ...

    @property
    def lease(self) -> Lease: ...

    @property
    def provenance(self) -> dict[str, object]:
        """Where it came from, for the run record: the template's name, whether this call built
        it (and in how many seconds), whether it was a warm spare."""
        ...


class DatabaseEngine(Protocol):
    """Hands out and takes back a project's database."""

    def allocate(self, project: str, owner: Owner, *, seed: str | None = None) -> Allocated:
        """A fresh database for ``project`` (migrated and seeded with ``seed``), owned by
        ``owner``; its proof of life is kept until :meth:`release_lease`."""
        ...

    def release_lease(self, lease: Lease, *, keep: bool = False) -> list[str]:
        """Drop the database of ``lease`` (``keep``: mark it kept instead); idempotent."""
        ...

    def release_owned(self, owner: Owner) -> list[str]:
        """Drop every database ``owner`` (its run) still leases: what an allocation that never
        returned (interrupted) left; idempotent."""
        ...

    def proof_lost(self) -> bool:
        """Whether the proof of life of a database of this process was lost for good."""
        ...

    def check_holds(self) -> None:
        """Raise :class:`~e2e_infra.errors.DatabaseError` when :meth:`proof_lost`."""
        ...
