"""Recorded durations: how long each project's suite takes, kept across runs.

Every finished project (passed or failed) appends its duration to ``<results_dir>/durations.json``
(:func:`record_duration`; ``invoke e2e.all`` records its projects together when they are done,
:func:`record_durations`), which keeps the last :data:`KEEP_DURATIONS` per project, merged under a
lock and replaced atomically, so concurrent projects and CI shards never lose each other's
entries. A project's planning duration is the median of its entries; a project with none falls
back to its newest ``run.json``. CI shards (:mod:`e2e_infra.plan.matrix`) and the order a run
starts its projects in read them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .layout import DURATIONS

if TYPE_CHECKING:  # a Config hands out its layout; this module needs nothing else of it
    from ..config import Config

__all__ = [
    "KEEP_DURATIONS",
    "durations_for_plan",
    "last_durations",
    "locked",
    "longest_first",
    "merge_durations",
    "merge_shard_results",
    "read_durations",
    "record_duration",
    "record_durations",
    "write_json",
]

log = logging.getLogger("e2e_infra")

KEEP_DURATIONS = 5  # per project: the median of the last few shrugs off one slow run
_LOCK_TIMEOUT = 30.0  # seconds; the lock is held for one small read and write
_VERSION = 1


def _durations_path(config: Config) -> Path:
    return config.layout.durations


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock of the JSON file ``path`` (a hidden file beside it) meanwhile."""
    # A hidden lock file next to the data: CI artifact uploads leave hidden files out.
    import filelock  # here: reading the durations (every nox -j worker does) needs no lock

    lock = filelock.FileLock(str(path.with_name(f".{path.name}.lock")), timeout=_LOCK_TIMEOUT)
    with lock:
        yield


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` atomically (a temporary file beside it, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            # json.dumps, compact: only a one-shot encode without indent takes the C encoder
            # (json.dump and indent take the pure-Python one, ~10x the CPU), and every session
            # rewrites the whole file: ~8 ms per project at 100 projects.
            handle.write(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


Entries = dict[str, list[tuple[float, float]]]  # project -> [(finished at, seconds)], oldest first


def _load_entries(path: Path) -> Entries:
    """The entries of a durations file; a missing one is empty, a broken one warns and is empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # none yet (or no results folder at all)
        return {}
    except (OSError, ValueError) as exc:
        log.warning("durations file %s is unreadable (%s): planning without it", path, exc)
        return {}
    entries: Entries = {}
    projects = data.get("projects") if isinstance(data, dict) else None
    if not isinstance(projects, dict):
        log.warning("durations file %s has no 'projects' map: planning without it", path)
        return {}
    for project, items in projects.items():
        if not isinstance(items, list):
            continue
        good = []
        for item in items:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                at, seconds = float(item["at"]), float(item["seconds"])
                if math.isfinite(at) and math.isfinite(seconds) and seconds > 0:
                    good.append((at, seconds))
        if good:
            entries[str(project)] = good
    return entries


def _merged(*sources: Entries) -> Entries:
    # A union by (time, seconds): merging the same file twice, or in any order, gives one result.
    out: Entries = {}
    for source in sources:
        for project, items in source.items():
            out[project] = sorted(set(out.get(project, [])) | set(items))[-KEEP_DURATIONS:]
    return out


def _update(config: Config, extra: Entries) -> None:
    path = _durations_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        merged = _merged(_load_entries(path), extra)
        write_json(
            path,
            {
                "version": _VERSION,
                "projects": {
                    p: [{"at": at, "seconds": round(s, 3)} for at, s in items]
                    for p, items in sorted(merged.items())
                },
            },
        )


def record_duration(
    config: Config, project: str, seconds: float, *, at: float | None = None
) -> bool:
    """Add one finished run of ``project`` to the durations file; False (and a warning) if not.

    Durations are only a hint for planning: failing to record one never fails the run.
    """
    return record_durations(config, {project: seconds}, at=at)


def record_durations(
    config: Config, durations: Mapping[str, float], *, at: float | None = None
) -> bool:
    """Add a finished run of each project to the durations file in one update (a batch records
    its projects together: every update reads and rewrites the whole file under its lock)."""
    when = time.time() if at is None else at
    extra = {
        project: [(when, float(seconds))]
        for project, seconds in durations.items()
        if math.isfinite(seconds) and seconds > 0
    }
    if not extra:
        return False
    from filelock import Timeout as LockTimeout

    try:
        _update(config, extra)
    except (OSError, LockTimeout) as exc:
        path = _durations_path(config)
        log.warning("could not record the duration of %s in %s: %s", ", ".join(extra), path, exc)
        return False
    return True


def merge_durations(config: Config, files: Iterable[str | Path]) -> None:
    """Merge other durations files (e.g. one per CI shard) into this config's; missing ones skipped.

    Each project keeps its newest :data:`KEEP_DURATIONS` entries of all files together.
    """
    extra: Entries = {}
    for file in files:
        if Path(file).is_file():
            extra = _merged(extra, _load_entries(Path(file)))
    _update(config, extra)


def merge_shard_results(config: Config, folders: Iterable[str | Path]) -> list[Path]:
    """Copy each CI shard's downloaded results folder into this config's, merging the durations.

    Every file but a folder's top-level durations file is copied as it is (a shard's runs live
    under their own run id, so they do not collide); the durations files are merged, not
    overwritten. Returns the folders merged.
    """
    merged = [Path(folder) for folder in folders if Path(folder).is_dir()]
    config.results_dir.mkdir(parents=True, exist_ok=True)
    for folder in merged:
        shutil.copytree(
            folder,
            config.results_dir,
            dirs_exist_ok=True,
            ignore=lambda where, names, top=folder: [
                n for n in names if n.startswith(".") or (Path(where) == top and n == DURATIONS)
            ],
        )
    merge_durations(config, [folder / DURATIONS for folder in merged])
    return merged


def read_durations(config: Config) -> dict[str, float]:
    """Each recorded project's planning duration: the median of its last recorded runs."""
    return {
        project: statistics.median(s for _, s in items)
        for project, items in _load_entries(_durations_path(config)).items()
    }


def last_durations(config: Config, projects: Iterable[str] | None = None) -> dict[str, float]:
    """The duration of each project's latest recorded run (``run.json``); unknown ones left out."""
    latest: dict[str, tuple[float, float]] = {}
    for run in config.layout.collect(projects if projects is not None else config.projects):
        if run.duration <= 0 or not run.result.timed:
            continue  # an interrupted or broken run says little about how long the suite takes
        if run.project not in latest or run.started_at > latest[run.project][0]:
            latest[run.project] = (run.started_at, run.duration)
    return {project: duration for project, (_, duration) in latest.items()}


def durations_for_plan(config: Config, projects: Sequence[str]) -> dict[str, float]:
    """The durations file's figure per project, else its newest ``run.json``'s; unknown left out."""
    recorded = read_durations(config)
    missing = [p for p in projects if p not in recorded]
    fallback = last_durations(config, missing) if missing else {}
    known = {**fallback, **recorded}
    return {p: known[p] for p in projects if p in known}


def longest_first(
    config: Config, projects: Sequence[str], *, run_records: bool = True
) -> list[str]:
    """``projects`` in the order to start them: the ones with no recorded duration first (a
    project never timed may be the longest), then by decreasing recorded duration (the
    durations file, else with ``run_records`` the newest ``run.json``); ties keep the given
    order. Starting the longest first keeps lanes from sitting idle at the end of a run."""
    wanted = list(dict.fromkeys(projects))
    if run_records:
        known = durations_for_plan(config, wanted)
    else:
        known = {p: s for p, s in read_durations(config).items() if p in set(wanted)}
    place = {project: number for number, project in enumerate(wanted)}
    return sorted(wanted, key=lambda p: (p in known, -known.get(p, 0.0), place[p]))
