"""Spread the projects over CI shards by their last recorded durations.

Longest processing time first (LPT): sort the projects by duration, longest first, and give each to
the shard with the least work so far. Projects never run before get the median of the known
durations (or :data:`DEFAULT_DURATION` when none is known). The plan is a pure function of the
project names and the durations, so the ``e2e.matrix`` job and every ``e2e.all --shard i/N`` job
that read the same ``run.json`` files agree on who runs where; ties are broken by name.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import UsageError
from .report import collect_runs

__all__ = [
    "DEFAULT_DURATION",
    "Shard",
    "last_durations",
    "parse_shard",
    "plan_shards",
    "shard_projects",
]

DEFAULT_DURATION = 60.0  # seconds, when no project has a recorded duration yet


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


def last_durations(config: Config, projects: Iterable[str] | None = None) -> dict[str, float]:
    """The duration of each project's latest recorded run (``run.json``); unknown ones left out."""
    latest: dict[str, tuple[float, float]] = {}
    for run in collect_runs(config, projects=projects):
        if run.duration <= 0 or run.result not in ("passed", "failed"):
            continue  # an interrupted or broken run says little about how long the suite takes
        if run.project not in latest or run.started_at > latest[run.project][0]:
            latest[run.project] = (run.started_at, run.duration)
    return {project: duration for project, (_, duration) in latest.items()}


def plan_shards(
    projects: Sequence[str],
    durations: Mapping[str, float],
    shards: int,
    *,
    default: float = DEFAULT_DURATION,
) -> list[Shard]:
    """Every project in exactly one of ``shards`` shards, balanced by LPT.

    There are always ``shards`` shards (some empty when there are fewer projects), so a CI matrix
    of a fixed size stays valid as projects come and go.
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


def shard_projects(
    config: Config, index: int, total: int, projects: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The projects of shard ``index`` of ``total`` (of ``projects``, default all), by duration."""
    if not 1 <= index <= total:
        raise UsageError(f"shard {index}/{total}: need 1 <= i <= N")
    names = list(config.projects) if projects is None else list(projects)
    return plan_shards(names, last_durations(config, names), total)[index - 1].projects
