"""How many run folders the results folder keeps: the newest ``keep_runs``, and any younger than
``keep_run_days`` days; never the current run, nor one that is still running.

:func:`prune_runs` runs after every run (``invoke e2e.all``, ``e2e.run``, a nox call's summary)
and from ``invoke e2e.cleanup``. A run still running is one with a project whose ``status.json``
says it has not finished and whose process (pid and start time) is alive: its folder may be old
(a long run) but is never removed under it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..config import Config
from ..resources.leases import process_state
from ..results.layout import Layout
from .progress import read_status

__all__ = ["live", "prune_runs"]

log = logging.getLogger("e2e_infra")

_DAY = 86400.0


def live(folder: Path) -> bool:
    """Whether a project of the run in ``folder`` is still running (its process proven alive)."""
    for status_file in Layout.statuses_in(folder):
        status = read_status(status_file)
        if not status or status.get("done"):
            continue
        try:
            pid, start = int(status["pid"]), float(status["pid_start"])
        except (KeyError, TypeError, ValueError):
            return True  # cannot prove it ended: keep it
        if process_state(pid, start) in ("alive", "unknown"):
            return True
    return False


def prune_runs(config: Config, *, now: float | None = None) -> list[Path]:
    """Remove the run folders beyond the retention; return them (oldest first)."""
    layout = config.layout
    now = time.time() if now is None else now
    folders = layout.run_folders()  # oldest first
    keep = set(folders[-config.keep_runs :]) if config.keep_runs > 0 else set()
    removed = []
    for folder in folders:
        if folder in keep or folder.name == layout.run:
            continue
        try:
            age = now - folder.stat().st_mtime
        except OSError:
            continue
        if age < config.keep_run_days * _DAY or live(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    if removed:
        log.info(
            "removed %d old run folder(s) of %s (keep_runs = %d, keep_run_days = %g)",
            len(removed),
            layout.results_dir,
            config.keep_runs,
            config.keep_run_days,
        )
    return removed
