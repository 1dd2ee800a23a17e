"""The tool's own folders and files: made private, checked writable, never through a link.

A file-system failure anywhere the tool keeps state or results is one line naming the path, why
(read-only, full, permission) and the setting to change (:func:`folder_error`). Where the tool
makes a file or folder of its own it refuses a symbolic link rather than follow it
(:func:`symlink_error`): a link planted there would send its writes (and a ``chmod``) elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import stat
import tempfile
from pathlib import Path

from .errors import FolderError

__all__ = [
    "RESULTS_SETTING",
    "STATE_SETTING",
    "check_writable",
    "ensure_private_dir",
    "folder_error",
    "symlink_error",
]

log = logging.getLogger("e2e_infra")


def ensure_private_dir(path: Path) -> Path:
    """Make ``path`` (and parents) if missing: private to this user (0700) and ignoring itself
    (a ``.gitignore`` of ``*``, as ``.pytest_cache`` does), so no checkout commits it.

    An existing folder's mode is left as it is: a shared 1777 folder given as ``E2E_STATE_DIR``
    stays shared (a group- or world-writable one without the sticky bit gets a warning). A path
    that cannot be a folder is one :class:`FolderError` naming it and the fix.
    """
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise FolderError(
                f"{path} exists and is not a folder; point E2E_STATE_DIR (state_dir) elsewhere "
                "or remove it",
                path=str(path),
            ) from None
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode
            if mode & 0o022 and not mode & stat.S_ISVTX:
                log.warning(
                    "%s is writable by other users and not sticky: anyone there can change the "
                    "tool's leases; chmod 700 it or choose another state_dir",
                    path,
                )
        return path
    except OSError as exc:
        raise FolderError(
            f"cannot create the folder {path} ({exc.strerror}); point E2E_STATE_DIR (state_dir) "
            "at a writable place",
            path=str(path),
        ) from None
    with contextlib.suppress(OSError):
        (path / ".gitignore").write_text("# made by e2e-infra: ignore this folder\n*\n")
    return path


#: Where each folder is configured, for the fix in a folder error.
STATE_SETTING = "E2E_STATE_DIR (state_dir)"
RESULTS_SETTING = "E2E_RESULTS_DIR (results_dir)"

_WHY = {
    errno.EROFS: "it is on a read-only file system",
    errno.ENOSPC: "no space is left on its device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENOENT: "it does not exist",
}


def folder_error(
    path: Path, exc: OSError, *, setting: str = STATE_SETTING, what: str = "write to"
) -> FolderError:
    """One line for a file-system error at ``path``: what failed, why, and the fix."""
    why = _WHY.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space there, or point {setting} at another folder"
    elif exc.errno == errno.EROFS:
        fix = f"point {setting} at a folder on a writable file system"
    else:
        fix = f"point {setting} at a writable folder, or fix {path}'s permissions"
    return FolderError(f"cannot {what} {path} ({why}); {fix}", path=str(path))


def check_writable(path: Path, *, setting: str = STATE_SETTING) -> Path:
    """Raise :class:`FolderError` unless a file can be created in the folder ``path``.

    Run before anything is acquired, so a read-only or missing folder fails the run up front
    rather than half way (a full disk can still fill up later: writes map their errors too).
    """
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".e2e-infra-probe-"):
            pass
    except OSError as exc:
        raise folder_error(path, exc, setting=setting) from None
    return path


def symlink_error(path: Path, setting: str | None = None) -> FolderError:
    """The one line for a symbolic link where the tool makes a file or folder of its own."""
    where = f", or point {setting} elsewhere" if setting else ""
    return FolderError(
        f"{path} is a symbolic link; e2e-infra writes only to files and folders it made "
        f"itself: remove the link{where}",
        path=str(path),
    )
