"""Cluster folders on disk: who owns each (``owner.json``), which outlived their checkout, purge.

An embedded cluster lives in ``/dev/shm/e2e-infra-pg-<hash>`` or ``/tmp/e2e-infra-pg-<hash>`` (the
hash of its state folder), 46-88 MB each, in memory on tmpfs. Each start records the checkout that
uses it in ``<cluster>/owner.json``; a folder whose checkout (or its config file) is gone and whose
server is not running is an orphan that :func:`remove_orphans` deletes. A folder without the
record is *unknown*: reported, never removed on a guess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ClusterError
from .postmaster import live_postmaster, postgres_processes

__all__ = [
    "OWNER_FILE",
    "SCAN_ROOTS",
    "ClusterFolder",
    "folder_size",
    "purge_folders",
    "read_owner",
    "remove_orphans",
    "scan_cluster_folders",
    "write_owner",
]

log = logging.getLogger("e2e_infra")

OWNER_FILE = "owner.json"
PREFIX = "e2e-infra-pg-"
SCAN_ROOTS = (Path("/dev/shm"), Path("/tmp"))
#: What only a cluster folder of ours holds: a folder with none of these is never removed.
_OURS = ("data", "data.init", "sock", OWNER_FILE, "postgres.log")


def write_owner(cluster_dir: Path, config: Config, socket_dir: Path) -> None:
    """Record who uses ``cluster_dir`` (best effort: a full disk must not stop a start)."""
    record = {
        "tool": "e2e-infra",
        "root": str(config.root),
        "state_dir": str(config.state_dir),
        "config": str(config.source) if config.source else None,
        "socket_dir": str(socket_dir),
        "uid": os.geteuid(),
        "recorded_at": time.time(),
    }
    tmp = cluster_dir / f".{OWNER_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, cluster_dir / OWNER_FILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot record the owner of %s (%s)", cluster_dir, exc.strerror)


def read_owner(cluster_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((cluster_dir / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "e2e-infra" else None


def folder_size(path: Path) -> int:
    """Bytes in files under ``path`` (not following links); 0 when unreadable."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _running(cluster_dir: Path) -> bool:
    """Its postmaster runs (pid file + a live postgres in that folder), or any postgres does."""
    data = cluster_dir / "data"
    return live_postmaster(data) is not None or bool(postgres_processes(data))


@dataclass(frozen=True)
class ClusterFolder:
    path: Path
    state: str  # in use | orphaned | unknown
    running: bool
    size: int
    owner: dict[str, Any] | None
    why: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "state": self.state,
            "running": self.running,
            "size": self.size,
            "root": (self.owner or {}).get("root"),
            "why": self.why,
        }


def _judge(path: Path) -> ClusterFolder:
    owner = read_owner(path)
    running = _running(path)
    size = folder_size(path)
    if owner is None:
        return ClusterFolder(path, "unknown", running, size, None, f"no {OWNER_FILE} in it")
    # The config file, not the state folder: any command recreates a state folder, never a config.
    root = Path(str(owner.get("root")))
    config = Path(str(owner["config"])) if owner.get("config") else None
    if not root.is_dir():
        why = f"its checkout {root} is gone"
    elif config is not None and not config.is_file():
        why = f"its checkout's config {config} is gone"
    else:
        return ClusterFolder(path, "in use", running, size, owner, f"used by {root}")
    return ClusterFolder(path, "orphaned", running, size, owner, why)


def scan_cluster_folders(roots: Iterable[Path] = SCAN_ROOTS) -> list[ClusterFolder]:
    """Every default cluster folder (``e2e-infra-pg-*``) of this user under ``roots``."""
    found = []
    for root in roots:
        with contextlib.suppress(OSError):
            for path in sorted(root.glob(f"{PREFIX}*")):
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        found.append(_judge(path))
    return found


def purge_folders(cluster_dir: Path, socket_dir: Path | None = None) -> list[str]:
    """Remove a stopped cluster's folder (and its socket folder); return what was removed.

    Refuses a running cluster, and a folder that holds nothing a cluster folder holds (a
    ``data_dir`` pointed at the wrong place must not be emptied).
    """
    if _running(cluster_dir):
        raise ClusterError(
            f"the cluster in {cluster_dir} is running; stop it first (`invoke pg.stop`)"
        )
    removed = []
    if cluster_dir.is_dir():
        entries = {entry.name for entry in cluster_dir.iterdir()}
        if entries and not entries & set(_OURS):
            raise ClusterError(
                f"{cluster_dir} does not look like a cluster folder of e2e-infra (no data/ or "
                f"{OWNER_FILE}); remove it by hand if you are sure"
            )
        try:
            shutil.rmtree(cluster_dir)
        except OSError as exc:
            raise ClusterError(
                f"cannot remove {cluster_dir}: {exc.strerror}; remove it by hand"
            ) from None
        removed.append(str(cluster_dir))
    if (
        socket_dir is not None
        and socket_dir.name.startswith("e2e-infra-pgsock-")  # the only kind made outside it
        and socket_dir.is_dir()
    ):
        shutil.rmtree(socket_dir, ignore_errors=True)
        removed.append(str(socket_dir))
    return removed


def remove_orphans(folders: Sequence[ClusterFolder]) -> tuple[list[ClusterFolder], list[str]]:
    """Remove the orphaned folders whose server is not running: (removed, errors)."""
    removed, errors = [], []
    for folder in folders:
        if folder.state != "orphaned" or folder.running:
            continue
        socket = (folder.owner or {}).get("socket_dir")
        try:
            purge_folders(folder.path, Path(socket) if socket else None)
        except ClusterError as exc:
            errors.append(exc.one_line())
            continue
        removed.append(folder)
    return removed, errors
