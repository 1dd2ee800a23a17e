"""What a run leaves to look at: the summary table and the merged JUnit file.

Reads the ``run.json`` files the sessions wrote (:mod:`e2e_infra.session`), so it works the same
after ``nox -j auto -t e2e`` (whose sessions run in separate processes) as after ``invoke e2e.all``.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config

__all__ = ["RunSummary", "collect_runs", "merge_junit", "print_summary", "summary_rows"]


@dataclass(frozen=True)
class RunSummary:
    project: str
    run_id: str
    result: str
    duration: float
    started_at: float
    phases: dict[str, float]
    junit: str | None
    path: Path

    @property
    def slowest_phase(self) -> str:
        if not self.phases:
            return "-"
        name = max(self.phases, key=lambda k: self.phases[k])
        return f"{name} {self.phases[name]:.2f}s"

    @classmethod
    def load(cls, path: Path) -> RunSummary | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                project=str(data["project"]),
                run_id=str(data["run_id"]),
                result=str(data["result"]),
                duration=float(data.get("duration") or 0.0),
                started_at=float(data["started_at"]),
                phases={str(k): float(v) for k, v in dict(data.get("phases") or {}).items()},
                junit=data.get("junit"),
                path=path,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def collect_runs(
    config: Config, *, since: float | None = None, projects: Iterable[str] | None = None
) -> list[RunSummary]:
    """The latest run of each project (and concurrent extra runs), optionally since a time."""
    wanted = set(projects) if projects is not None else set(config.projects)
    runs: list[RunSummary] = []
    for project in sorted(wanted):
        folder = config.project_dir(project)
        paths = [folder / "run.json", *sorted(folder.glob("runs/*/run.json"))]
        for path in paths:
            if not path.is_file():
                continue
            run = RunSummary.load(path)
            if run is None or (since is not None and run.started_at < since):
                continue
            runs.append(run)
    return sorted(runs, key=lambda r: (r.project, r.started_at))


def summary_rows(runs: Sequence[RunSummary]) -> list[tuple[str, str, str, str]]:
    return [(run.project, run.result, f"{run.duration:.2f}s", run.slowest_phase) for run in runs]


def merge_junit(runs: Sequence[RunSummary], out: Path) -> Path | None:
    """Merge the runs' JUnit files into one ``<testsuites>`` document; None if there are none."""
    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    found = False
    for run in runs:
        if not run.junit or not Path(run.junit).is_file():
            continue
        try:
            tree = ET.parse(run.junit)
        except ET.ParseError:
            continue
        found = True
        document = tree.getroot()
        suites = [document] if document.tag == "testsuite" else list(document.iter("testsuite"))
        for suite in suites:
            suite.set("name", f"{run.project}.{suite.get('name', 'suite')}")
            for key in totals:
                totals[key] += int(suite.get(key, "0") or 0)
            root.append(suite)
    if not found:
        return None
    for key, value in totals.items():
        root.set(key, str(value))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".xml.tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out)
    return out


def print_summary(config: Config, runs: Sequence[RunSummary], *, file: Any = None) -> Path | None:
    """Print the summary table (rich) and write ``<results>/junit.xml``; return its path."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stderr, highlight=False)
    table = Table(title="e2e run summary", title_justify="left")
    for column in ("project", "result", "duration", "slowest phase"):
        table.add_column(column)
    styles = {"passed": "green", "failed": "red", "error": "red", "interrupted": "yellow"}
    for project, result, duration, slowest in summary_rows(runs):
        table.add_row(project, f"[{styles.get(result, 'white')}]{result}[/]", duration, slowest)
    console.print(table)
    merged = merge_junit(runs, config.results_dir / "junit.xml")
    if merged is not None:
        console.print(f"merged JUnit: {merged}")
    return merged
