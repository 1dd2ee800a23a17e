"""Configuration, read once into frozen dataclasses.

Sources, lowest precedence first:

1. ``[tool.e2e_infra]`` in the root ``pyproject.toml`` (another file with ``E2E_CONFIG``);
2. ``.env`` then ``.env.e2e`` beside it (python-dotenv; only ``E2E_*`` keys are ours);
3. the process environment.

:func:`load_config` is the only place that reads the environment. Unknown keys and bad values raise
:class:`~e2e_infra.errors.ConfigError` naming the key and the file.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..conninfo import ConnInfo
from ..errors import ConfigError, InvalidNameError
from ..results.layout import UP, Layout
from ._parse import (
    NAME_PATTERN,
    _as_auto_bool,
    _as_bool,
    _as_env_table,
    _as_list,
    _as_names,
    _as_number,
    _as_opt_str,
    _as_str,
    _Reader,
    allowed_placeholders,
    check_placeholders,
)
from ._prepare import PrepareConfig, read_prepare
from ._sources import find_config_file, read_env_files, read_toml
from .hostid import default_host_id

__all__ = [
    "NAME_PATTERN",
    "Config",
    "DatabaseConfig",
    "PortRange",
    "PostgresConfig",
    "PrepareConfig",
    "ProjectConfig",
    "ServerConfig",
    "find_config_file",
    "load_config",
    "validate_name",
    "validate_project_name",
]

log = logging.getLogger("e2e_infra")
_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(value: object, kind: str = "project") -> str:
    """Return ``value`` if it is a valid name (``[a-z][a-z0-9_]{0,39}``), else raise."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        shown = repr(value) if not isinstance(value, str) else repr(value[:60])
        raise InvalidNameError(
            f"invalid {kind} name {shown}: use 1-40 characters, a lowercase letter first, "
            "then lowercase letters, digits or '_' (e.g. auth_tests)",
            kind=kind,
            value=value,
        )
    return value


#: Names a project may not take: the embedded cluster's own port lease is filed under "postgres".
RESERVED_PROJECT_NAMES = frozenset({"postgres"})


def validate_project_name(value: object) -> str:
    """A valid project name that is not reserved (see :data:`RESERVED_PROJECT_NAMES`)."""
    name = validate_name(value, "project")
    if name in RESERVED_PROJECT_NAMES:
        raise InvalidNameError(
            f"the project name {name!r} is reserved for the embedded PostgreSQL cluster's own "
            "lease; choose another name",
            kind="project",
            value=value,
        )
    return name


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str, *, key: str = "port_range", path: str | None = None) -> PortRange:
        # [0-9], not \d: \d also matches other scripts' digits (full-width ones read as ASCII).
        match = re.fullmatch(r"\s*([0-9]{1,5})\s*[-:]\s*([0-9]{1,5})\s*", str(text))
        if not match:
            raise ConfigError(
                f"{key} = {text!r} in {path or 'the environment'} is not a range like '3100-5500'",
                key=key,
                path=path,
            )
        low, high = int(match[1]), int(match[2])
        if not 1 <= low <= high <= 65535:
            raise ConfigError(
                f"{key} = {text!r} in {path or 'the environment'}: need 1 <= low <= high <= 65535",
                key=key,
                path=path,
            )
        return cls(low, high)

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True)
class PostgresConfig:
    """The embedded local cluster, used when no admin URL is set."""

    bin_dir: Path | None = None
    data_dir: Path | None = None  # None: chosen by postgres.py (state folder, or /tmp when root)
    user: str | None = None  # the unprivileged user to run as when started by root
    tmpfs: bool | None = None  # the data folder on /dev/shm; None = auto (when it has room)
    startup_timeout: float = 30.0


@dataclass(frozen=True)
class DatabaseConfig:
    admin_url: ConnInfo | None = None
    name_base: str = "e2e_db"
    migrations_dir: Path | None = None
    migrate_command: str | None = None
    migrate_inputs: tuple[str, ...] = ()  # globs hashed into the fingerprint with a command
    seeds_dir: Path | None = None  # one sub-folder of .sql files per profile
    seed_commands: Mapping[str, str] = field(default_factory=dict)  # profile -> command
    seed_inputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # profile -> globs
    env: Mapping[str, str] = field(default_factory=dict)  # of migrate and seed commands
    default_seed: str = "default"
    keep_templates: int = 2  # per seed: the most recently used templates always kept
    template_keep_hours: float = 72.0  # and any template used within this many hours
    max_databases: int = 64  # per host (a shared server counts each host's own)
    server_max_databases: int = 0  # all hosts together on the server; 0 = no such cap
    keep_hours: float = 24.0
    clone_strategy: str = "auto"  # auto | file_copy | wal_log
    clone_timeout: float = 30.0
    spares: int = 0  # warm spare clones kept per template
    # Seconds each migrate and seed (command or files) may take, and a project may wait for
    # another's template build; also every admin statement's statement_timeout.
    build_timeout: float = 600.0


@dataclass(frozen=True)
class ServerConfig:
    name: str
    command: str
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)
    port: str | None = None  # the named port this server listens on
    health: str = ""  # http(s)://... | tcp://host:port | "" (TCP connect on its port)
    startup_timeout: float = 60.0
    stop_timeout: float = 10.0
    depends_on: tuple[str, ...] = ()
    needs_database: bool = False
    restarts: int = 2  # restarts on a fresh port when a foreign process took its port
    listen_socket: bool = False  # hand over an already-bound socket: {fd} in the command
    on_exit: str = "stop"  # when it dies during the suite: "stop" the suite, or "continue"


@dataclass(frozen=True)
class ProjectConfig:
    name: str
    command: str
    cwd: Path
    servers: tuple[str, ...] = ()
    database: bool = True
    seed: str = "default"
    env: Mapping[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    timeout: float = 1800.0
    playwright: bool | None = None  # outputs per run (playwright.py); None: if it runs one
    retries: int = 0  # a project that did not pass runs again (on fresh resources) up to N times


@dataclass(frozen=True)
class Config:
    root: Path
    source: Path | None
    state_dir: Path
    results_dir: Path
    port_range: PortRange = PortRange(3100, 5500)
    port_names: tuple[str, ...] = ("backend", "frontend")
    allow_ephemeral_overlap: bool = False
    lease_ttl: float | None = None  # seconds; None = off (owner proof only)
    lock_timeout: float = 30.0
    host_id: str = field(default_factory=default_host_id)  # see hostid.py
    keep_on_failure: bool = False
    keep_runs: int = 20  # run folders kept in results_dir: the newest N ...
    keep_run_days: float = 0.0  # ... and any younger than this many days (0: age keeps none)
    run_id: str | None = None  # E2E_RUN_ID: groups the leases of one run
    owner_pid: int | None = None  # E2E_OWNER_PID: who owns leases taken by short-lived commands
    database: DatabaseConfig = DatabaseConfig()
    postgres: PostgresConfig = PostgresConfig()
    servers: Mapping[str, ServerConfig] = field(default_factory=dict)
    projects: Mapping[str, ProjectConfig] = field(default_factory=dict)
    prepare: Mapping[str, PrepareConfig] = field(default_factory=dict)  # once per run, in order
    run: str | None = None  # the run whose results this config reads and writes (for_run)

    def for_run(self, run: str) -> Config:
        """This config, its results going to ``<results_dir>/<run>/``: one folder per run (a
        ``nox`` call, an ``e2e.all``), so two runs in one checkout never mix."""
        if _RUN_ID_PATTERN.fullmatch(run) is None:
            raise ConfigError(f"run id {run[:70]!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if run == UP:
            raise ConfigError(f"run id {run!r} is the folder of `invoke e2e.up`; choose another")
        return replace(self, run=run)

    @property
    def layout(self) -> Layout:
        """Every path of this run's results (``<results_dir>/<run>/...``): see :mod:`.layout`."""
        return Layout(self.results_dir, self.run)

    def project(self, name: str) -> ProjectConfig:
        validate_project_name(name)
        try:
            return self.projects[name]
        except KeyError:
            known = ", ".join(sorted(self.projects)) or "none"
            raise ConfigError(
                f"unknown project {name!r}: configured projects are {known} "
                f"(add [tool.e2e_infra.projects.{name}] to {self.source or 'pyproject.toml'})",
                key=f"projects.{name}",
                path=str(self.source) if self.source else None,
            ) from None


# --- reading --------------------------------------------------------------------------------------

# Top-level keys: name -> (environment variable, parser kind)
_TOP_ENV = {
    "state_dir": "E2E_STATE_DIR",
    "results_dir": "E2E_RESULTS_DIR",
    "port_range": "E2E_PORT_RANGE",
    "port_names": "E2E_PORT_NAMES",
    "allow_ephemeral_overlap": "E2E_ALLOW_EPHEMERAL_OVERLAP",
    "lease_ttl": "E2E_LEASE_TTL",
    "lock_timeout": "E2E_LOCK_TIMEOUT",
    "host_id": "E2E_HOST_ID",
    "keep_on_failure": "E2E_KEEP_ON_FAILURE",
    "keep_runs": "E2E_KEEP_RUNS",
    "keep_run_days": "E2E_KEEP_RUN_DAYS",
}
_DB_ENV = {
    "admin_url": "E2E_ADMIN_DATABASE_URL",
    "name_base": "E2E_DB_NAME_BASE",
    "migrations_dir": "E2E_MIGRATIONS_DIR",
    "migrate_command": "E2E_MIGRATE_COMMAND",
    "migrate_inputs": "E2E_MIGRATE_INPUTS",
    "seeds_dir": "E2E_SEEDS_DIR",
    "seed_commands": None,
    "seed_inputs": None,
    "env": None,
    "default_seed": "E2E_DEFAULT_SEED",
    "keep_templates": "E2E_KEEP_TEMPLATES",
    "max_databases": "E2E_MAX_DATABASES",
    "template_keep_hours": "E2E_TEMPLATE_KEEP_HOURS",
    "server_max_databases": "E2E_SERVER_MAX_DATABASES",
    "keep_hours": "E2E_KEEP_HOURS",
    "clone_strategy": "E2E_CLONE_STRATEGY",
    "clone_timeout": "E2E_CLONE_TIMEOUT",
    "spares": "E2E_DB_SPARES",
    "build_timeout": "E2E_BUILD_TIMEOUT",
}
_PG_ENV = {
    "bin_dir": "E2E_PG_BIN_DIR",
    "data_dir": "E2E_PG_DATA_DIR",
    "user": "E2E_PG_USER",
    "tmpfs": "E2E_PG_TMPFS",
    "startup_timeout": "E2E_PG_STARTUP_TIMEOUT",
}
ON_EXIT = ("stop", "continue")  # servers.X.on_exit: what a server's death during the suite does
_SERVER_KEYS = {
    "command",
    "cwd",
    "env",
    "port",
    "health",
    "startup_timeout",
    "stop_timeout",
    "depends_on",
    "needs_database",
    "restarts",
    "listen_socket",
    "on_exit",
}
_PROJECT_KEYS = {
    "command",
    "cwd",
    "servers",
    "database",
    "seed",
    "env",
    "paths",
    "timeout",
    "playwright",
    "retries",
}
# The run id of one nox call, set by the main nox process for its -j workers (cli/sessions.py).
NOX_RUN_ENV = "E2E_NOX_RUN_ID"
_OTHER_ENV = {"E2E_CONFIG", "E2E_RUN_ID", "E2E_SKIP", "E2E_OWNER_PID", "E2E_SUMMARY", NOX_RUN_ENV}

#: Every environment variable the tool reads, for documentation and the unknown-key check.
ENVIRONMENT_VARIABLES = frozenset(
    [v for v in (*_TOP_ENV.values(), *_DB_ENV.values(), *_PG_ENV.values()) if v] + [*_OTHER_ENV]
)


def _check_keys(table: Mapping[str, Any], allowed: set[str], prefix: str, path: str) -> None:
    for key in table:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(
                f"unknown key {prefix}{key} in {path} (known keys: {known})",
                key=f"{prefix}{key}",
                path=path,
            )


def _entry(kind: str, name: str, table: Any, allowed: set[str], path: str) -> _Reader:
    """The reader of one ``[tool.e2e_infra.<kind>.<name>]`` table (a server, a project), its keys
    checked and its ``command`` required."""
    prefix = f"{kind}.{name}."
    if not isinstance(table, dict):
        raise ConfigError(
            f"[tool.e2e_infra.{kind}.{name}] in {path} must be a table", key=prefix, path=path
        )
    _check_keys(table, allowed, prefix, path)
    r = _Reader(table, prefix, path, {}, {}, {})
    if not r.get("command", "", _as_str):
        raise r.error("command", "is required")
    return r


def _resolve(root: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the configuration once. ``environ`` defaults to ``os.environ``."""
    environ = dict(os.environ if environ is None else environ)
    source = path.resolve() if path else find_config_file(environ=environ)
    root = source.parent
    spath = str(source)
    section = read_toml(source)
    env, env_source = read_env_files(root, environ, ENVIRONMENT_VARIABLES)

    _check_keys(
        section, {*_TOP_ENV, "database", "postgres", "servers", "projects", "prepare"}, "", spath
    )
    top = _Reader(section, "", spath, env, _TOP_ENV, env_source)

    def table(name: str) -> dict[str, Any]:
        value = section.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(
                f"[tool.e2e_infra.{name}] in {spath} must be a table", key=name, path=spath
            )
        return value

    db_table = table("database")
    _check_keys(db_table, set(_DB_ENV), "database.", spath)
    db = _Reader(db_table, "database.", spath, env, _DB_ENV, env_source)
    pg_table = table("postgres")
    _check_keys(pg_table, set(_PG_ENV), "postgres.", spath)
    pg = _Reader(pg_table, "postgres.", spath, env, _PG_ENV, env_source)

    port_range = top.get(
        "port_range",
        PortRange(3100, 5500),
        lambda v, e: PortRange.parse(
            _as_str(v, e), key=top._where("port_range")[0], path=top._where("port_range")[1]
        ),
    )
    default_ports: tuple[str, ...] = ("backend", "frontend")
    port_names = top.get("port_names", default_ports, _as_names("port"))
    if not port_names:
        raise top.error("port_names", "needs at least one port name")
    ttl = top.get("lease_ttl", 0.0, _as_number(0))

    admin_text = db.get("admin_url", None, _as_opt_str)
    admin_url = None
    if admin_text:
        where = db._where("admin_url")[0]
        admin_url = ConnInfo.parse(admin_text, source=where)

    seed_commands_raw = db_table.get("seed_commands", {})
    if not isinstance(seed_commands_raw, dict) or not all(
        isinstance(v, str) for v in seed_commands_raw.values()
    ):
        raise db.error("seed_commands", 'expected a table of profile = "command"')
    for profile in seed_commands_raw:
        if NAME_PATTERN.fullmatch(profile) is None:
            raise db.error("seed_commands", f"invalid seed profile name {profile!r}")

    seed_inputs = _read_seed_inputs(db, db_table.get("seed_inputs", {}), seed_commands_raw)
    strategy = db.get("clone_strategy", "auto", _as_str).strip().lower()
    if strategy not in {"auto", "file_copy", "wal_log"}:
        raise db.error("clone_strategy", f"expected auto, file_copy or wal_log, got {strategy!r}")
    name_base = db.get("name_base", "e2e_db", _as_str)
    if re.fullmatch(r"[a-z][a-z0-9_]{0,19}", name_base) is None:
        raise db.error("name_base", f"{name_base!r} must match [a-z][a-z0-9_]{{0,19}}")
    default_seed = db.get("default_seed", "default", _as_str)
    if NAME_PATTERN.fullmatch(default_seed) is None:
        raise db.error("default_seed", f"invalid seed profile name {default_seed!r}")

    def opt_path(reader: _Reader, key: str) -> Path | None:
        text = reader.get(key, None, _as_opt_str)
        return _resolve(root, text) if text else None

    database = DatabaseConfig(
        admin_url=admin_url,
        name_base=name_base,
        migrations_dir=opt_path(db, "migrations_dir"),
        migrate_command=db.get("migrate_command", None, _as_opt_str),
        migrate_inputs=db.get("migrate_inputs", (), _as_list),
        seeds_dir=opt_path(db, "seeds_dir"),
        seed_commands=dict(seed_commands_raw),
        seed_inputs=seed_inputs,
        env=db.get("env", {}, _as_env_table),
        default_seed=default_seed,
        keep_templates=db.get("keep_templates", 2, _as_number(1, integer=True)),
        max_databases=db.get("max_databases", 64, _as_number(1, integer=True)),
        template_keep_hours=db.get("template_keep_hours", 72.0, _as_number(0)),
        server_max_databases=db.get("server_max_databases", 0, _as_number(0, integer=True)),
        keep_hours=db.get("keep_hours", 24.0, _as_number(0)),
        clone_strategy=strategy,
        clone_timeout=db.get("clone_timeout", 30.0, _as_number(0.1)),
        spares=db.get("spares", 0, _as_number(0, integer=True)),
        build_timeout=db.get("build_timeout", 600.0, _as_number(1)),
    )
    postgres = PostgresConfig(
        bin_dir=opt_path(pg, "bin_dir"),
        data_dir=opt_path(pg, "data_dir"),
        user=pg.get("user", None, _as_opt_str),
        tmpfs=pg.get("tmpfs", None, _as_auto_bool),
        startup_timeout=pg.get("startup_timeout", 30.0, _as_number(1)),
    )

    servers = _read_servers(table("servers"), root, spath, port_names)
    projects = _read_projects(table("projects"), root, spath, servers, default_seed, port_names)

    host_id = top.get("host_id", "", _as_str).strip() or default_host_id()
    run_id = env.get("E2E_RUN_ID", "").strip() or None
    if run_id is not None and _RUN_ID_PATTERN.fullmatch(run_id) is None:
        raise ConfigError(
            f"E2E_RUN_ID in {env_source['E2E_RUN_ID']}: {run_id[:70]!r} must be 1-64 letters, "
            "digits, '.', '_' or '-'",
            key="E2E_RUN_ID",
            path=env_source["E2E_RUN_ID"],
        )
    owner_text = env.get("E2E_OWNER_PID", "").strip()
    if owner_text and (not (owner_text.isascii() and owner_text.isdigit()) or int(owner_text) <= 0):
        raise ConfigError(
            f"E2E_OWNER_PID in {env_source['E2E_OWNER_PID']}: {owner_text[:20]!r} is not a "
            "process id; set it to the pid of the process that uses the leases, or unset it",
            key="E2E_OWNER_PID",
            path=env_source["E2E_OWNER_PID"],
        )
    return Config(
        root=root,
        source=source,
        # Not under test-results/: Playwright empties that folder at every start.
        state_dir=_resolve(root, top.get("state_dir", ".e2e-infra", _as_str)),
        results_dir=_resolve(root, top.get("results_dir", "e2e-results", _as_str)),
        port_range=port_range,
        port_names=port_names,
        allow_ephemeral_overlap=top.get("allow_ephemeral_overlap", False, _as_bool),
        lease_ttl=ttl or None,
        lock_timeout=top.get("lock_timeout", 30.0, _as_number(0.1)),
        host_id=host_id,
        keep_on_failure=top.get("keep_on_failure", False, _as_bool),
        keep_runs=top.get("keep_runs", 20, _as_number(1, integer=True)),
        keep_run_days=top.get("keep_run_days", 0.0, _as_number(0)),
        run_id=run_id,
        owner_pid=int(owner_text) if owner_text else None,
        database=database,
        postgres=postgres,
        servers=servers,
        projects=projects,
        prepare=read_prepare(table("prepare"), root, spath),
    )


def _read_seed_inputs(
    db: _Reader, raw: object, commands: Mapping[str, str]
) -> dict[str, tuple[str, ...]]:
    """``seed_inputs = { profile = ["globs"] }``: hashed into that profile's fingerprint only."""
    if not isinstance(raw, dict):
        raise db.error("seed_inputs", 'expected a table of profile = ["glob", ...]')
    out: dict[str, tuple[str, ...]] = {}
    for profile, globs in raw.items():
        if profile not in commands:
            raise db.error(
                "seed_inputs",
                f"profile {profile!r} has no seed command (seed_commands.{profile}); a seeds_dir "
                "profile's .sql files are its inputs already",
            )
        try:
            out[profile] = _as_list(globs, False)
        except TypeError as exc:
            raise db.error("seed_inputs", f"{profile}: {exc}") from None
    return out


def _check_command(reader: _Reader, key: str, command: str) -> str:
    try:
        if not shlex.split(command):
            raise reader.error(key, "the command is empty")
    except ValueError as exc:
        raise reader.error(key, f"cannot split the command: {exc}") from None
    if _names_database_url(command):
        name, where = reader._where(key)
        # A command line is visible to every local user (`ps`): the password would be too.
        log.warning(
            "%s in %s puts {database_url} (and the database password) on the command line, "
            "where any local user can read it; let the process read DATABASE_URL (or PG* "
            "variables set from it in env) instead",
            name,
            where,
        )
    return command


def _names_database_url(command: str) -> bool:
    """Whether ``command`` has a ``{database_url...}`` placeholder (``{{`` is a literal brace)."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(command) if field]
    except ValueError:
        return "{database_url" in command  # a malformed template: rendering reports it
    return any(re.match(r"database_url\b", field) for field in fields)


def _read_servers(
    tables: Mapping[str, Any], root: Path, path: str, port_names: tuple[str, ...]
) -> dict[str, ServerConfig]:
    servers: dict[str, ServerConfig] = {}
    for name, table in tables.items():
        prefix = f"servers.{name}."
        if NAME_PATTERN.fullmatch(name) is None:
            raise ConfigError(f"invalid server name {name!r} in {path}", key=prefix, path=path)
        r = _entry("servers", name, table, _SERVER_KEYS, path)
        command = r.get("command", "", _as_str)
        port = r.get("port", None, _as_opt_str)
        if port is not None and port not in port_names:
            raise r.error("port", f"{port!r} is not one of port_names {list(port_names)}")
        if r.get("listen_socket", False, _as_bool) and port is None:
            raise r.error("listen_socket", 'needs the server\'s port: set port = "<name>"')
        servers[name] = ServerConfig(
            name=name,
            command=_check_command(r, "command", command),
            cwd=_resolve(root, r.get("cwd", ".", _as_str)),
            env=r.get("env", {}, _as_env_table),
            port=port,
            health=r.get("health", "", _as_str),
            startup_timeout=r.get("startup_timeout", 60.0, _as_number(0.1)),
            stop_timeout=r.get("stop_timeout", 10.0, _as_number(0)),
            depends_on=r.get("depends_on", (), _as_names("server")),
            needs_database=r.get("needs_database", False, _as_bool),
            restarts=r.get("restarts", 2, _as_number(0, integer=True)),
            listen_socket=r.get("listen_socket", False, _as_bool),
            on_exit=r.get("on_exit", "stop", _as_str),
        )
        if servers[name].on_exit not in ON_EXIT:
            raise r.error("on_exit", f'must be "stop" or "continue", not {servers[name].on_exit!r}')
    for server in servers.values():
        _check_server_placeholders(server, port_names, path)
        for dep in server.depends_on:
            if dep not in servers:
                raise ConfigError(
                    f"servers.{server.name}.depends_on in {path}: unknown server {dep!r}",
                    key=f"servers.{server.name}.depends_on",
                    path=path,
                )
    _check_acyclic(servers, path)
    return servers


def _check_templates(
    prefix: str, path: str, templates: Mapping[str, str], allowed: tuple[str, ...]
) -> None:
    """Every placeholder of ``templates`` (key -> text) is one of ``allowed``: else ConfigError
    at load, before a run acquires anything."""
    for key, text in templates.items():
        try:
            check_placeholders(text, allowed)
        except ValueError as exc:
            raise ConfigError(
                f"{prefix}{key} in {path}: {exc}", key=f"{prefix}{key}", path=path
            ) from None


def _check_server_placeholders(
    server: ServerConfig, port_names: tuple[str, ...], path: str
) -> None:
    allowed = allowed_placeholders(port_names, "port", *(("fd",) if server.listen_socket else ()))
    templates = {"command": server.command, "health": server.health}
    templates.update({f"env.{key}": value for key, value in server.env.items()})
    _check_templates(f"servers.{server.name}.", path, templates, allowed)


def _check_acyclic(servers: Mapping[str, ServerConfig], path: str) -> None:
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join((*trail, name))
            raise ConfigError(
                f"servers depend on each other in a cycle in {path}: {cycle}",
                key="servers",
                path=path,
            )
        state[name] = 1
        for dep in servers[name].depends_on:
            visit(dep, (*trail, name))
        state[name] = 2

    for name in servers:
        visit(name, ())


def _read_projects(
    tables: Mapping[str, Any],
    root: Path,
    path: str,
    servers: Mapping[str, ServerConfig],
    default_seed: str,
    port_names: tuple[str, ...],
) -> dict[str, ProjectConfig]:
    projects: dict[str, ProjectConfig] = {}
    for name, table in tables.items():
        prefix = f"projects.{name}."
        if NAME_PATTERN.fullmatch(name) is None or name in RESERVED_PROJECT_NAMES:
            shown = name if name.isidentifier() else "..."  # no control characters in messages
            raise ConfigError(
                f"invalid project name {name!r} (projects.{shown}) in {path}: use "
                f"[a-z][a-z0-9_]{{0,39}}, not {', '.join(sorted(RESERVED_PROJECT_NAMES))}",
                key=f"projects.{name}",
                path=path,
            )
        r = _entry("projects", name, table, _PROJECT_KEYS, path)
        command = r.get("command", "", _as_str)
        server_names = r.get("servers", tuple(servers), _as_names("server"))
        for server in server_names:
            if server not in servers:
                raise r.error("servers", f"unknown server {server!r} (known: {sorted(servers)})")
        seed = r.get("seed", default_seed, _as_str)
        if NAME_PATTERN.fullmatch(seed) is None:
            raise r.error("seed", f"invalid seed profile name {seed!r}")
        projects[name] = ProjectConfig(
            name=name,
            command=_check_command(r, "command", command),
            cwd=_resolve(root, r.get("cwd", ".", _as_str)),
            servers=server_names,
            database=r.get("database", True, _as_bool),
            seed=seed,
            env=r.get("env", {}, _as_env_table),
            paths=r.get("paths", (), _as_list),
            timeout=r.get("timeout", 1800.0, _as_number(1)),
            playwright=r.get("playwright", None, _as_auto_bool),
            retries=r.get("retries", 0, _as_number(0, integer=True)),
        )
        project = projects[name]
        templates = {"command": project.command}
        templates.update({f"env.{key}": value for key, value in project.env.items()})
        _check_templates(prefix, path, templates, allowed_placeholders(port_names))
    return projects
