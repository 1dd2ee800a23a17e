"""Isolated databases cloned from fingerprinted templates, with marked ownership.

One job per module; :class:`DatabaseAllocator` composes them:

=================  ================================================================================
``names``          database names, host tags, advisory lock keys, template fingerprints
``markers``        the typed marker (``COMMENT ON DATABASE``) and the pure keep / drop policy
``admin``          the admin connection kept between calls
``catalog``        our marked databases on the server: clone, mark, drop, settle, half-made ones
``templates``      template build under an advisory lock, publication by rename, pruning
``clones``         a project's database: reserve a name, clone, mark
``spares``         warm spares and the thread that tops them up
``shared``         a shared server's proof of life: advisory locks held on the names
``sweep``          cleanup and listing
``allocator``      the facade
=================  ================================================================================

* The **fingerprint** hashes everything that shapes the data: the migration and seed inputs (file
  names and contents, or command strings and the files they name), the seed profile, the server's
  major version and :data:`TEMPLATE_FORMAT_VERSION`.
* The **template** of a fingerprint is built once (see :mod:`.templates`); a **database** for a
  project is a clone of it (see :mod:`.clones`), recorded as a lease of kind ``database`` and
  marked with ``COMMENT ON DATABASE ... IS 'e2e-infra {json}'`` (see :mod:`.markers`).
  :meth:`DatabaseAllocator.cleanup` drops marked databases whose owner is proven gone (or whose
  keep expired). An unmarked one only when a stale lease of ours names it exactly: a clone, spare
  or template build keeps its lease until it is marked (or proven absent), so a maker that died
  between ``CREATE`` and ``COMMENT`` leaves that proof.
* **Warm spares** (``spares`` > 0) are clones made off the critical path and claimed by rename
  (see :mod:`.spares`).
* **A shared server** (``admin_url`` set): several hosts allocate on one server. Database names
  get a host part and an allocation holds an advisory lock on its name while it lives (see
  :mod:`.shared`): watched for the whole run and re-taken after a lost connection; a cleanup
  drops another owner's database only when that lock is free twice across a grace and nobody is
  connected to it, never on a pid alone. An allocation whose owner is another process
  (``invoke db.allocate`` records its parent shell) cannot hold the lock: its marker says
  ``hold: false`` and carries a renewable expiry (``invoke db.renew``). See docs/scale-out.md.

All SQL names are validated and composed with :class:`psycopg.sql.Identifier`; every psycopg error
reaching a public method is mapped at one boundary (:mod:`e2e_infra.postgres.pgerrors`).
"""

from __future__ import annotations

from .allocator import AllocatedDatabase, DatabaseAllocator
from .markers import MARKER_PREFIX, Kind, MarkedDatabase, Marker, parse_marker
from .names import (
    TEMPLATE_FORMAT_VERSION,
    database_name,
    fingerprint,
    host_tag,
    spare_name,
    template_name,
    validate_dbname,
)
from .sweep import DatabaseInfo

__all__ = [
    "MARKER_PREFIX",
    "TEMPLATE_FORMAT_VERSION",
    "AllocatedDatabase",
    "DatabaseAllocator",
    "DatabaseInfo",
    "Kind",
    "MarkedDatabase",
    "Marker",
    "database_name",
    "fingerprint",
    "host_tag",
    "parse_marker",
    "spare_name",
    "template_name",
    "validate_dbname",
]
