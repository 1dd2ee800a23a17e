"""What a run leaves to look at: the summary table, the merged JUnit file, and what to link.

Reads the ``run.json`` files the sessions wrote (:mod:`e2e_infra.session`), so it works the same
after ``nox -j auto -t e2e`` (whose sessions run in separate processes) as after ``invoke e2e.all``.
Each run's JUnit file gives its test counts and failing tests (:mod:`e2e_infra.junit`);
:func:`find_artifacts` finds the screenshots, traces and Playwright HTML reports its suite wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import Config
from .conninfo import mask_secrets
from .junit import JUnitSummary, read_junit

__all__ = [
    "LATEST",
    "RunSummary",
    "artifact_kind",
    "collect_runs",
    "find_artifacts",
    "merge_junit",
    "point_latest",
    "print_summary",
    "run_artifacts",
    "summary_rows",
]

LATEST = "latest"  # <results_dir>/latest -> the newest run's folder
_TAIL_LINES = 12  # of a failed server's log, in the terminal
_LOG_WIDTH = 132  # the summary's width when it goes to a file or a pipe
_MAX_ARTIFACTS = 40  # per project; a suite that writes more has its own report
_PRUNE = frozenset({".git", "node_modules", "__pycache__", ".venv", ".nox"})


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
    error: str | None = None
    log_tail: str | None = None
    logs: Mapping[str, str] = field(default_factory=dict)
    server_exits: tuple[Mapping[str, Any], ...] = ()  # servers that died during the run
    resources: Mapping[str, Any] = field(default_factory=dict)  # peak_memory_bytes, cpu_seconds
    leftovers: Mapping[str, int] = field(default_factory=dict)  # processes ended after a part

    @property
    def peak_memory(self) -> str:
        value = self.resources.get("peak_memory_bytes")
        return _bytes(value) if isinstance(value, int) and value > 0 else "-"

    @property
    def cpu(self) -> str:
        value = self.resources.get("cpu_seconds")
        return f"{value:.2f}s" if isinstance(value, (int, float)) else "-"

    def notes(self) -> list[str]:
        """One line per server that died and per part that left processes behind."""
        lines = []
        for ended in self.server_exits:
            how = (
                f"killed by {ended.get('signal')}"
                if ended.get("signal")
                else f"exited with status {ended.get('returncode')}"
            )
            lines.append(f"server {ended.get('server')} {how} during the {ended.get('during')}")
        if self.leftovers:
            parts = ", ".join(f"{part} {count}" for part, count in self.leftovers.items())
            lines.append(f"leftover processes ended: {parts}")
        return lines

    @property
    def slowest_phase(self) -> str:
        if not self.phases:
            return "-"
        name = max(self.phases, key=lambda k: self.phases[k])
        return f"{name} {self.phases[name]:.2f}s"

    @property
    def folder(self) -> Path:
        """The folder the run wrote its files to (its ``run.json``, logs, JUnit)."""
        return self.path.parent

    @cached_property
    def tests(self) -> JUnitSummary:
        """What its JUnit file says; ``problem`` is set when there is none or it is unreadable."""
        return read_junit(self.junit)

    @classmethod
    def load(cls, path: Path) -> RunSummary | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            logs = data.get("logs") or {}
            return cls(
                project=str(data["project"]),
                run_id=str(data["run_id"]),
                result=str(data["result"]),
                duration=float(data.get("duration") or 0.0),
                started_at=float(data["started_at"]),
                phases={str(k): float(v) for k, v in dict(data.get("phases") or {}).items()},
                junit=data.get("junit"),
                path=path,
                # run.json masks them already; masked again in case an older writer did not.
                error=mask_secrets(str(data["error"])) if data.get("error") else None,
                log_tail=mask_secrets(str(data["log_tail"])) if data.get("log_tail") else None,
                logs={str(k): str(v) for k, v in logs.items()} if isinstance(logs, dict) else {},
                server_exits=tuple(
                    x for x in data.get("server_exits") or () if isinstance(x, dict)
                ),
                resources=_mapping(data.get("resources")),
                leftovers={str(k): int(v) for k, v in _mapping(data.get("leftovers")).items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def collect_runs(
    config: Config, *, since: float | None = None, projects: Iterable[str] | None = None
) -> list[RunSummary]:
    """The runs of ``config.run`` (each project's, and concurrent extra runs), optionally since
    a time; with no run set, each project's newest run of any run folder."""
    wanted = set(projects) if projects is not None else set(config.projects)
    runs: list[RunSummary] = []
    for project in sorted(wanted):
        candidates: list[RunSummary | None]
        if config.run is None:
            candidates = [_newest_run(config, project)]
        else:
            folder = config.project_dir(project)
            paths = [folder / "run.json", *sorted(folder.glob("runs/*/run.json"))]
            candidates = [RunSummary.load(path) for path in paths if path.is_file()]
        for run in candidates:
            if run is not None and (since is None or run.started_at >= since):
                runs.append(run)
    return sorted(runs, key=lambda r: (r.project, r.started_at))


def _newest_run(config: Config, project: str) -> RunSummary | None:
    paths = [
        *config.results_dir.glob(f"{project}/run.json"),  # runs without a run folder
        *config.results_dir.glob(f"{project}/runs/*/run.json"),
        *config.results_dir.glob(f"*/{project}/run.json"),
        *config.results_dir.glob(f"*/{project}/runs/*/run.json"),
    ]
    loaded = [run for run in map(RunSummary.load, paths) if run is not None]
    return max(loaded, key=lambda r: r.started_at, default=None)


def point_latest(config: Config) -> None:
    """Make ``<results_dir>/latest`` point at this run's folder (atomically; best effort)."""
    if config.run is None:
        return
    link = config.results_dir / LATEST
    tmp = config.results_dir / f".{LATEST}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        config.results_dir.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(config.run, target_is_directory=True)
        os.replace(tmp, link)


def by_start(runs: Iterable[RunSummary]) -> list[RunSummary]:
    """Runs in the order they started (then by name), the order a person reads a run in."""
    return sorted(runs, key=lambda r: (r.started_at, r.project))


def summary_rows(runs: Sequence[RunSummary]) -> list[tuple[str, str, str, str, str]]:
    """``(project, result, tests, duration, slowest phase)`` per run, in start order."""
    return [
        (run.project, run.result, run.tests.text(), f"{run.duration:.2f}s", run.slowest_phase)
        for run in by_start(runs)
    ]


# --- what the suite left to look at ---------------------------------------------------------------


def artifact_kind(path: Path) -> str | None:
    """``screenshot``, ``trace``, ``video``, ``error context``, ``Playwright report`` or None."""
    name = path.name.lower()
    if name == "index.html":
        return "Playwright report" if path.parent.name.startswith("playwright-report") else None
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return "screenshot"
    if path.suffix.lower() == ".zip" and "trace" in name:
        return "trace"
    if path.suffix.lower() == ".webm":
        return "video"
    if name == "error-context.md":  # Playwright Test's page snapshot at the failure
        return "error context"
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _test_slugs(tests: Iterable[str]) -> list[str]:
    # pytest-playwright names a test's folder slugify(nodeid) ("tests-test-login-py-test-login-
    # chromium"); Playwright Test "<file>-<title>-<project>", the title cut in the middle when
    # long. The test's own name (after "::"), or its first 24 characters, is in both.
    slugs = {_slug(test.rpartition("::")[2])[:24] for test in tests}
    return sorted(slug for slug in slugs if len(slug) >= 3)


def _walk(folder: Path, depth: int = 6) -> Iterator[Path]:
    """Files below ``folder``, sorted, not below other runs' folders nor inside a report's data."""
    base = len(folder.parts)
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        level = len(here.parts) - base
        if here.name.startswith("playwright-report") or level >= depth:
            dirnames[:] = []  # a report's data folder holds copies of the same attachments
        else:
            dirnames[:] = sorted(
                d for d in dirnames if d not in _PRUNE and not (level == 0 and d == "runs")
            )
        for name in sorted(filenames):
            yield here / name


def find_artifacts(
    folders: Sequence[Path],
    *,
    tests: Sequence[str] | None = None,
    since: float | None = None,
) -> list[Path]:
    """Screenshots, traces, videos and Playwright HTML reports found in ``folders``.

    Without ``tests``, everything of those kinds below each folder (a project's own results
    folder; ``runs/`` there holds other runs and is skipped). With ``tests`` (failing test
    names), only what lies in ``<folder>/test-results/<name>/`` for one of those tests: for a
    folder shared with other projects, such as the suite's working directory, where
    pytest-playwright and Playwright Test write by default. With ``since``, only files modified
    since then (what an earlier run left is not this run's).
    """
    found: list[Path] = []
    seen: set[Path] = set()
    slugs = _test_slugs(tests) if tests is not None else []
    for folder in folders:
        if tests is None:
            roots = [folder]
        else:
            results = folder / "test-results"
            try:
                subs = sorted(p for p in results.iterdir() if p.is_dir())
            except OSError:
                continue
            roots = [p for p in subs if any(slug in _slug(p.name) for slug in slugs)]
        for root in roots:
            for path in _walk(root):
                if path in seen or artifact_kind(path) is None:
                    continue
                try:
                    if since is not None and path.stat().st_mtime < since:
                        continue
                except OSError:
                    continue
                seen.add(path)
                found.append(path)
                if len(found) >= _MAX_ARTIFACTS:
                    return found
    return found


def run_artifacts(config: Config | None, run: RunSummary) -> list[Path]:
    """What ``run``'s suite left: in its results folder, and for its failing tests, in the
    ``test-results/`` folder of the suite's working directory."""
    found = find_artifacts([run.folder])
    project = config.projects.get(run.project) if config is not None else None
    failing = [failure.name for failure in run.tests.failures]
    if project is not None and failing:
        # 1 s of slack: some file systems keep mtimes to the second.
        shared = find_artifacts([project.cwd], tests=failing, since=run.started_at - 1.0)
        found += [path for path in shared if path not in found]
    return found


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


def _tail(text: str, lines: int) -> list[str]:
    return text.rstrip().splitlines()[-lines:]


def print_summary(config: Config, runs: Sequence[RunSummary], *, file: Any = None) -> Path | None:
    """Print the summary table (rich), then what failed and why; write ``<results>/junit.xml``
    and return its path."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A CI log has no width: 80 columns would cut the table's cells short.
        console = Console(file=file or sys.stderr, highlight=False, width=_LOG_WIDTH)
    table = Table(title="e2e run summary", title_justify="left")
    for column in ("project", "result", "tests", "duration"):
        table.add_column(column, no_wrap=True)
    table.add_column("slowest phase")
    table.add_column("peak mem", no_wrap=True, justify="right")
    table.add_column("cpu", no_wrap=True, justify="right")
    styles = {"passed": "green", "failed": "red", "error": "red", "interrupted": "yellow"}
    ordered = by_start(runs)
    for run in ordered:
        tests = run.tests
        if tests.problem:
            counts = f"[dim]{escape(tests.problem)}[/]"
        else:
            colours = {"passed": "green", "failed": "red", "errors": "red", "skipped": "yellow"}
            counts = ", ".join(f"[{colours[k]}]{n} {k}[/]" for k, n in tests.counts())
            counts = counts or "0 tests"
        table.add_row(
            escape(run.project),
            f"[{styles.get(run.result, 'white')}]{escape(run.result)}[/]",
            counts,
            f"{run.duration:.2f}s",
            escape(run.slowest_phase),
            run.peak_memory,
            run.cpu,
        )
    console.print(table)
    for run in ordered:
        if run.result == "passed" and not run.tests.failures and not run.notes():
            continue
        lines = [f"[bold]{escape(run.project)}[/] {escape(run.result)}"]
        if run.error:
            lines.append(f"  {escape(run.error)}")
        lines += [f"  [yellow]![/] {escape(note)}" for note in run.notes()]
        for failure in run.tests.failures[:10]:
            lines.append(f"  [red]✗[/] {escape(failure.name)}: {escape(failure.first_line)}")
        if len(run.tests.failures) > 10:
            lines.append(f"  ... and {len(run.tests.failures) - 10} more (see the report)")
        if run.log_tail:
            lines.append("  last lines of the server's log:")
            lines += [f"    {escape(line)}" for line in _tail(run.log_tail, _TAIL_LINES)]
        console.print("\n".join(lines), soft_wrap=True)  # a log keeps whole lines
    merged = merge_junit(runs, config.run_dir / "junit.xml")
    if merged is not None:
        console.print(f"merged JUnit: {merged}")
    return merged
