"""Where a run's wall time went, from its records: phases, the tool's CPU, the tail, the critical
path, and what each server's start-up costs.

All of it is read from the projects' ``run.json`` (start, duration, phases, server start-ups,
``resources.tool_cpu_seconds``); nothing is measured twice. The lanes (how many projects ran at
once) and which project followed which in a lane are rebuilt from the start and end times: a
project goes to the lane that became free last before it started. On that reconstruction:

* **the tail** is the idle lane time at the end: from the moment the last project started, the
  lanes with nothing left to run add up until the run ends (what starting the longest projects
  first shrinks);
* **the critical path** is the lane that ended last, project after project: the chain the wall
  time could not be shorter than with these durations and this order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..results.record import RunRecord

__all__ = ["WallTime", "wall_time"]

_SLACK = 0.5  # seconds: a project starts this long after its lane's previous one ended, at most


@dataclass(frozen=True)
class WallTime:
    wall: float  # first start to last end, seconds
    lanes: int  # the most projects that ran at once
    phases: dict[str, float]  # each phase summed over the projects
    tool_cpu: float | None  # the tool's own CPU summed over the projects (run.json)
    tail: float  # idle lane-seconds after the last project started
    critical: tuple[str, ...]  # the lane that ended last, in order
    critical_busy: float  # the seconds its projects ran
    startups: dict[str, list[float]] = field(default_factory=dict)  # server -> start-ups

    @property
    def lane_seconds(self) -> float:
        return self.wall * self.lanes

    def lines(self) -> list[str]:
        """The summary's few lines, plain text."""
        order = ("ports", "database", "servers", "health", "suite", "teardown")
        names = [p for p in order if p in self.phases] + sorted(set(self.phases) - set(order))
        shown = {"health": "start-up (health)"}
        phases = " · ".join(f"{shown.get(p, p)} {self.phases[p]:.2f}s" for p in names)
        cpu = f"{self.tool_cpu:.2f}s" if self.tool_cpu is not None else "-"
        path = " → ".join(self.critical) or "-"
        lines = [
            f"where the wall time went: {self.wall:.1f}s wall on {self.lanes} lane(s), "
            f"{self.lane_seconds:.1f} lane-seconds",
            f"  summed over projects: {phases}",
            f"  the tool's own CPU {cpu}; idle lanes at the end (the tail) {self.tail:.1f}s; "
            f"critical path {path} ({self.critical_busy:.1f}s of {self.wall:.1f}s)",
        ]
        if self.startups:
            each = ", ".join(
                f"{name} {sum(times) / len(times):.2f}s"
                + (f" (x{len(times)}, {sum(times):.1f}s in all)" if len(times) > 1 else "")
                for name, times in sorted(self.startups.items())
            )
            lines.append(f"  server start-up, spawn to healthy: {each}")
        return lines


def wall_time(runs: Sequence[RunRecord]) -> WallTime | None:
    """Where the wall time of ``runs`` (one run's projects) went; None with no timed record."""
    timed = [r for r in runs if r.duration > 0]
    if not timed:
        return None
    spans = sorted(
        ((r.started_at, r.started_at + r.duration, r) for r in timed), key=lambda s: s[:2]
    )
    first = spans[0][0]
    last_end = max(end for _, end, _ in spans)
    phases: dict[str, float] = {}
    startups: dict[str, list[float]] = {}
    cpu: float | None = None
    for run in timed:
        for name, seconds in run.phases.items():
            phases[name] = phases.get(name, 0.0) + seconds
        for server, seconds in run.server_startups.items():
            startups.setdefault(server, []).append(seconds)
        value = (run.resources or {}).get("tool_cpu_seconds")
        if isinstance(value, (int, float)):
            cpu = (cpu or 0.0) + float(value)
    lanes = _lanes(spans)
    last_start = max(start for start, _, _ in spans)
    tail = sum(last_end - max(lane[-1][1], last_start) for lane in lanes)
    critical = max(lanes, key=lambda lane: lane[-1][1])
    return WallTime(
        wall=last_end - first,
        lanes=len(lanes),
        phases=phases,
        tool_cpu=cpu,
        tail=tail,
        critical=tuple(run.project for _, _, run in critical),
        critical_busy=sum(end - start for start, end, _ in critical),
        startups=startups,
    )


def _lanes(
    spans: Sequence[tuple[float, float, RunRecord]],
) -> list[list[tuple[float, float, RunRecord]]]:
    """Each project in the lane that became free last before it started (a new lane if none)."""
    lanes: list[list[tuple[float, float, RunRecord]]] = []
    for span in spans:
        start = span[0]
        free = [lane for lane in lanes if lane[-1][1] <= start + _SLACK]
        if free:
            max(free, key=lambda lane: lane[-1][1]).append(span)
        else:
            lanes.append([span])
    return lanes
