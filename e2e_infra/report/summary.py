"""What a run leaves to look at: the summary table, the merged JUnit file, and what to link.

Reads the ``run.json`` files the sessions wrote (:mod:`e2e_infra.run.session`), so it works the same
after ``nox -j auto -t e2e`` (whose sessions run in separate processes) as after ``invoke e2e.all``.
Each run's JUnit file gives its test counts and failing tests (:mod:`e2e_infra.report.junit`);
:func:`find_artifacts` finds the screenshots, traces and Playwright HTML reports its suite wrote.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..files import RESULTS_SETTING, folder_error
from ..results.layout import OTHER_RUNS
from ..results.record import Result, RunRecord
from .details import console_tail, prepare_lines
from .junit import FLAKY_TAGS, JUnitSummary, case_name, read_junit
from .wall import wall_time

__all__ = [
    "RunSummary",
    "artifact_kind",
    "collect_runs",
    "cpu_text",
    "find_artifacts",
    "merge_junit",
    "peak_memory_text",
    "print_summary",
    "run_artifacts",
    "slowest_text",
    "summary_rows",
    "tests_of",
]

RunSummary = RunRecord  # the name this module's reader had before the one run record
_TAIL_LINES = 12  # of a failed server's log, in the terminal
_LOG_WIDTH = 132  # the summary's width when it goes to a file or a pipe
_MAX_ARTIFACTS = 40  # per project; a suite that writes more has its own report
_PRUNE = frozenset({".git", "node_modules", "__pycache__", ".venv", ".nox"})


def tests_of(run: RunRecord) -> JUnitSummary:
    """What ``run``'s JUnit file says; ``problem`` is set when there is none or it is unreadable.
    Read once per file (a report reads it for the table, the failures and the artifacts)."""
    path = run.junit
    try:
        stamp = os.stat(path).st_mtime_ns if path else None
    except OSError:
        stamp = None
    return _read_junit(path, stamp)


@functools.lru_cache(maxsize=4096)
def _read_junit(path: str | None, _stamp: int | None) -> JUnitSummary:
    return read_junit(path)


def peak_memory_text(run: RunRecord) -> str:
    value = run.peak_memory_bytes
    return _bytes(value) if value is not None else "-"


def cpu_text(run: RunRecord) -> str:
    value = run.cpu_seconds
    return f"{value:.2f}s" if value is not None else "-"


def slowest_text(run: RunRecord) -> str:
    name = run.slowest_phase
    return f"{name} {run.phases[name]:.2f}s" if name is not None else "-"


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def collect_runs(
    config: Config, *, since: float | None = None, projects: Iterable[str] | None = None
) -> list[RunRecord]:
    """The runs of ``config.run`` (each project's, and concurrent extra runs), optionally since
    a time; with no run set, each project's newest run of any run folder."""
    wanted = projects if projects is not None else config.projects
    return config.layout.collect(wanted, since=since)


def by_start(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs in the order they started (then by name), the order a person reads a run in."""
    return sorted(runs, key=lambda r: (r.started_at, r.project))


def summary_rows(runs: Sequence[RunRecord]) -> list[tuple[str, str, str, str, str]]:
    """``(project, result, tests, duration, slowest phase)`` per run, in start order."""
    return [
        (
            run.project,
            run.result.label,
            tests_of(run).text(),
            f"{run.duration:.2f}s",
            slowest_text(run),
        )
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
                d for d in dirnames if d not in _PRUNE and not (level == 0 and d == OTHER_RUNS)
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


def run_artifacts(config: Config | None, run: RunRecord) -> list[Path]:
    """What ``run``'s suite left: in its results folder, and for its failing tests, in the
    ``test-results/`` folder of the suite's working directory."""
    found = find_artifacts([run.folder]) if run.folder is not None else []
    project = config.projects.get(run.project) if config is not None else None
    failing = [failure.name for failure in tests_of(run).failures]
    if project is not None and failing:
        # 1 s of slack: some file systems keep mtimes to the second.
        shared = find_artifacts([project.cwd], tests=failing, since=run.started_at - 1.0)
        found += [path for path in shared if path not in found]
    return found


def merge_junit(runs: Sequence[RunRecord], out: Path) -> Path | None:
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
            _mark_flaky(suite, run)
            root.append(suite)
    if not found:
        return None
    for key, value in totals.items():
        root.set(key, str(value))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".xml.tmp")
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, out)
    except OSError as exc:  # a full or read-only results folder: one line naming it
        raise folder_error(out, exc, setting=RESULTS_SETTING, what="write") from None
    return out


def _mark_flaky(suite: ET.Element, run: RunRecord) -> None:
    """A project that passed on a retry says so in the merged file: its result and attempts as
    suite properties, and each flaky test with a ``<flakyFailure>`` (Surefire's convention, read
    by Jenkins and GitLab) unless its own runner wrote one."""
    if run.result is not Result.FLAKY and not run.flaky_tests:
        return
    properties = suite.find("properties")
    if properties is None:
        properties = ET.Element("properties")
        suite.insert(0, properties)
    for name, value in (
        ("e2e_infra.result", run.result.label),
        ("e2e_infra.attempts", str(run.attempt_count)),
    ):
        ET.SubElement(properties, "property", {"name": name, "value": value})
    flaky = set(run.flaky_tests)
    for case in suite.iter("testcase"):
        if case_name(case) not in flaky or any(case.find(t) is not None for t in FLAKY_TAGS):
            continue
        if case.find("failure") is None and case.find("error") is None:
            message = f"failed, then passed on attempt {run.attempt_count} (e2e-infra retries)"
            ET.SubElement(case, "flakyFailure", {"message": message, "type": "flaky"})


def _tail(text: str, lines: int) -> list[str]:
    return text.rstrip().splitlines()[-lines:]


def print_summary(config: Config, runs: Sequence[RunRecord], *, file: Any = None) -> Path | None:
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
    ordered = by_start(runs)
    for run in ordered:
        tests = tests_of(run)
        if tests.problem:
            counts = f"[dim]{escape(tests.problem)}[/]"
        else:
            colours = {
                "passed": "green",
                "flaky": "yellow",
                "failed": "red",
                "errors": "red",
                "skipped": "yellow",
            }
            counts = ", ".join(f"[{colours[k]}]{n} {k}[/]" for k, n in tests.counts())
            counts = counts or "0 tests"
        table.add_row(
            escape(run.project),
            f"[{run.result.style}]{escape(run.result.label)}[/]",
            counts,
            f"{run.duration:.2f}s",
            escape(slowest_text(run)),
            peak_memory_text(run),
            cpu_text(run),
        )
    console.print(table)
    spent = wall_time(runs)
    if spent is not None and len(runs) > 1:
        console.print("\n".join(escape(line) for line in spent.lines()), soft_wrap=True)
    for line in prepare_lines(config):
        console.print(escape(line), soft_wrap=True)
    for run in ordered:
        failures = tests_of(run).failures
        if run.result is Result.PASSED and not failures and not run.notes():
            continue
        lines = [f"[bold]{escape(run.project)}[/] {escape(run.result.label)}"]
        if run.error:
            lines.append(f"  {escape(run.error)}")
        lines += [f"  [yellow]![/] {escape(note)}" for note in run.notes()]
        for failure in failures[:10]:
            lines.append(f"  [red]✗[/] {escape(failure.name)}: {escape(failure.first_line)}")
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more (see the report)")
        if run.log_tail:
            what = f"its output ({run.error_log})" if run.error_log else "the server's log"
            lines.append(f"  last lines of {escape(what)}:")
            lines += [f"    {escape(line)}" for line in _tail(run.log_tail, _TAIL_LINES)]
        if not run.result.ok and (output := console_tail(run)):
            lines.append(f"  last lines of its console output ({escape(str(run.suite_log))}):")
            lines += [f"    {escape(line)}" for line in output]
        console.print("\n".join(lines), soft_wrap=True)  # a log keeps whole lines
    merged = merge_junit(runs, config.layout.merged_junit)
    if merged is not None:
        console.print(f"merged JUnit: {merged}")
    return merged
