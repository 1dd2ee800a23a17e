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

import json
import logging
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..files import ensure_private_dir
from ..results.durations import durations_for_plan, locked, write_json

__all__ = [
    "DEFAULT_DURATION",
    "Shard",
    "parse_projects",
    "parse_shard",
    "plan_shards",
    "save_plan",
    "shard_projects",
]

log = logging.getLogger("e2e_infra")

DEFAULT_DURATION = 60.0  # seconds, when no project has a recorded duration yet
PLAN_FILE = "shard-plan.json"  # in the state folder: the plan `e2e.all --shard` follows
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
    with locked(path):
        write_json(path, _plan_json(plan))


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
    with locked(path):
        shards = _saved_shards(path, names, total)
        if shards is None:
            plan = plan_shards(names, durations_for_plan(config, names), total)
            write_json(path, _plan_json(plan))
            shards = [list(shard.projects) for shard in plan]
    order = {name: i for i, name in enumerate(names)}
    return tuple(sorted(shards[index - 1], key=lambda p: order[p]))
