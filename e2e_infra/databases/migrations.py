"""Migrations and seeds: two runners behind one small interface.

A :class:`Runner` knows what shapes the data it produces (:meth:`Runner.inputs`, hashed into the
template fingerprint) and how to apply itself to one database (:meth:`Runner.apply`).

* :class:`SqlDirectoryRunner` applies the ``*.sql`` files of one folder in name order, each in its
  own transaction, and records them with a checksum in ``e2e_infra.migrations`` (the tool's
  bookkeeping, see :data:`BOOKKEEPING`); a file that was edited after it was applied is an error
  naming it. One applier at a time per database: it holds a session advisory lock from reading
  what was applied until its last file is committed. Each statement runs under
  ``statement_timeout`` = the runner's timeout (``database.build_timeout``).
* :class:`CommandRunner` runs an external command (``alembic upgrade head``, ``prisma migrate
  deploy``...) with ``DATABASE_URL`` pointing at the target and the environment of
  :func:`~e2e_infra.processes.child_environ` (no admin URL); its command string, the files it names
  and the files matched by ``migrate_inputs`` are its inputs (named relative to the project root,
  or by their absolute path when outside it). A command that overruns its timeout
  (``database.build_timeout``) is stopped by escalation: SIGTERM to its process group, a grace
  period, SIGKILL.

Both run as whoever ``target`` names, and the allocator never names a superuser: a template is
built by a login role of its own and a live project database is migrated and seeded as the
project's role (see :mod:`e2e_infra.databases.roles`), so nothing a project planted in its database
(a trigger, a function ahead of pg_catalog's on its ``search_path``) ever runs with more rights
than the project has.

Seeds are named profiles: ``seeds_dir/<profile>/*.sql`` or ``seed_commands.<profile>``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import psycopg
from psycopg import pq, sql

from ..clock import Clock, wait_until
from ..config import NAME_PATTERN, Config, validate_name
from ..conninfo import ConnInfo, mask_secrets
from ..errors import ConfigError, E2EInfraError, MigrationError, SeedProfileNotFoundError
from ..postgres.pgerrors import ErrorContext, Phase, map_errors
from ..processes import KILL, child_environ, escalation, spawn
from ..processes.logs import TAIL_LINES, last_line, open_log

__all__ = [
    "ADMIN_OPTIONS",
    "BOOKKEEPING",
    "LEGACY_BOOKKEEPING",
    "CommandRunner",
    "Runner",
    "SqlDirectoryRunner",
    "admin_options",
    "advisory_lock",
    "bookkeeping_sql",
    "connect",
    "migration_runner",
    "seed_profiles",
    "seed_runner",
]

# The tool's record of applied files: a schema of its own, created and owned by the admin when a
# template is built, where project roles get USAGE and SELECT, INSERT on the table and nothing more
# (no TRIGGER, UPDATE, DELETE, ALTER, DROP: see databases/templates.py). Always schema-qualified.
BOOKKEEPING = ("e2e_infra", "migrations")
# Where templates of format 2 and older kept it (owned by the admin, ALL to the projects' group).
LEGACY_BOOKKEEPING = ("public", "e2e_infra_migrations")
CONNECT_TIMEOUT = 10  # seconds, libpq's own deadline for one connection attempt
# The admin resolves names in pg_catalog only (pg_temp last): a function or operator that a less
# trusted role put in a schema on the search_path never runs with the admin's rights. A startup
# option, so it holds from the first statement and beats ALTER DATABASE / ALTER ROLE ... SET.
ADMIN_OPTIONS = "-c search_path=pg_catalog,pg_temp"
_OUTPUT_TAIL = 2000  # characters of a failed command's output kept in the error
_STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a command that overran its timeout
# The session advisory lock that serialises the appliers of one database's migration table.
_APPLY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"e2e-infra migrations").digest()[:8], "big", signed=True
)


def admin_options(info: ConnInfo) -> str:
    """libpq ``options`` of an admin connection to ``info``: its own, then :data:`ADMIN_OPTIONS`."""
    return f"{info.params.get('options', '')} {ADMIN_OPTIONS}".strip()


def connect(
    info: ConnInfo, *, purpose: str, autocommit: bool = True, admin: bool = False
) -> psycopg.Connection[Any]:
    """Open a connection named ``e2e-infra <purpose>`` (so a leak can be named), or raise
    :class:`ServerUnreachableError` with the masked URL and the fix. ``admin``: the admin's
    connection, its ``search_path`` pinned (:data:`ADMIN_OPTIONS`)."""
    extra = {"options": admin_options(info)} if admin else {}
    with map_errors(ErrorContext(Phase.CONNECT, info)):
        return psycopg.connect(
            info.conninfo(
                application_name=f"e2e-infra {purpose} {os.getpid()}"[:63],
                connect_timeout=CONNECT_TIMEOUT,
                **extra,
            ),
            autocommit=autocommit,
        )


def advisory_lock(
    conn: psycopg.Connection[Any],
    key: int,
    *,
    timeout: float,
    what: str,
    shared: bool = False,
    clock: Clock | None = None,
    hint: str = "",
) -> None:
    """Take session advisory lock ``key`` on ``conn`` (an autocommit connection), polling
    ``pg_try_advisory_lock`` so that the wait has a deadline; DeadlineExceeded names ``what``."""
    function = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
    query = sql.SQL("SELECT {}(%s)").format(sql.Identifier(function))

    def attempt() -> bool:
        row = conn.execute(query, (key,)).fetchone()
        return bool(row and row[0])

    wait_until(attempt, timeout=timeout, what=what, clock=clock, cap=0.05, hint=hint)


class Runner(Protocol):
    """Something that shapes a database: a migration set or a seed profile."""

    description: str

    def inputs(self) -> list[tuple[str, bytes]]:
        """(name, content) pairs that shape the data, for the fingerprint."""
        ...

    def apply(self, target: ConnInfo) -> None:
        """Apply to ``target``; raise MigrationError naming the file and the server's message."""
        ...


class SqlDirectoryRunner:
    """The ``*.sql`` files of one folder, applied in name order, one transaction each."""

    def __init__(
        self,
        directory: Path,
        *,
        record_prefix: str = "",
        what: str = "migration",
        timeout: float = 600.0,
    ) -> None:
        self.directory = Path(directory)
        self.record_prefix = record_prefix  # seeds record as "seed:<profile>/<file>"
        self.what = what
        # database.build_timeout: the wait for another applier of the database, and each
        # statement's statement_timeout (a file waiting on a lock fails instead of hanging).
        self.timeout = timeout
        self.description = f"{what} files in {self.directory}"

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise ConfigError(
                f"the {self.what} folder {self.directory} does not exist; create it or fix "
                f"database.{'migrations_dir' if self.what == 'migration' else 'seeds_dir'}",
                key="database.migrations_dir" if self.what == "migration" else "database.seeds_dir",
            )
        return sorted(p for p in self.directory.iterdir() if p.suffix == ".sql" and p.is_file())

    def inputs(self) -> list[tuple[str, bytes]]:
        return [(self.record_prefix + path.name, path.read_bytes()) for path in self.files()]

    def stamp(self) -> tuple[object, ...]:
        """What identifies :meth:`inputs` without reading them (see :func:`_file_stamp`)."""
        return (
            str(self.directory),
            *(_file_stamp(self.record_prefix + p.name, p) for p in self.files()),
        )

    def apply(self, target: ConnInfo) -> None:
        files = [(self.record_prefix + p.name, p, p.read_bytes()) for p in self.files()]
        with connect(target, purpose=self.what) as conn:
            conn.execute(
                "SELECT pg_catalog.set_config('statement_timeout', %s, false)",
                (f"{max(1, round(self.timeout * 1000))}ms",),
            )
            # A session lock, held until the last file is committed: two appliers of one database
            # (two `db.migrate`, say) take turns, and the second finds everything applied.
            advisory_lock(
                conn,
                _APPLY_LOCK_KEY,
                timeout=self.timeout,
                what=f"the migration lock of database {target.dbname!r} (another process is "
                "applying migrations or seeds to it)",
                hint="raise database.build_timeout (E2E_BUILD_TIMEOUT) if it is slow",
            )
            try:
                self._apply_locked(conn, target, files)
            finally:
                if not conn.closed and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("SELECT pg_advisory_unlock(%s)", (_APPLY_LOCK_KEY,))

    def _apply_locked(
        self,
        conn: psycopg.Connection[Any],
        target: ConnInfo,
        files: list[tuple[str, Path, bytes]],
    ) -> None:
        with conn.transaction():
            table = _bookkeeping(conn)
            rows = conn.execute(sql.SQL("SELECT name, checksum FROM {}").format(table))
            applied = dict(rows.fetchall())
        for name, path, content in files:
            checksum = hashlib.sha256(content).hexdigest()
            if name in applied:
                if applied[name] != checksum:
                    raise MigrationError(
                        f"{self.what} {path} was edited after it was applied to database "
                        f"{target.dbname!r} (checksum differs); restore the file and add a "
                        "new one for the change, or release the database and allocate again",
                        file=str(path),
                        dbname=target.dbname,
                    )
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MigrationError(
                    f"{self.what} {path} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                    "save it as UTF-8",
                    file=str(path),
                    dbname=target.dbname,
                ) from None
            applying = ErrorContext(
                Phase.APPLY, target, file=str(path), what=self.what, statement_timeout=self.timeout
            )
            with map_errors(applying, conn=conn), conn.transaction():
                conn.execute(text.encode("utf-8"))
                conn.execute(
                    sql.SQL("INSERT INTO {} (name, checksum) VALUES (%s, %s)").format(table),
                    (name, checksum),
                )


def bookkeeping_sql() -> sql.Composed:
    """Create the bookkeeping schema and table if missing; every name schema-qualified."""
    schema, table = (sql.Identifier(part) for part in BOOKKEEPING)
    return sql.SQL(
        "CREATE SCHEMA IF NOT EXISTS {schema}; "
        "CREATE TABLE IF NOT EXISTS {schema}.{table} (name pg_catalog.text PRIMARY KEY, "
        "checksum pg_catalog.text NOT NULL, "
        "applied_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now())"
    ).format(schema=schema, table=table)


def _bookkeeping(conn: psycopg.Connection[Any]) -> sql.Identifier:
    """The bookkeeping table of the database ``conn`` is in: the template's (see
    :data:`BOOKKEEPING`), a clone's of an older template (:data:`LEGACY_BOOKKEEPING`), or, in a
    database the tool did not build, one made now by ``conn``'s own role."""
    names = [".".join(parts) for parts in (BOOKKEEPING, LEGACY_BOOKKEEPING)]
    row = conn.execute(
        "SELECT pg_catalog.to_regclass(%s) IS NOT NULL, pg_catalog.to_regclass(%s) IS NOT NULL",
        names,
    ).fetchone()
    current, legacy = row if row is not None else (False, False)
    if legacy and not current:
        return sql.Identifier(*LEGACY_BOOKKEEPING)
    if not current:
        conn.execute(bookkeeping_sql())
    return sql.Identifier(*BOOKKEEPING)


def _expand(command: str) -> list[str]:
    return [sys.executable if part == "{python}" else part for part in shlex.split(command)]


class CommandRunner:
    """An external command run with ``DATABASE_URL`` pointing at the target.

    ``env`` (``database.env``) is added to its environment and hashed into its inputs (a value
    that changes the data makes a new template); ``input_globs`` are ``migrate_inputs``, or a seed
    profile's ``seed_inputs``. ``log``, given the database's name, is where its whole output goes
    (the run's folder: :meth:`~e2e_infra.results.layout.Layout.database_log`); a failure's error
    names that file and its last line, and carries its last lines (``log_tail``).
    """

    def __init__(
        self,
        command: str,
        *,
        cwd: Path,
        input_globs: Sequence[str] = (),
        timeout: float = 600.0,
        what: str = "migrate command",
        stop_grace: float = _STOP_GRACE,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], Path] | None = None,
    ) -> None:
        self.command = command
        self.cwd = Path(cwd)
        self.input_globs = tuple(input_globs)
        self.timeout = timeout
        self.stop_grace = stop_grace  # between SIGTERM and SIGKILL once the timeout has passed
        self.what = what
        self.env = dict(env or {})
        self.log = log
        self.description = f"{what} `{command}`"

    def _input_files(self) -> list[Path]:
        found: set[Path] = set()
        for part in shlex.split(self.command):
            path = self.cwd / part  # an absolute part stays absolute
            if part not in {"{python}", "."} and path.is_file():
                found.add(path)  # a script the command names shapes the data too
        for pattern in self.input_globs:
            # glob.glob, unlike Path.glob, takes absolute patterns too (results stay absolute).
            for match in glob.glob(pattern, root_dir=self.cwd, recursive=True):
                path = self.cwd / match
                if path.is_file():
                    found.add(path)
        return sorted(found)

    def _input_name(self, path: Path) -> str:
        """The name a file is hashed under: relative to ``cwd`` when inside it, else absolute."""
        if path.is_relative_to(self.cwd):
            return path.relative_to(self.cwd).as_posix()
        return path.as_posix()

    def _command_input(self) -> bytes:
        """The command, and its ``env`` when it has one (as before ``env`` existed otherwise, so
        that existing templates keep their fingerprint)."""
        if not self.env:
            return self.command.encode("utf-8")
        env = "\0".join(f"{key}={value}" for key, value in sorted(self.env.items()))
        return f"{self.command}\0env\0{env}".encode()

    def stamp(self) -> tuple[object, ...]:
        """What identifies :meth:`inputs` without reading them (see :func:`_file_stamp`)."""
        files = self._input_files()
        return (self._command_input(), *(_file_stamp(self._input_name(p), p) for p in files))

    def inputs(self) -> list[tuple[str, bytes]]:
        out = [("command", self._command_input())]
        for path in self._input_files():
            out.append((self._input_name(path), path.read_bytes()))
        return out

    def apply(self, target: ConnInfo) -> None:
        secrets = (target.password,) if target.password else ()
        env = {**child_environ(), **self.env, "DATABASE_URL": target.url}
        log_path = self.log(target.dbname) if self.log is not None else None
        # Output goes to a file, not a pipe: a grandchild that keeps the pipe open cannot stall us.
        with self._output(log_path) as output:
            try:
                child = spawn(
                    _expand(self.command),
                    cwd=self.cwd,
                    env=env,
                    log=output,
                    what=f"the {self.what}",
                )
            except OSError as exc:
                raise MigrationError(
                    f"cannot run the {self.what} `{self.command}`: {exc.strerror}; fix the command",
                    file=self.command,
                    dbname=target.dbname,
                ) from None
            try:
                returncode = child.popen.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                # Stopped by escalation: SIGTERM to its process group, a grace, SIGKILL, reap.
                child.stop(escalation(self.stop_grace))
                tail = mask_secrets(_tail(output), secrets)
                raise MigrationError(
                    f"the {self.what} `{self.command}` did not finish within {self.timeout:g}s on "
                    f"database {target.dbname!r} and was stopped (raise database.build_timeout / "
                    f"E2E_BUILD_TIMEOUT if it needs longer){_where(log_path, tail)}",
                    file=self.command,
                    dbname=target.dbname,
                    log_path=str(log_path) if log_path else None,
                    log_tail=tail,
                ) from None
            finally:
                if child.popen.poll() is None:  # another exception (an interrupt): no orphan
                    child.stop(KILL)
            tail = mask_secrets(_tail(output), secrets)
        if returncode != 0:
            raise MigrationError(
                f"the {self.what} `{self.command}` failed with exit code {returncode} on "
                f"database {target.dbname!r}{_where(log_path, tail)}",
                file=self.command,
                dbname=target.dbname,
                log_path=str(log_path) if log_path else None,
                log_tail=tail,
            )

    @staticmethod
    def _output(log_path: Path | None) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Where the command writes: its log in the run's folder (kept, 0600), else a temporary
        file. A log that cannot be made is no reason to fail the build: a temporary file then."""
        if log_path is not None:
            with contextlib.suppress(OSError, E2EInfraError):
                log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                return open_log(log_path, fresh=True, readable=True)
        return tempfile.TemporaryFile()


def _where(log_path: Path | None, tail: str) -> str:
    """``: <its last line>; its whole output: <log>`` for an error line."""
    line = last_line(tail)
    last = f": {line}" if line else " (no output)"
    return f"{last}; its whole output: {log_path}" if log_path is not None else last


def _tail(output: IO[bytes]) -> str:
    """The last lines a command wrote to ``output`` (at most :data:`_OUTPUT_TAIL` characters)."""
    output.flush()
    output.seek(max(output.seek(0, os.SEEK_END) - 4 * _OUTPUT_TAIL, 0))
    text = output.read().decode("utf-8", "replace")[-_OUTPUT_TAIL:]
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def _file_stamp(name: str, path: Path) -> tuple[str, int, int, int, int]:
    """(name, size, mtime, ctime, inode) of an input file: a rewrite, a replace (new inode) or a
    ``touch`` changes it. Not content: callers must not trust a stamp whose times are within a
    timestamp tick of now (a second write in that tick, of the same size, would not show)."""
    st = path.stat()
    return (name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def migration_runner(config: Config) -> Runner:
    """The configured migration runner: ``migrations_dir`` or ``migrate_command``."""
    db = config.database
    if db.migrate_command:
        return CommandRunner(
            db.migrate_command,
            cwd=config.root,
            input_globs=db.migrate_inputs,
            timeout=db.build_timeout,
            env=db.env,
            log=functools.partial(config.layout.database_log, "migrate"),
        )
    if db.migrations_dir is not None:
        return SqlDirectoryRunner(db.migrations_dir, timeout=db.build_timeout)
    raise ConfigError(
        f"no migrations configured: set database.migrations_dir or database.migrate_command in "
        f"{config.source or 'pyproject.toml'}",
        key="database.migrations_dir",
        path=str(config.source) if config.source else None,
    )


def seed_profiles(config: Config) -> list[str]:
    """Every seed profile: sub-folders of ``seeds_dir`` and keys of ``seed_commands``."""
    names = set(config.database.seed_commands)
    seeds_dir = config.database.seeds_dir
    if seeds_dir is not None and seeds_dir.is_dir():
        names.update(
            p.name for p in seeds_dir.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name)
        )
    return sorted(names)


class NoSeed:
    """The default seed of a repository that configures none: adds nothing."""

    description = "no seed (none configured)"

    def inputs(self) -> list[tuple[str, bytes]]:
        return []

    def stamp(self) -> tuple[object, ...]:
        return ()

    def apply(self, target: ConnInfo) -> None:
        return None


def seed_runner(config: Config, profile: str) -> Runner:
    """The runner of seed ``profile``; SeedProfileNotFoundError names the available ones."""
    validate_name(profile, "seed profile")
    db = config.database
    if profile in db.seed_commands:
        return CommandRunner(
            db.seed_commands[profile],
            cwd=config.root,
            input_globs=db.seed_inputs.get(profile, ()),
            what="seed command",
            timeout=db.build_timeout,
            env=db.env,
            log=functools.partial(config.layout.database_log, f"seed-{profile}"),
        )
    if db.seeds_dir is not None and (db.seeds_dir / profile).is_dir():
        return SqlDirectoryRunner(
            db.seeds_dir / profile,
            record_prefix=f"seed:{profile}/",
            what="seed",
            timeout=db.build_timeout,
        )
    if db.seeds_dir is None and not db.seed_commands and profile == db.default_seed:
        return NoSeed()  # a repository without seeds: the migrations alone shape the database
    available = seed_profiles(config)
    where = f"{db.seeds_dir}/{profile}/*.sql" if db.seeds_dir else "database.seeds_dir"
    raise SeedProfileNotFoundError(
        f"seed profile {profile!r} does not exist (available: {', '.join(available) or 'none'}); "
        f"pick one of those, or add {where} or database.seed_commands.{profile}",
        profile=profile,
        available=available,
    )
