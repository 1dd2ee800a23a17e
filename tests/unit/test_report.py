"""The summary and report.html from run records: ticks, what gets linked, order, escaping."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.config import Config, ProjectConfig
from e2e_infra.report import progress
from e2e_infra.report.html import latest_per_project, nice_ticks, write_html_report
from e2e_infra.report.progress import StatusWriter
from e2e_infra.report.summary import RunSummary, artifact_kind, find_artifacts, print_summary

FAILED_JUNIT = (
    '<testsuite><testcase classname="tests.test_orders" name="test_total[chromium]">'
    '<failure message="AssertionError: &lt;b&gt;41&lt;/b&gt; != 42">boom</failure></testcase>'
    '<testcase classname="tests.test_orders" name="test_list"/></testsuite>'
)


# --- ticks ----------------------------------------------------------------------------------------


def _mantissa(step: float) -> float:
    return round(step / 10 ** math.floor(math.log10(step) + 1e-9), 6)


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_ticks_are_round_and_cover_the_axis(span: float) -> None:
    ticks = nice_ticks(span)
    assert ticks[0] == 0 and ticks[-1] >= span * (1 - 1e-9)
    assert ticks[-2] < span  # no tick more than needed
    assert 2 <= len(ticks) <= 7
    step = ticks[1]
    assert _mantissa(step) in (1.0, 2.0, 5.0)
    for i, tick in enumerate(ticks):
        assert math.isclose(tick, i * step, rel_tol=1e-9)
        assert len(repr(tick)) <= 12  # 0.3, not 0.30000000000000004


def test_ticks_for_typical_runs() -> None:
    assert nice_ticks(12.4) == [0, 5, 10, 15]
    assert nice_ticks(1.6) == [0, 0.5, 1.0, 1.5, 2.0]
    assert nice_ticks(9.3) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0)[-1] == 0.001  # an empty run still has an axis


# --- the link finder ------------------------------------------------------------------------------


def touch(path: Path, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_a_results_folder_gives_screenshots_traces_and_reports_not_other_runs(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results" / "checkout"
    wanted = [
        touch(results / "failure.png"),
        touch(results / "playwright-report" / "index.html"),
        touch(results / "test-results" / "orders-total-chromium" / "error-context.md"),
        touch(results / "test-results" / "orders-total-chromium" / "test-failed-1.png"),
        touch(results / "test-results" / "orders-total-chromium" / "trace.zip"),
        touch(results / "test-results" / "orders-total-chromium" / "video.webm"),
    ]
    touch(results / "junit.xml")
    touch(results / "api.log")
    touch(results / "playwright-report" / "data" / "abc.png")  # a copy inside the report
    touch(results / "playwright-report" / "trace" / "index.html")  # its trace viewer
    touch(results / "runs" / "other-run" / "shot.png")  # another run's
    touch(results / "node_modules" / "pkg" / "logo.png")
    assert sorted(find_artifacts([results])) == sorted(wanted)
    assert find_artifacts([tmp_path / "absent"]) == []


def test_a_shared_folder_gives_only_the_failing_tests_files_of_this_run(tmp_path: Path) -> None:
    cwd = tmp_path / "repo"
    shared = cwd / "test-results"
    ours = touch(shared / "tests-test-orders-py-test-total-chromium" / "test-failed-1.png")
    retry = touch(shared / "tests-test-orders-py-test-total-chromium-retry1" / "trace.zip")
    node = touch(shared / "orders-shows-the-total-of-the-order-chromium" / "test-failed-1.png")
    touch(shared / "tests-test-login-py-test-login-chromium" / "test-failed-1.png")  # another's
    touch(shared / "tests-test-orders-py-test-list-chromium" / "trace.zip", mtime=1000.0)
    touch(cwd / "logo.png")  # the repository's own images are nobody's artifact
    failing = [
        "tests.test_orders::test_total[chromium]",
        "tests.test_orders::test_list[chromium]",  # but its files are from an older run
        "orders.spec.ts::shows the total of the order",
    ]
    found = find_artifacts([cwd], tests=failing, since=2000.0)
    assert sorted(found) == sorted([ours, retry, node])
    assert find_artifacts([cwd], tests=[]) == []


def test_artifact_kinds() -> None:
    assert artifact_kind(Path("a/test-failed-1.png")) == "screenshot"
    assert artifact_kind(Path("a/trace.zip")) == "trace"
    assert artifact_kind(Path("a/playwright-report/index.html")) == "Playwright report"
    assert artifact_kind(Path("a/site/index.html")) is None
    assert artifact_kind(Path("a/bundle.zip")) is None
    assert artifact_kind(Path("a/junit.xml")) is None


# --- the summary and the page ---------------------------------------------------------------------


def make_config(tmp_path: Path, projects: list[str]) -> Config:
    return Config(
        root=tmp_path,
        source=None,
        state_dir=tmp_path / "state",
        results_dir=tmp_path / "results",
        projects={name: ProjectConfig(name, "true", tmp_path) for name in projects},
    )


def write_run(config: Config, project: str, started: float, **data: Any) -> RunSummary:
    folder = config.layout.project_dir(project)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "project": project,
        "run_id": f"r-{project}",
        "started_at": started,
        "result": "passed",
        "duration": 2.0,
        "phases": {"ports": 0.004, "suite": 1.9, "teardown": 0.01},
        "logs": {},
        "junit": None,
        "error": None,
        "log_tail": None,
        **data,
    }
    (folder / "run.json").write_text(json.dumps(record))
    run = RunSummary.load(folder / "run.json")
    assert run is not None
    return run


def test_the_page_lists_projects_by_start_and_shows_what_failed(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["zeta", "alpha", "<mid>"])
    junit = config.layout.project_dir("alpha") / "junit.xml"
    junit.parent.mkdir(parents=True)
    junit.write_text(FAILED_JUNIT)
    touch(tmp_path / "test-results" / "tests-test-orders-py-test-total-chromium" / "f.png")
    runs = [
        write_run(config, "alpha", 1000.0, result="failed", junit=str(junit)),
        write_run(config, "zeta", 990.0),
        write_run(
            config,
            "<mid>",
            995.0,
            result="error",
            error="server api exited with status 1",
            log_tail="connecting to postgresql://u:hunter2@db/x\n<FATAL> no table",
        ),
    ]
    page = write_html_report(config, runs).read_text()
    assert re.findall(r'<tr class="run [^"]*" data-project="([^"]+)"', page) == [
        "zeta",
        "&lt;mid&gt;",
        "alpha",
    ]
    assert 'class="run status-red" data-project="alpha"' in page
    assert 'class="track bar-red"' in page and 'class="track bar-green"' in page
    assert "tests.test_orders::test_total[chromium]" in page
    assert "AssertionError: &lt;b&gt;41&lt;/b&gt; != 42" in page  # escaped, not markup
    assert "&lt;FATAL&gt; no table" in page and "hunter2" not in page
    assert 'href="../test-results/tests-test-orders-py-test-total-chromium/f.png"' in page
    assert "1 passed, 1 failed" in page and "no JUnit" in page
    # A 4 ms phase on a 15 s axis still gets a bar (min-width in the CSS) and a hover title.
    assert 'title="ports: 0.00 s (from +0.00 s)"' in page and "min-width: 4px" in page
    assert "<script" not in page and "http" not in page.replace("postgresql://u:***@", "")


def test_only_the_latest_run_of_a_project_has_a_row(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a", "b"])
    old = write_run(config, "a", 100.0)
    new = dataclasses.replace(old, started_at=300.0, run_id="r2")
    b = write_run(config, "b", 200.0)
    assert latest_per_project([old, new, b]) == [(b, 0), (new, 1)]


def test_the_terminal_summary_has_counts_failures_and_the_log_tail(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["alpha", "beta"])
    junit = config.layout.project_dir("alpha") / "junit.xml"
    junit.parent.mkdir(parents=True)
    junit.write_text(FAILED_JUNIT)
    runs = [
        write_run(config, "alpha", 20.0, result="failed", junit=str(junit)),
        write_run(config, "beta", 10.0, result="error", log_tail="pw=x password=hunter2\nbye"),
    ]
    out = io.StringIO()
    merged = print_summary(config, runs, file=out)
    text = out.getvalue()
    assert text.index("beta") < text.index("alpha")  # by start time
    assert "1 passed, 1 failed" in text and "no JUnit" in text
    assert "tests.test_orders::test_total[chromium]: AssertionError: <b>41</b> != 42" in text
    assert "bye" in text and "hunter2" not in text
    assert merged == config.results_dir / "junit.xml"


# --- the live status ------------------------------------------------------------------------------


def test_following_a_run_reads_a_finished_projects_files_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, ["alpha", "beta"])
    since = time.time()
    write_run(config, "alpha", since + 1)  # alpha has finished
    StatusWriter(config)("beta", "suite")  # beta runs
    asked: list[list[str]] = []
    real = progress.read_statuses

    def counted(config: Config, projects: Any, since: float, **kw: Any) -> Any:
        asked.append(list(projects))
        return real(config, projects, since, **kw)

    monkeypatch.setattr(progress, "read_statuses", counted)
    ticks = iter(range(4))
    out = io.StringIO()
    last = progress.follow_run(
        config,
        ["alpha", "beta"],
        since,
        lambda: next(ticks) == 3,
        live=False,
        file=out,
        interval=0.001,
    )
    assert asked == [["alpha", "beta"], ["beta"], ["beta"], ["beta"]]
    assert [(s.project, s.phase, s.done) for s in last] == [
        ("alpha", "passed", True),
        ("beta", "suite", False),
    ]
    assert "alpha: passed" in out.getvalue() and "beta: suite" in out.getvalue()


def test_a_flaky_run_says_so_in_the_summary_the_page_and_the_merged_junit(
    tmp_path: Path,
) -> None:
    import xml.etree.ElementTree as ET

    config = make_config(tmp_path, ["alpha"])
    junit = config.layout.project_dir("alpha") / "junit.xml"
    junit.parent.mkdir(parents=True)
    junit.write_text(
        '<testsuite name="s"><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"/></testsuite>'
    )
    attempt = {"attempt": 1, "result": "failed", "error": None, "failed_tests": ["t::a"]}
    run = write_run(
        config,
        "alpha",
        10.0,
        result="flaky",
        junit=str(junit),
        attempts=[attempt],
        flaky_tests=["t::a"],
    )
    out = io.StringIO()
    merged = print_summary(config, [run], file=out)
    text = out.getvalue()
    assert "flaky" in text and "attempt 1 of 2 failed: failing: t::a" in text
    assert "flaky test (failed, then passed on a retry): t::a" in text
    assert merged is not None
    suite = ET.parse(merged).getroot().find("testsuite")
    assert suite is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props == {"e2e_infra.result": "flaky", "e2e_infra.attempts": "2"}
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["a"].find("flakyFailure") is not None and cases["b"].find("flakyFailure") is None
    page = write_html_report(config, [run]).read_text()
    assert 'class="run status-amber" data-project="alpha"' in page
    assert "flaky test (failed, then passed on a retry): t::a" in page
    assert 'class="strip"' in page and 'data-result="flaky"' in page
