"""Who runs the local PostgreSQL server, and the folders and files it gets (settings, password).

When e2e-infra runs as root the server runs as an unprivileged :class:`ServerUser`
(``postgres.user``, else ``postgres``, else ``nobody``): PostgreSQL refuses to run as root. Folders
made for it are created 0700 and owned by it; folders that already exist are checked, never
chmodded, and every parent of the cluster folder must let it through.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import pwd
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClusterError

__all__ = [
    "ServerUser",
    "check_reachable_by",
    "make_private_dir",
    "owned_privately",
    "reachable_by",
    "read_password",
    "resolve_user",
    "server_settings",
    "short_hash",
    "tmpfs_has_room",
    "write_as",
    "write_new_password",
]


@dataclass(frozen=True)
class ServerUser:
    name: str
    uid: int
    gid: int
    dropped: bool  # True when we are root and run the server as this user


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def resolve_user(wanted: str | None) -> ServerUser:
    """The user the server runs as: ourselves, or when we are root ``wanted`` (else a default)."""
    if os.geteuid() != 0:
        try:
            name = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            name = getpass.getuser()
        return ServerUser(name=name, uid=os.geteuid(), gid=os.getegid(), dropped=False)
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
        return ServerUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, dropped=True)
    if wanted:
        raise ClusterError(
            f"postgres.user = {wanted} does not exist; create it (`useradd --system {wanted}`) "
            "or set [tool.e2e_infra.postgres] user / E2E_PG_USER to an existing user"
        )
    raise ClusterError(
        "e2e-infra runs as root and found neither a 'postgres' nor a 'nobody' user to run "
        "PostgreSQL as; set [tool.e2e_infra.postgres] user / E2E_PG_USER"
    )


def reachable_by(path: Path, uid: int, gid: int) -> bool:
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


def check_reachable_by(user: ServerUser, cluster_dir: Path) -> None:
    """The server user must be able to traverse every parent; we never chmod one to help."""
    if not user.dropped:
        return
    for parent in cluster_dir.resolve().parents:
        st = parent.stat()
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == user.gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise ClusterError(
                f"the PostgreSQL server user {user.name} cannot reach {cluster_dir}: "
                f"{parent} (mode {stat.S_IMODE(st.st_mode):04o}) is closed to it; set "
                "[tool.e2e_infra.postgres] data_dir to a folder it can reach (the default "
                "when root is /tmp/e2e-infra-pg-<hash>)"
            )


def make_private_dir(user: ServerUser, path: Path) -> None:
    """Create ``path`` 0700 owned by ``user``; check (never chmod) an existing one."""
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


def write_as(user: ServerUser, path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``path`` atomically, owned by ``user``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    if user.dropped:
        os.chown(tmp, user.uid, user.gid)
    os.replace(tmp, path)


def owned_privately(path: Path) -> bool:
    st = path.lstat()
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def tmpfs_has_room(folder: Path, need: int = 1 << 30) -> bool:
    """A writable tmpfs folder with at least ``need`` bytes free (1 GiB: room for many clones)."""
    try:
        return (
            folder.is_dir()
            and os.access(folder, os.W_OK)
            and shutil.disk_usage(folder).free >= need
        )
    except OSError:
        return False


def read_password(path: Path) -> str | None:
    """The cluster's TCP password from ``path``, None when there is none."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def write_new_password(path: Path) -> str:
    """A new random password, written atomically to ``path`` (0600); returned."""
    password = secrets.token_urlsafe(24)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(password + "\n")
    os.replace(tmp, path)
    return password


def server_settings(port: int, socket_dir: Path) -> str:
    """The ``e2e-infra.conf`` PostgreSQL includes, rewritten before each start."""

    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    settings = {
        "listen_addresses": quoted("127.0.0.1"),
        "port": str(port),
        "unix_socket_directories": quoted(str(socket_dir)),
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
