"""Reading the end of a log: a server's, a command's, the local cluster's; secrets masked."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..conninfo import mask_secrets
from ..files import symlink_error

__all__ = ["TAIL_LINES", "file_size", "log_tail", "open_log", "read_end"]

TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024  # the tail is read from at most this many bytes at the end of the log


def open_log(path: Path, *, fresh: bool = False) -> IO[bytes]:
    """``path`` opened for appending (``fresh``: emptied first), created 0600: a log may hold
    what a process printed of its configuration, so it is the user's alone (its folder is 0700
    too). A symbolic link there is refused, never followed: the tool writes only to files it
    made (:class:`~e2e_infra.errors.FolderError` naming it)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if fresh else 0)
    try:
        return os.fdopen(os.open(path, flags, 0o600), "ab")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_error(path) from None
        raise


def file_size(path: Path) -> int:
    """The size of ``path`` now (0 when it is missing): where a later tail starts."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_end(path: Path, since: int = 0, limit: int = _TAIL_BYTES) -> str:
    """``path`` from byte ``since`` on, at most its last ``limit`` bytes, in whole lines."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(since, size - limit, 0)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return ""
    if start > since:
        # Cut mid-line: drop the partial first line, it could hold half a secret.
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", errors="replace")


def log_tail(
    path: Path, lines: int = TAIL_LINES, secrets: Sequence[str] = (), *, since: int = 0
) -> str:
    """The last ``lines`` lines of the log at ``path`` (from byte ``since`` on), secrets masked.

    Masks the literal ``secrets`` and every URL password / ``password=`` pair; a missing log gives
    an empty string.
    """
    text = read_end(Path(path), since)
    tail = text.splitlines()[-lines:] if lines > 0 else []
    return mask_secrets("\n".join(tail), tuple(secrets))
