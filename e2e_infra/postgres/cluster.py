"""The local cluster of one state folder: :class:`LocalCluster` (see the package docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import psycopg
from psycopg import sql

from ..clock import Clock, SystemClock, wait_until
from ..config import Config
from ..conninfo import ConnInfo, mask_secrets
from ..errors import (
    BinariesNotFoundError,
    ClusterError,
    DeadlineExceeded,
    LockTimeoutError,
    ServerUnreachableError,
)
from ..files import ensure_private_dir
from ..processes.logs import file_size, log_tail
from ..resources.leases import Lease, Owner, Registry
from ..resources.ports import PortAllocator
from .binaries import CHILD_PATH, PgBinaries, copy_installation, find_binaries
from .folders import purge_folders, write_owner
from .layout import (
    ServerUser,
    check_reachable_by,
    make_private_dir,
    reachable_by,
    read_password,
    resolve_user,
    server_settings,
    short_hash,
    tmpfs_has_room,
    write_as,
    write_new_password,
)
from .pgerrors import ErrorContext, Phase, map_errors
from .postmaster import Postmaster, kill_orphans, live_postmaster, stop_postmaster

__all__ = [
    "APPLICATION_NAME",
    "ClusterStatus",
    "LocalCluster",
    "admin_conninfo",
    "check_reachable",
]

log = logging.getLogger("e2e_infra")

APPLICATION_NAME = "e2e-infra"
SUPERUSER = "postgres"
PORT_PROJECT = "postgres"  # the port lease of the cluster: project "postgres", port name "postgres"
PORT_NAME = "postgres"

_LOCK_FILE = "pg.lock"
_PASSWORD_FILE = "pg-password"
_CONF_FILE = "e2e-infra.conf"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.65535" must fit behind the folder
_START_FIX = (
    "run `invoke pg.start`, or set E2E_ADMIN_DATABASE_URL / [tool.e2e_infra.database] admin_url "
    "to a reachable server"
)


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
        self._user: ServerUser | None = None

    # --- layout ---

    def _choose_cluster_dir(self) -> Path:
        pg = self.config.postgres
        if pg.data_dir is not None:
            return Path(pg.data_dir)
        key = f"{self.state_dir.resolve()}:{os.geteuid()}"
        shm = Path("/dev/shm") / f"e2e-infra-pg-{short_hash(key)}"
        if self._is_root:
            # The state folder is private to root: the server user could not reach it.
            disk = Path("/tmp") / f"e2e-infra-pg-{short_hash(key)}"
        else:
            disk = self.state_dir / "pg"
        if pg.tmpfs is not None:
            return shm if pg.tmpfs else disk
        # auto: keep a cluster where it already is; a new one goes to tmpfs when it has room.
        # Measured here: a template of ~500 files clones in 200-500 ms on ext4, 15-30 ms on tmpfs.
        for candidate in (shm, disk):
            if (candidate / "data" / "PG_VERSION").is_file():
                return candidate
        return shm if tmpfs_has_room(shm.parent) else disk

    def _choose_socket_dir(self) -> Path:
        default = self.cluster_dir / "sock"
        if len(str(default / ".s.PGSQL.65535")) <= _SOCKET_PATH_MAX:
            return default
        key = f"{self.cluster_dir.resolve()}:{os.geteuid()}"
        return Path("/tmp") / f"e2e-infra-pgsock-{short_hash(key)}"

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
        if user.dropped and not reachable_by(found.bin_dir / "postgres", user.uid, user.gid):
            found = self._binaries = copy_installation(found, user)
        return found

    def server_user(self) -> ServerUser:
        if self._user is None:
            self._user = resolve_user(self.config.postgres.user)
        return self._user

    def ensure_running(self) -> ConnInfo:
        """Start the cluster unless it runs; return :meth:`admin_conninfo`. Concurrent-safe.

        A postmaster of ours whose pid file says "ready" (it writes "stopping" once a shutdown
        begins), with its password file in place, is taken at its word: no cluster lock and no
        probe connection. Every project asks this, and the probe was a backend start (~35 ms of
        the server's CPU) only to be closed; the caller's own connection is the probe, and a
        server that stopped answering fails it with the usual "cannot connect" error."""
        pm = live_postmaster(self.data_dir)
        if pm is not None and pm.ready and read_password(self.password_file) is not None:
            self._ensure_port_lease(pm)
            return self.admin_conninfo(pm)
        with self._lock():
            pm = live_postmaster(self.data_dir)
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
            pm = live_postmaster(self.data_dir)
            if pm is None:
                kill_orphans(self.data_dir, clock=self.clock)
                self.ports.release(PORT_PROJECT)
                return False
            self._stop_postmaster(pm.pid)
            kill_orphans(self.data_dir, clock=self.clock)
            self.ports.release(PORT_PROJECT)
            return True

    def purge(self) -> list[str]:
        """Stop the cluster and remove its folder (data, socket, log) and its password: what
        ``pg.stop --purge`` does. Returns the paths removed; idempotent."""
        self.stop()
        with self._lock():  # purge_folders refuses a cluster someone started in between
            removed = purge_folders(self.cluster_dir, self.socket_dir)
            self.password_file.unlink(missing_ok=True)
        return removed

    def status(self) -> ClusterStatus:
        pm = live_postmaster(self.data_dir)
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

    def admin_conninfo(self, pm: Postmaster | None = None) -> ConnInfo:
        """The fast connection for the tool itself: the unix socket when reachable, else TCP
        (``pm``: the postmaster just found, not looked up again)."""
        port = pm.port if pm is not None else self._running_port()
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
            password=read_password(self.password_file),
        )

    def _running_port(self) -> int:
        pm = live_postmaster(self.data_dir)
        if pm is None:
            raise ServerUnreachableError(
                f"the local PostgreSQL cluster in {self.data_dir} is not running; {_START_FIX}",
                url=f"postgresql://{SUPERUSER}@127.0.0.1/postgres",
            )
        return pm.port

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

    def _new_password(self) -> str:
        ensure_private_dir(self.state_dir)
        return write_new_password(self.password_file)

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
                env={"PATH": CHILD_PATH, "LC_ALL": "C", "LANG": "C", "LC_MESSAGES": "C"},
                cwd=self.cluster_dir,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{what} did not finish within {timeout:g}s; see {self.log_file}",
                log_tail=log_tail(self.log_file, 15),
            ) from exc
        except OSError as exc:
            raise ClusterError(f"cannot run {args[0]} for {what}: {exc}") from exc

    # --- helpers: the postmaster ---

    def _answers(self, pm: Postmaster) -> bool:
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

    def _wait_ready(self, pm: Postmaster) -> Postmaster:
        def check() -> Postmaster | None:
            current = live_postmaster(self.data_dir)
            if current is None:
                raise ClusterError(
                    f"the local PostgreSQL server (pid {pm.pid}) exited while starting; "
                    f"see {self.log_file}",
                    log_tail=log_tail(self.log_file, 15),
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
            raise ClusterError(str(exc), log_tail=log_tail(self.log_file, 15)) from None

    def _stop_postmaster(self, pid: int) -> None:
        """Fast shutdown, then immediate, then SIGKILL; each with a deadline."""
        stop_postmaster(pid, fast=min(self.config.postgres.startup_timeout, 15.0), clock=self.clock)

    # --- starting ---

    def _start_locked(self) -> None:
        binaries = self.runnable_binaries()
        user = self.server_user()
        if user.dropped:
            log.info(
                "running PostgreSQL as user %s because e2e-infra was started as root", user.name
            )
        check_reachable_by(user, self.cluster_dir)
        make_private_dir(user, self.cluster_dir)
        make_private_dir(user, self.socket_dir)
        write_owner(self.cluster_dir, self.config, self.socket_dir)
        kill_orphans(self.data_dir, clock=self.clock)
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
                pm = Postmaster(pid=pid, port=port, ready=True)
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
        write_as(self.server_user(), pwfile, password + "\n")
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

    def _start_postmaster(self, binaries: PgBinaries, port: int) -> int:
        settings = server_settings(port, self.socket_dir)
        write_as(self.server_user(), self.data_dir / _CONF_FILE, settings)
        timeout = self.config.postgres.startup_timeout
        log_offset = file_size(self.log_file)
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
        pm = live_postmaster(self.data_dir)
        if result.returncode != 0 or pm is None or not pm.ready:
            if pm is not None:
                self._stop_postmaster(pm.pid)
            tail = log_tail(self.log_file, 15, since=log_offset)
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

    def _ensure_port_lease(self, pm: Postmaster) -> None:
        """A running cluster whose lease went missing (registry reset) gets it back."""
        with self.registry.transaction() as txn:
            for lease in txn.find("port", project=PORT_PROJECT, resource=str(pm.port)):
                if lease.owner.pid == pm.pid and lease.owner.is_alive():
                    return
        self._hand_lease_to(pm.pid, pm.port)

    def _ensure_password(self, pm: Postmaster) -> None:
        """The password file is gone (state folder wiped) but the cluster lives: set a new one."""
        if read_password(self.password_file) is not None:
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


def check_reachable(info: ConnInfo, timeout: float = 5.0, *, external: bool | None = None) -> None:
    """Connect and ``SELECT 1``; raise :class:`ServerUnreachableError` naming the masked URL and
    the fix (through :mod:`e2e_infra.postgres.pgerrors`' table; ``external``: the user's own
    server, whose fix is never ``invoke pg.start``)."""
    target = (
        info
        if "application_name" in info.params
        else info.with_params(application_name=APPLICATION_NAME)
    )
    with (
        map_errors(ErrorContext(Phase.CONNECT, info, external=external)),
        psycopg.connect(
            target.conninfo(connect_timeout=max(2, math.ceil(timeout))), autocommit=True
        ) as conn,
    ):
        conn.execute("SELECT 1")
