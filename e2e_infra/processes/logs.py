"""Log files: reading the end of one (a server's, a command's, the local cluster's; secrets
masked), and :class:`Tee`, a child's console output shown and kept at once."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..conninfo import mask_secrets
from ..files import symlink_error

__all__ = ["TAIL_LINES", "Tee", "file_size", "last_line", "log_tail", "open_log", "read_end"]

TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024  # the tail is read from at most this many bytes at the end of the log


def open_log(path: Path, *, fresh: bool = False, readable: bool = False) -> IO[bytes]:
    """``path`` opened for appending (``fresh``: emptied first; ``readable``: also for reading
    back), created 0600: a log may hold what a process printed of its configuration, so it is
    the user's alone (its folder is 0700 too). A symbolic link there is refused, never followed:
    the tool writes only to files it made (:class:`~e2e_infra.errors.FolderError` naming it)."""
    flags = os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if fresh else 0)
    flags |= os.O_RDWR if readable else os.O_WRONLY
    try:
        return os.fdopen(os.open(path, flags, 0o600), "a+b" if readable else "ab")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_error(path) from None
        raise


# What a package manager adds after the command it ran failed: its own summary, not the cause.
_WRAPPER_LINES = re.compile(r"^\s*(npm error|npm ERR!|ERR_PNPM|ELIFECYCLE|error Command failed)")


def last_line(text: str, limit: int = 300) -> str:
    """The line of a failed command's output that says why: its last non-blank one, skipping
    the summary npm, pnpm or yarn print after a script failed (``npm error command sh -c ...``)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    own = [line for line in lines if not _WRAPPER_LINES.match(line)]
    chosen = (own or lines or [""])[-1]
    return chosen if len(chosen) <= limit else chosen[: limit - 1] + "…"


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


class Tee:
    """A child's console output, shown as it comes and kept: a pipe whose reader (a thread)
    copies every chunk to the file descriptor ``show`` (default 1: our stdout, where the child's
    output went before) and to the log at ``path``. Give :attr:`fd` as the child's stdout (and
    stderr), call :meth:`started` once it is spawned, :meth:`join` once it ended. A write that
    fails is dropped, never raised: a closed terminal stops the showing, a full disk the keeping
    (the run's record says what the disk refused), and the child's output keeps flowing."""

    def __init__(self, path: Path, show: int = 1) -> None:
        self.path = path
        self.show = show
        self._log: IO[bytes] | None
        try:
            self._log = open_log(path, fresh=True)
        except OSError:  # a full disk: shown, not kept (a link there is refused, as FolderError)
            self._log = None
        self._read, self.fd = os.pipe()
        self._thread: threading.Thread | None = None

    def started(self) -> None:
        """The child holds the pipe now: close our end of it and start copying."""
        os.close(self.fd)
        self._thread = threading.Thread(target=self._copy, name="e2e-infra tee", daemon=True)
        self._thread.start()

    def _keep(self, chunk: bytes) -> None:
        if self._log is None:
            return
        try:
            self._log.write(chunk)
            self._log.flush()
        except OSError:
            self._close_log()

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()

    def _copy(self) -> None:
        try:
            while chunk := os.read(self._read, 65536):
                self._keep(chunk)
                with contextlib.suppress(OSError):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self.show, view) :]
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(self._read)
            self._close_log()

    def join(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout``) for the end of the output: every writer of the pipe gone.
        A leftover that still holds it keeps the thread (a daemon) until it ends."""
        if self._thread is None:  # never started: the child could not be spawned
            with contextlib.suppress(OSError):
                os.close(self.fd)
            with contextlib.suppress(OSError):
                os.close(self._read)
            self._close_log()
            return
        self._thread.join(timeout)
