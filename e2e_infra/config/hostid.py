"""This host's default id: what tells it apart from every other host sharing a server.

The hostname alone collides: CI containers on the host network share it, and two pid namespaces
on one machine make each other's pids look dead. So the default id is the hostname plus a short
hash of the machine's identity (``/etc/machine-id``, else the boot id) and of this process's pid
namespace (the inode of ``/proc/self/ns/pid``): two processes get the same default id only when
they can see each other's pids. ``host_id`` (``E2E_HOST_ID``) overrides it.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

__all__ = ["default_host_id", "host_identity"]

_MACHINE_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/random/boot_id")


def host_identity(root: Path = Path("/")) -> tuple[str, str]:
    """(machine or boot id, pid namespace id) of this process; empty strings when unknown."""
    machine = ""
    for name in _MACHINE_FILES:
        try:
            machine = (root / name.lstrip("/")).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if machine:
            break
    try:
        namespace = str(os.stat(root / "proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return machine, namespace


def default_host_id(hostname: str | None = None, identity: tuple[str, str] | None = None) -> str:
    """``<hostname>-<8 hex digits>``: the hostname, told apart by :func:`host_identity`."""
    name = hostname if hostname is not None else socket.gethostname()
    machine, namespace = identity if identity is not None else host_identity()
    digest = hashlib.sha256(f"{machine}\0{namespace}".encode()).hexdigest()[:8]
    return f"{name or 'host'}-{digest}"
