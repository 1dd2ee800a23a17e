"""Spread the projects over CI shards by their recorded durations.

Longest processing time first (LPT): sort the projects by duration, longest first, and give each to
the shard with the least work so far. Projects never run before get the median of the known
durations (or :data:`DEFAULT_DURATION` when none is known); ties are broken by name.

Where the durations come from: every finished project (passed or failed) appends its duration to
``<results_dir>/durations.json`` (:func:`record_duration`; ``invoke e2e.all`` records its projects
together when they are done, :func:`record_durations`), which keeps the last
:data:`KEEP_DURATIONS` per project, merged under a lock and replaced atomically, so concurrent
projects and shards never lose each other's entries. A project's planning duration is the median of
its entries; a project with none falls back to its newest ``run.json``.

Who plans: in CI, one job plans (``invoke e2e.matrix --json``) and hands every shard its explicit
project list (``invoke e2e.all --projects a,b``), so nothing a shard records or fails to download
can change what it runs. Locally, ``invoke e2e.all --shard i/N`` follows the plan saved in the state
folder by ``e2e.matrix`` or by the first ``--shard`` of a round, so shards run one after another in
one checkout do not re-plan from the durations the earlier shards just recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from .config import Config
from .errors import UsageError
from .layout import DURATIONS
from .leases import ensure_private_dir
from .report import collect_runs

__all__ = [
    "DEFAULT_DURATION",
    "KEEP_DURATIONS",
    "Shard",
    "durations_for_plan",
    "last_durations",
    "merge_durations",
    "merge_shard_results",
    "parse_projects",
    "parse_shard",
    "plan_shards",
    "read_durations",
    "record_duration",
    "record_durations",
    "save_plan",
    "shard_projects",
]

log = logging.getLogger("e2e_infra")

DEFAULT_DURATION = 60.0  # seconds, when no project has a recorded duration yet
KEEP_DURATIONS = 5  # per project: the median of the last few shrugs off one slow run
PLAN_FILE = "shard-plan.json"  # in the state folder: the plan `e2e.all --shard` follows
_LOCK_TIMEOUT = 30.0  # seconds; the lock is held for one small read and write
_VERSION = 1


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    total: int
    projects: tuple[str, ...]
    estimate: float  # seconds: the sum of its projects' (known or assumed) durations

    @property
    def label(self) -> str:
        return f"{self.index}/{self.total}"

    def to_json(self) -> dict[str, Any]:
        # The shape of one entry of a GitHub Actions matrix "include" list.
        return {
            "shard": self.label,
            "index": self.index,
            "total": self.total,
            "projects": ",".join(self.projects),
            "estimate_seconds": round(self.estimate, 1),
        }


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/3"`` -> ``(2, 3)``; refuse anything but ``1 <= i <= N``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard must look like i/N with 1 <= i <= N (e.g. 2/3), got {text!r}")
    return int(match[1]), int(match[2])


def parse_projects(text: str) -> list[str]:
    """``"a, b,a"`` -> ``["a", "b"]``; an explicitly given empty list is an error, not "all".

    A CI shard passes its matrix entry's list: an empty one means the plan and the job disagree,
    and running everything (or nothing, quietly) would hide it.
    """
    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise UsageError(
            f"--projects {text!r} names no project: give a comma-separated list (e.g. "
            "--projects auth_tests,inventory), or leave --projects out to run every project"
        )
    return names


# --- recorded durations ---------------------------------------------------------------------------


def _durations_path(config: Config) -> Path:
    return config.layout.durations


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A hidden lock file next to the data: CI artifact uploads leave hidden files out.
    lock = filelock.FileLock(str(path.with_name(f".{path.name}.lock")), timeout=_LOCK_TIMEOUT)
    with lock:
        yield


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
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
    except FileNotFoundError:
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
    with _locked(path):
        merged = _merged(_load_entries(path), extra)
        _write_json(
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
    try:
        _update(config, extra)
    except (OSError, filelock.Timeout) as exc:
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
    for run in collect_runs(config, projects=projects):
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


# --- planning ---------------------------------------------------------------------------------


def plan_shards(
    projects: Sequence[str],
    durations: Mapping[str, float],
    shards: int,
    *,
    default: float = DEFAULT_DURATION,
) -> list[Shard]:
    """Every project in exactly one of ``shards`` shards, balanced by LPT.

    There are always ``shards`` shards (some empty when there are fewer projects); a CI matrix
    leaves the empty ones out, since a shard given no project list is an error.
    """
    if shards < 1:
        raise UsageError(f"--shards must be at least 1, got {shards}")
    names = sorted(set(projects))
    known = [durations[p] for p in names if p in durations and durations[p] > 0]
    assumed = statistics.median(known) if known else default
    cost = {p: durations[p] if durations.get(p, 0) > 0 else assumed for p in names}
    loads = [0.0] * shards
    members: list[list[str]] = [[] for _ in range(shards)]
    for project in sorted(names, key=lambda p: (-cost[p], p)):
        target = min(range(shards), key=lambda i: (loads[i], len(members[i]), i))
        members[target].append(project)
        loads[target] += cost[project]
    order = {name: i for i, name in enumerate(projects)}
    return [
        Shard(
            index=i + 1,
            total=shards,
            projects=tuple(sorted(members[i], key=lambda p: order.get(p, 0))),
            estimate=loads[i],
        )
        for i in range(shards)
    ]


def _plan_path(config: Config) -> Path:
    return config.state_dir / PLAN_FILE


def save_plan(config: Config, plan: Sequence[Shard]) -> None:
    """Keep ``plan`` as the one ``e2e.all --shard i/N`` follows (for the same N and projects)."""
    ensure_private_dir(config.state_dir)
    path = _plan_path(config)
    with _locked(path):
        _write_json(path, _plan_json(plan))


def _plan_json(plan: Sequence[Shard]) -> dict[str, Any]:
    return {
        "version": _VERSION,
        "planned_at": time.time(),
        "total": len(plan),
        "projects": sorted(p for shard in plan for p in shard.projects),
        "shards": [list(shard.projects) for shard in plan],
    }


def _saved_shards(path: Path, names: Sequence[str], total: int) -> list[list[str]] | None:
    """The saved plan's shards if it was made for exactly these projects and shard count."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shards = [[str(p) for p in shard] for shard in data["shards"]]
        fits = data["total"] == total == len(shards) and data["projects"] == sorted(names)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    placed = sorted(p for shard in shards for p in shard)
    return shards if fits and placed == sorted(names) else None


def shard_projects(
    config: Config, index: int, total: int, projects: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The projects of shard ``index`` of ``total`` (of ``projects``, default all).

    Follows the saved plan for these projects and ``total`` if there is one; otherwise plans by
    the recorded durations and saves that plan, so the other shards of the round (in this
    checkout) follow it whatever the earlier ones recorded meanwhile.
    """
    if not 1 <= index <= total:
        raise UsageError(f"shard {index}/{total}: need 1 <= i <= N")
    names = list(dict.fromkeys(config.projects if projects is None else projects))
    ensure_private_dir(config.state_dir)
    path = _plan_path(config)
    with _locked(path):
        shards = _saved_shards(path, names, total)
        if shards is None:
            plan = plan_shards(names, durations_for_plan(config, names), total)
            _write_json(path, _plan_json(plan))
            shards = [list(shard.projects) for shard in plan]
    order = {name: i for i, name in enumerate(names)}
    return tuple(sorted(shards[index - 1], key=lambda p: order[p]))
