"""The allocator: the one object the rest of the library uses for databases.

:class:`DatabaseAllocator` composes the parts of this package -- names and fingerprints, the
admin connection, markers and their policy, templates, clones, warm spares, the locks of a shared
server, sweeping -- behind allocate / release / find / cleanup / list, and maps every psycopg error
at its public methods to one masked line of the exception tree (:mod:`e2e_infra.postgres.pgerrors`).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import errors as sqlerrors

from ..clock import Clock, SystemClock
from ..config import Config, validate_name
from ..conninfo import ConnInfo
from ..errors import DatabaseLimitError, DatabaseNotFoundError, RegistryError, UsageError
from ..processes.interrupts import signals_deferred
from ..resources.leases import Lease, Owner, Registry
from .admin import AdminConnections
from .catalog import Catalog
from .clones import Cloner
from .markers import Kind, count_databases
from .migrations import migration_runner, seed_runner
from .names import FingerprintCache, spare_prefix, template_name, validate_dbname
from .reset import ResetReport, reset_in_place
from .shared import CreationGate, Holds
from .spares import Spares
from .sweep import DatabaseInfo, Sweeper
from .templates import Templates

if TYPE_CHECKING:
    pass

__all__ = ["AllocatedDatabase", "DatabaseAllocator"]

LEASE_KIND = Kind.DATABASE.value

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _server_errors(
    action: str,
) -> Callable[
    [Callable[Concatenate[DatabaseAllocator, _P], _R]],
    Callable[Concatenate[DatabaseAllocator, _P], _R],
]:
    """A public method's edge: see :meth:`Catalog.errors`."""

    def decorate(
        fn: Callable[Concatenate[DatabaseAllocator, _P], _R],
    ) -> Callable[Concatenate[DatabaseAllocator, _P], _R]:
        @functools.wraps(fn)
        def wrapper(self: DatabaseAllocator, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self.catalog.errors(action):
                return fn(self, *args, **kwargs)

        return wrapper

    return decorate


@dataclass(frozen=True)
class AllocatedDatabase:
    name: str
    project: str
    seed: str
    template: str
    url: ConnInfo  # the project's own role and database (see .roles): what DATABASE_URL gets
    lease: Lease
    built: bool = False  # this allocation built the template (it was missing or changed)
    build_seconds: float | None = None  # how long that build (and any wait for it) took
    spare: bool = False  # a warm spare was renamed into it, no clone made

    @property
    def provenance(self) -> dict[str, object]:
        """The template it came from, for the run record (``run.json``'s ``template``)."""
        out: dict[str, object] = {"name": self.template, "built": self.built, "spare": self.spare}
        if self.build_seconds is not None:
            out["build_seconds"] = round(self.build_seconds, 3)
        return out


class DatabaseAllocator:
    """Allocates, releases, lists and sweeps the isolated databases of one configuration."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        admin: ConnInfo,
        *,
        client: ConnInfo | None = None,
        clock: Clock | None = None,
        build_timeout: float | None = None,
        shared: bool | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.admin = admin
        self.client = client or admin
        self.clock = clock or SystemClock()
        # database.build_timeout: each migrate and seed, a wait for another's build, and the
        # statement_timeout of every admin statement.
        self.build_timeout = (
            config.database.build_timeout if build_timeout is None else build_timeout
        )
        self.base = config.database.name_base
        # A shared server (admin_url set) is used by other hosts too: host-tagged names and
        # liveness proven by advisory locks. The embedded cluster is this host's alone.
        self.shared = config.database.admin_url is not None if shared is None else shared
        self.connections = AdminConnections(admin, statement_timeout=self.build_timeout)
        self.catalog = Catalog(
            config,
            registry,
            self.connections,
            client=self.client,
            clock=self.clock,
            shared=self.shared,
        )
        self.holds = Holds(
            admin, enabled=self.shared, timeout=config.database.clone_timeout, clock=self.clock
        )
        self.fingerprints = FingerprintCache()
        self.templates = Templates(self.catalog)
        self.clones = Cloner(self.catalog, self.holds)
        self.spares = Spares(self.catalog)
        self.sweeper = Sweeper(self.catalog, self.templates)
        self.gate = CreationGate.of(config, self.registry.host, timeout=self.build_timeout)

    @_server_errors("allocate a database")
    def allocate(
        self, project: str, owner: Owner, *, seed: str | None = None, ttl: float | None = None
    ) -> AllocatedDatabase:
        """Clone the template of ``seed`` (default: the project's) into a database of its own.

        ``ttl``: the database lives that many seconds (or until released), whatever becomes of
        ``owner``: for CI steps, each a shell gone before the next one asks for its URL."""
        validate_name(project, "project")
        seed = seed or self._project_seed(project)
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        cat, clones = self.catalog, self.clones
        with self.connections.lend() as conn:
            major = cat.major(conn)
            fp = self.fingerprints.get(migrations, seeds, seed, major)
            template = template_name(self.base, seed, fp)
            # One round trip: the clone strategy, whether the template is ready (and its OID),
            # the marked count and the warm spares of this fingerprint.
            row = conn.execute(
                "SELECT current_setting('fsync'), t.ready, t.oid, "
                "(SELECT count(*) FROM pg_database d WHERE NOT d.datistemplate "
                " AND shobj_description(d.oid, 'pg_database') LIKE 'e2e-infra %%'), "
                "(SELECT json_agg(json_build_array(d.datname, "
                " shobj_description(d.oid, 'pg_database'))) "
                " FROM pg_database d WHERE %s AND starts_with(d.datname, %s)) "
                "FROM (SELECT (SELECT datistemplate AND NOT datallowconn FROM pg_database "
                " WHERE datname = %s) AS ready, "
                " (SELECT oid FROM pg_database WHERE datname = %s) AS oid) t",
                (self.config.database.spares > 0, spare_prefix(self.base, fp), template, template),
            ).fetchone()
            assert row is not None
            fsync, ready, template_oid, marked, spare_rows = row
            run = owner.run_id

            built: list[float] = []  # how long each build of this call took (and its wait)

            def build() -> None:
                began = self.clock.monotonic()
                if self.templates.ensure(
                    conn, template, fp, seed, migrations, seeds, rebuild=False, run=run
                ):
                    built.append(self.clock.monotonic() - began)

            if not ready:
                build()
            spares = self.spares.claimable(spare_rows, template, template_oid, fp) if ready else []
            del marked  # counted again under the creation gate
            # Counted and made under one lock, so the caps hold under concurrency.
            gate = contextlib.ExitStack()
            with gate:
                gate.enter_context(self.gate.held(conn, self.clock))
                expires = self.clock.time() + ttl if ttl is not None else None
                lease, dead = self._reserve(conn, project, owner, template, seed, spares, expires)
                gate = gate.pop_all()
            strategy = cat.strategy(str(fsync), major)
            try:
                claimed = False
                if spares:
                    self.holds.hold(lease)
                    marker = clones.lease_marker(lease)
                    login = cat.roles.login(lease)
                    claimed = self.spares.claim(conn, lease.resource, marker, spares, login)
                if claimed:
                    self.templates.touch(conn, template)
                else:
                    try:
                        with self.templates.using(conn, template):
                            lease, dead = clones.clone(conn, lease, template, strategy, dead)
                    except sqlerrors.InvalidCatalogName:
                        # The template was dropped between our check and the clone (pruned or
                        # rebuilt by another process): build it again, once.
                        build()
                        with self.templates.using(conn, template):
                            lease, dead = clones.clone(conn, lease, template, strategy, dead)
            except BaseException:
                self.holds.release(lease.resource)
                if lease.id in clones.unsettled:
                    clones.unsettled.discard(lease.id)  # kept: the proof for cleanup
                else:
                    # An interrupt may come after the clone was made and marked: drop what
                    # was made (and its lease) now; if even that fails, the lease is the proof.
                    with signals_deferred(), contextlib.suppress(Exception):
                        self._release([lease], keep=False)
                raise
            finally:
                gate.close()
            if dead:
                # Records of dead owners of this name: the name is ours now, and marked.
                with self.registry.transaction() as txn:
                    for old in dead:
                        txn.remove(old)
        return AllocatedDatabase(
            name=lease.resource,
            project=project,
            seed=seed,
            template=template,
            url=cat.roles.url(lease),
            lease=lease,
            built=bool(built),
            build_seconds=sum(built) if built else None,
            spare=claimed,
        )

    @_server_errors("reset a database")
    def reset(self, lease: Lease, *, spares: int = 1) -> ResetReport:
        """Give the database of ``lease`` (held by any live owner: an environment kept up) fresh
        contents from the current template of its seed, under the same name, role and
        password, ending the connections to it (see :mod:`.reset`); then top up the template's
        warm spares to ``max(spares, database.spares)`` in the background (:meth:`close`
        waits for it)."""
        seed = str(lease.data.get("seed") or self._project_seed(lease.project))
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        cat = self.catalog
        with self.connections.lend() as conn:
            major = cat.major(conn)
            fp = self.fingerprints.get(migrations, seeds, seed, major)
            template = template_name(self.base, seed, fp)
            if self.templates.ready(conn, template) is not True:
                self.templates.ensure(
                    conn, template, fp, seed, migrations, seeds, rebuild=False, run=None
                )
            row = conn.execute(
                "SELECT current_setting('fsync'), (SELECT oid FROM pg_database WHERE datname = %s),"
                " (SELECT json_agg(json_build_array(d.datname, "
                " shobj_description(d.oid, 'pg_database'))) "
                " FROM pg_database d WHERE starts_with(d.datname, %s))",
                (template, spare_prefix(self.base, fp)),
            ).fetchone()
            assert row is not None
            fsync, template_oid, spare_rows = row
            candidates = self.spares.claimable(spare_rows, template, template_oid, fp)
            report = reset_in_place(
                catalog=cat,
                clones=self.clones,
                spares=self.spares,
                templates=self.templates,
                conn=conn,
                lease=lease,
                template=template,
                candidates=candidates,
                strategy=cat.strategy(str(fsync), major),
            )
        if lease.data.get("template") != template:  # the migrations or seeds changed meanwhile
            with self.registry.transaction() as txn, contextlib.suppress(RegistryError):
                txn.update(lease.with_data(template=template))
        self.spares.prepare_later([template], cap=max(spares, self.config.database.spares))
        return report

    @_server_errors("build a template")
    def ensure_template(self, seed: str, *, rebuild: bool = False) -> str:
        """Build the template of ``seed`` for the current migrations if needed; its name."""
        migrations = migration_runner(self.config)
        seeds = seed_runner(self.config, seed)
        with self.connections.lend() as conn:
            fp = self.fingerprints.get(migrations, seeds, seed, self.catalog.major(conn))
            template = template_name(self.base, seed, fp)
            self.templates.ensure(
                conn, template, fp, seed, migrations, seeds, rebuild=rebuild, run=self.config.run_id
            )
        return template

    @_server_errors("release databases")
    def release(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        run_id: str | None = None,
        keep: bool = False,
        lease_id: str | None = None,
    ) -> builtins.list[str]:
        """Drop the selected leased databases (or keep them for ``keep_hours``); idempotent."""
        if project is None and name is None and run_id is None and lease_id is None:
            raise UsageError(
                "say which databases to release: a project, a database name or a run id "
                "(or release them all)"
            )
        if project is not None:
            validate_name(project, "project")
        if name is not None:
            validate_dbname(name)
        with self.registry.transaction() as txn:
            leases = txn.find(LEASE_KIND, project=project, resource=name, run_id=run_id)
        leases = [lease for lease in leases if lease_id is None or lease.id == lease_id]
        return self._release(leases, keep=keep)

    @_server_errors("release a database")
    def release_lease(self, lease: Lease, *, keep: bool = False) -> builtins.list[str]:
        """Drop (or keep) the database of ``lease``, as its holder knows it: it goes even when
        the registry lost the lease (a deleted state folder)."""
        return self._release([lease], keep=keep)

    @_server_errors("release a database")
    def release_owned(self, owner: Owner) -> builtins.list[str]:
        """Drop every database of ``owner``'s run still leased here (see
        :meth:`~.engine.DatabaseEngine.release_owned`)."""
        with self.registry.transaction() as txn:
            leases = [
                lease
                for lease in txn.find(LEASE_KIND, run_id=owner.run_id)
                if lease.owner.same_process(owner)
            ]
        self.clones.unsettled.difference_update(lease.id for lease in leases)
        return self._release(leases, keep=False)

    @_server_errors("release databases")
    def release_all(self, *, keep: bool = False) -> builtins.list[str]:
        """Drop every database leased in this registry, kept ones included (or keep them all)."""
        with self.registry.transaction() as txn:
            leases = txn.find(LEASE_KIND)
        return self._release(leases, keep=keep)

    def find(
        self, project: str, *, lease_id: str | None = None, run_id: str | None = None
    ) -> AllocatedDatabase:
        """The newest live (or kept) database of ``project`` (that ``lease_id`` names, or of
        the run ``run_id``); DatabaseNotFoundError if none."""
        validate_name(project, "project")
        with self.registry.transaction() as txn:
            held = [
                lease
                for lease in self.clones.held(txn, project)
                if (lease_id is None or lease.id == lease_id)
                and (run_id is None or lease.owner.run_id == run_id)
            ]
        if not held:
            which = f" with lease {lease_id}" if lease_id else ""
            which += f" of run {run_id}" if run_id else ""
            raise DatabaseNotFoundError(
                f"project {project!r} has no live database{which}; allocate one with "
                f"`invoke db.allocate --project {project}` (with --ttl 1h when the next "
                "command runs in another shell, as CI steps do)",
                project=project,
            )
        lease = max(held, key=lambda item: item.created_at)
        return AllocatedDatabase(
            name=lease.resource,
            project=project,
            seed=str(lease.data.get("seed", "")),
            template=str(lease.data.get("template", "")),
            url=self.catalog.roles.url(lease),
            lease=lease,
        )

    @_server_errors("migrate a database")
    def migrate(self, project: str) -> AllocatedDatabase:
        """Apply pending migrations to the project's live database, as the project's own role:
        never as the admin, whatever the project made there (see :mod:`.roles`)."""
        found = self.find(project)
        migration_runner(self.config).apply(found.url)
        return found

    @_server_errors("seed a database")
    def seed(self, project: str, profile: str) -> AllocatedDatabase:
        """Apply seed ``profile`` to the project's live database, as the project's own role."""
        runner = seed_runner(self.config, profile)
        found = self.find(project)
        runner.apply(found.url)
        return found

    @_server_errors("prepare warm spares")
    def prepare_spares(self, template: str) -> builtins.list[str]:
        """Top up the warm spares of ``template`` to ``spares``; the names made.

        Runs after a release, in a background thread (see :meth:`close`); callable directly. Only
        one process tops up a template at a time (an advisory lock; the others skip), spares of an
        older template of the same seed are dropped first, and ``max_databases`` is respected.
        """
        return self.spares.prepare(template)

    @_server_errors("drop warm spares")
    def drop_spares(self, template: str) -> builtins.list[str]:
        """Drop every warm spare of ``template`` (an environment kept up made one for its resets
        with ``spares`` = 0: it leaves none behind)."""
        self.spares.join(self.config.database.clone_timeout)
        return self.spares.drop_all(template)

    def close(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``, default ``clone_timeout``) for the spare being prepared and
        let go of the locks held for live databases (only call it once they are released: on a
        shared server the locks prove they are in use). Idempotent; a session calls it last,
        when the suite is long done."""
        limit = self.config.database.clone_timeout if timeout is None else timeout
        self.spares.join(limit)
        self.holds.release_all()
        self.connections.close(limit)

    @_server_errors("clean up databases")
    def cleanup(self) -> builtins.list[tuple[str, str]]:
        """Drop marked databases whose owner is proven gone or whose keep expired, old templates
        beyond ``keep_templates``, half-built ones whose builder died, and what a process that
        died before marking it left: an unmarked database named exactly by a stale lease of ours
        (the lease is the proof it was ours). Never any other unmarked database."""
        return self.sweeper.cleanup()

    @_server_errors("list databases")
    def list(self) -> builtins.list[DatabaseInfo]:
        """Marked databases of this name base, joined with the leases; leases without one too."""
        return self.sweeper.list()

    @_server_errors("renew databases")
    def renew(
        self, project: str | None = None, *, owner: Owner | None = None
    ) -> builtins.list[str]:
        """Extend the expiry of the databases allocated by a command (``hold: false`` on a shared
        server) of ``project`` (all projects when None) and of ``owner`` (any when None); the
        names renewed. ``invoke db.renew``; ``invoke db.allocate`` renews its owner's others."""
        if project is not None:
            validate_name(project, "project")
        with self.registry.transaction() as txn:
            leases = [
                lease
                for lease in self.clones.held(txn, project)
                if lease.data.get("keep_until") is None
                and (owner is None or lease.owner.same_process(owner))
                and lease.resource not in self.holds
            ]
        if not self.shared or not leases:
            return []
        renewed = []
        with self.connections.lend() as conn:
            for lease in leases:
                with contextlib.suppress(sqlerrors.InvalidCatalogName, sqlerrors.UndefinedObject):
                    self.catalog.mark(conn, lease.resource, self.clones.lease_marker(lease))
                    renewed.append(lease.resource)
        return renewed

    def proof_lost(self) -> bool:
        """Whether the proof of life of a database of this process was lost for good."""
        return bool(self.holds.lost)

    def check_holds(self) -> None:
        """Raise DatabaseError if the proof of life of a database of this process was lost for
        good during the run (its lock could not be re-taken in time): a session calls it after
        the suite. See :class:`.shared.Holds`."""
        self.holds.check()

    # --- helpers ---------------------------------------------------------------------------------

    def _reserve(
        self,
        conn: psycopg.Connection[Any],
        project: str,
        owner: Owner,
        template: str,
        seed: str,
        spares: builtins.list[str],
        expires: float | None = None,
    ) -> tuple[Lease, builtins.list[Lease]]:
        """Count (under the creation gate) and reserve; at a cap, sweep what is provably dead
        (other hosts' too) once before refusing."""
        db = self.config.database
        for attempt in (1, 2):
            mine, everyone = count_databases(self.catalog.marked(conn), self.registry.host)
            if not self.shared:
                mine = everyone  # the local cluster is this host's alone
            claimed = min(len(spares), 1)  # a claimed spare turns into the new database
            try:
                if db.server_max_databases and everyone - claimed >= db.server_max_databases:
                    raise DatabaseLimitError(
                        f"{everyone} e2e databases exist on the server, the limit is "
                        f"server_max_databases = {db.server_max_databases}; drop leftovers with "
                        "`invoke db.cleanup`, or raise database.server_max_databases",
                        limit=db.server_max_databases,
                    )
                return self.clones.reserve(project, owner, template, seed, mine - claimed, expires)
            except DatabaseLimitError:
                if attempt == 2:
                    raise
            self.sweeper.cleanup()  # proven-dead databases of any host, then count again
        raise AssertionError("unreachable")

    def _project_seed(self, project: str) -> str:
        configured = self.config.projects.get(project)
        return configured.seed if configured is not None else self.config.database.default_seed

    def _release(self, leases: builtins.list[Lease], *, keep: bool) -> builtins.list[str]:
        if not leases:
            return []
        names = [lease.resource for lease in leases]
        if keep:
            keep_until = self.clock.time() + self.config.database.keep_hours * 3600
            kept: builtins.list[Lease] = []
            with self.registry.transaction() as txn:
                for lease in leases:
                    with contextlib.suppress(RegistryError):  # released meanwhile
                        kept.append(txn.update(lease.with_data(keep_until=keep_until)))
            with self.connections.lend() as conn:
                for lease in kept:
                    with contextlib.suppress(
                        sqlerrors.InvalidCatalogName, sqlerrors.UndefinedObject
                    ):
                        marker = self.clones.lease_marker(lease, Kind.KEPT)
                        self.catalog.mark(conn, lease.resource, marker)
            for lease in kept:
                self.holds.release(lease.resource)  # the keep in the marker protects it now
            return [lease.resource for lease in kept]
        with self.connections.lend() as conn:
            for name in names:
                self.catalog.drop(conn, name)
        for name in names:
            self.holds.release(name)
        with self.registry.transaction() as txn:
            for lease in leases:
                txn.remove(lease)
        templates = {str(lease.data.get("template") or "") for lease in leases} - {""}
        if self.config.database.spares > 0 and templates:
            self.spares.prepare_later(sorted(templates))
        return names
