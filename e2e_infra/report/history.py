"""A project's recent results: a pass/fail/flaky strip, a duration trend, and what flipped.

Read from what runs already record (every ``run.json`` of a project, oldest first, from
:meth:`~e2e_infra.results.layout.Layout.history`, and the JUnit file each names); nothing is
stored for it. ``e2e.list`` shows the strip and trend per project, ``report.html`` draws them, and
``invoke e2e.flaky`` lists the projects and tests that *flipped* in the last N runs:

* a project flipped when it was ``flaky`` in a run (it passed on a retry), or when its result
  went from a success to a failure or back between two of its runs (errors and interruptions
  count as failures; a run still going is left out);
* a test flipped when the suite's own runner or a retry of ours saw it fail and pass in one run
  (the record's ``flaky_tests``), or when it failed in one run and passed in another.
"""

from __future__ import annotations

import html
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..results.record import Result, RunRecord
from .summary import tests_of

__all__ = [
    "DEFAULT_RUNS",
    "FlakyReport",
    "History",
    "TestFlips",
    "flaky_report",
    "history",
    "html_history",
]

DEFAULT_RUNS = 10
_MARKS = {
    Result.PASSED: "✓",
    Result.FLAKY: "~",
    Result.FAILED: "✗",
    Result.ERROR: "E",
    Result.INTERRUPTED: "!",
    Result.SKIPPED: "-",
    Result.RUNNING: "…",
}
_BARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class History:
    """The last runs of one project, oldest first."""

    project: str
    runs: tuple[RunRecord, ...] = ()

    @property
    def finished(self) -> list[RunRecord]:
        return [run for run in self.runs if run.result.finished]

    @property
    def strip(self) -> str:
        """One mark per run, oldest first: ✓ passed, ~ flaky, ✗ failed, E error, ! interrupted."""
        return "".join(_MARKS[run.result] for run in self.runs)

    def rich_strip(self) -> str:
        """:attr:`strip` with each mark in its result's colour (rich markup)."""
        return "".join(f"[{run.result.style}]{_MARKS[run.result]}[/]" for run in self.runs)

    @property
    def durations(self) -> list[float]:
        """The durations of the runs that say how long the suite takes, oldest first."""
        return [run.duration for run in self.runs if run.timed]

    @property
    def sparkline(self) -> str:
        """The durations as bars, lowest to highest over their own range."""
        values = self.durations
        if not values:
            return ""
        low, high = min(values), max(values)
        span = high - low
        top = len(_BARS) - 1
        return "".join(_BARS[round((v - low) / span * top) if span > 0 else 0] for v in values)

    @property
    def trend(self) -> str:
        """``▂▃▂▇ 4.1s (median 3.2s, +28%)``: the bars, the last duration against the median."""
        values = self.durations
        if not values:
            return "-"
        last, median = values[-1], statistics.median(values)
        change = f", {(last - median) / median:+.0%}" if median > 0 and len(values) > 1 else ""
        return f"{self.sparkline} {last:.1f}s (median {median:.1f}s{change})"

    @property
    def flips(self) -> int:
        """Flaky runs plus changes between success and failure from one run to the next."""
        finished = self.finished
        changes = sum(1 for a, b in itertools.pairwise(finished) if a.result.ok != b.result.ok)
        return changes + sum(1 for run in finished if run.result is Result.FLAKY)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "run_id": run.run_id,
                "result": run.result.label,
                "duration": round(run.duration, 3),
                "started_at": run.started_at,
                "attempts": run.attempt_count,
            }
            for run in self.runs
        ]


def history(config: Config, project: str, runs: int = DEFAULT_RUNS) -> History:
    """``project``'s last ``runs`` runs in the results folder (any run folder), oldest first."""
    records = config.layout.history(project)
    return History(project, tuple(records[-runs:] if runs > 0 else ()))


@dataclass
class TestFlips:
    """One test that both failed and passed within the runs looked at."""

    project: str
    name: str
    failed: int = 0  # runs where it failed in the end
    passed: int = 0  # runs where it passed in the end (flaky ones included)
    flaky: int = 0  # runs where it failed, then passed (a retry of ours or of the runner's)
    last: str = ""  # "passed" / "failed": its last outcome

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "test": self.name,
            "failed": self.failed,
            "passed": self.passed,
            "flaky": self.flaky,
            "last": self.last,
        }


@dataclass
class FlakyReport:
    """What flipped in the last ``runs`` runs of each project."""

    runs: int
    projects: list[History] = field(default_factory=list)  # those with a flip, most first
    tests: list[TestFlips] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "projects": [
                {
                    "project": item.project,
                    "flips": item.flips,
                    "flaky_runs": sum(1 for r in item.runs if r.result is Result.FLAKY),
                    "strip": item.strip,
                    "history": item.to_json(),
                }
                for item in self.projects
            ],
            "tests": [test.to_json() for test in self.tests],
        }


def flaky_report(
    config: Config, projects: Sequence[str] | None = None, runs: int = DEFAULT_RUNS
) -> FlakyReport:
    """The projects and tests that flipped in each project's last ``runs`` runs."""
    report = FlakyReport(runs)
    for project in projects if projects is not None else list(config.projects):
        item = history(config, project, runs)
        if item.flips:
            report.projects.append(item)
        report.tests.extend(_test_flips(item))
    report.projects.sort(key=lambda h: (-h.flips, h.project))
    report.tests.sort(key=lambda t: (-(t.flaky + min(t.failed, t.passed)), t.project, t.name))
    return report


def _test_flips(item: History) -> list[TestFlips]:
    seen: dict[str, TestFlips] = {}

    def entry(name: str) -> TestFlips:
        return seen.setdefault(name, TestFlips(item.project, name))

    for run in item.finished:
        tests = tests_of(run)  # no JUnit: nothing failed or passed by name, flaky_tests still
        failed = {failure.name for failure in tests.failures}
        for name in failed:
            entry(name).failed += 1
            entry(name).last = "failed"
        for name in set(tests.passed_tests) - failed:
            entry(name).passed += 1
            entry(name).last = "passed"
        for name in set(run.flaky_tests) | set(tests.flaky):
            entry(name).flaky += 1
    return [t for t in seen.values() if t.flaky or (t.failed and t.passed)]


# --- report.html ----------------------------------------------------------------------------------

_CSS_COLOURS = {"green": "#2e9d3a", "red": "#d32f2f", "amber": "#f0a020", "grey": "#9e9e9e"}
HTML_CSS = """
td.history { white-space: nowrap; }
.strip { display: inline-flex; gap: 2px; vertical-align: middle; }
.strip i { display: inline-block; width: 7px; height: 14px; border-radius: 1px; }
.strip i.current { outline: 1px solid #1f2328; outline-offset: 1px; }
svg.trend { vertical-align: middle; margin-left: .4em; }
"""


def html_history(item: History, current: RunRecord | None = None) -> str:
    """The strip (one coloured box per run, its tooltip the run, date and duration) and the
    durations as a small line, for ``report.html``."""
    boxes = []
    for run in item.runs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started_at))
        tip = f"{run.result.label}, {run.duration:.1f} s, {when} ({run.run_id})"
        mark = " current" if current is not None and run.path == current.path else ""
        boxes.append(
            f'<i class="h-{run.result.css}{mark}" data-result="{html.escape(run.result.label)}" '
            f'title="{html.escape(tip)}" style="background:{_CSS_COLOURS[run.result.css]}"></i>'
        )
    strip = f'<span class="strip">{"".join(boxes)}</span>'
    values = item.durations
    if len(values) < 2:
        return strip
    width, height = 60, 14
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (v - low) / span * (height - 2):.1f}"
        for i, v in enumerate(values)
    )
    tip = html.escape(item.trend)
    return (
        f'{strip}<svg class="trend" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{tip}</title>'
        f'<polyline fill="none" stroke="#57606a" stroke-width="1.2" points="{points}"/></svg>'
    )
