"""History: each project's last results from the records runs left; what flipped."""

from __future__ import annotations

import os
from pathlib import Path

from support.configs import make_config

from e2e_infra.config import Config
from e2e_infra.report.history import flaky_report, history, html_history
from e2e_infra.results.record import Result, RunRecord


def _config(tmp_path: Path) -> Config:
    return make_config(tmp_path, projects={"web": {"command": "true"}, "api": {"command": "true"}})


def _record(
    config: Config,
    run: str,
    project: str,
    result: Result,
    *,
    at: float,
    duration: float = 2.0,
    junit: str | None = None,
    flaky: tuple[str, ...] = (),
) -> RunRecord:
    folder = config.results_dir / run / project
    folder.mkdir(parents=True, exist_ok=True)
    path = None
    if junit is not None:
        path = folder / "junit.xml"
        path.write_text(junit)
    record = RunRecord(
        project=project,
        run_id=run,
        started_at=at,
        result=result,
        duration=duration,
        junit=str(path) if path else None,
        flaky_tests=flaky,
    )
    return record.write(folder / "run.json")


def _junit(failing: set[str]) -> str:
    cases = "".join(
        f'<testcase classname="s" name="{n}">'
        + ('<failure message="x"/>' if n in failing else "")
        + "</testcase>"
        for n in ("one", "two")
    )
    return f"<testsuite>{cases}</testsuite>"


def test_the_strip_and_trend_show_the_last_runs_oldest_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    results = [Result.PASSED, Result.FAILED, Result.FLAKY, Result.ERROR, Result.PASSED]
    for i, result in enumerate(results):
        _record(config, f"r{i}", "web", result, at=1000.0 + i, duration=1.0 + i)
    os.symlink("r4", config.results_dir / "latest")  # read once, not twice
    item = history(config, "web", runs=4)
    assert item.strip == "✗~E✓"
    # Errors say nothing about the suite's duration: 2, 3, 5 seconds.
    assert item.durations == [2.0, 3.0, 5.0]
    assert item.sparkline == "▁▃█"
    assert item.trend.startswith("▁▃█ 5.0s (median 3.0s, +67%")
    # failed -> flaky (ok) -> error -> passed: three changes, and one flaky run.
    assert item.flips == 4
    assert [entry["result"] for entry in item.to_json()] == ["failed", "flaky", "error", "passed"]
    assert history(config, "api").runs == ()


def test_flaky_lists_projects_and_tests_that_flipped(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _record(config, "r1", "web", Result.PASSED, at=1.0, junit=_junit(set()))
    _record(config, "r2", "web", Result.FAILED, at=2.0, junit=_junit({"one"}))
    _record(config, "r3", "web", Result.PASSED, at=3.0, junit=_junit(set()))
    for i in range(3):  # failing steadily, then flaky once
        _record(config, f"r{i + 1}", "api", Result.FAILED, at=float(i), junit=_junit({"two"}))
    _record(config, "r4", "api", Result.FLAKY, at=9.0, junit=_junit(set()), flaky=("s::two",))
    report = flaky_report(config, runs=10)
    assert [(p.project, p.flips) for p in report.projects] == [("api", 2), ("web", 2)]
    tests = {(t.project, t.name): t for t in report.tests}
    assert set(tests) == {("web", "s::one"), ("api", "s::two")}
    one = tests[("web", "s::one")]
    assert (one.failed, one.passed, one.flaky, one.last) == (1, 2, 0, "passed")
    two = tests[("api", "s::two")]
    assert (two.failed, two.flaky, two.last) == (3, 1, "passed")
    assert report.to_json()["projects"][1]["strip"] == "✓✗✓"
    # Only the last run of api: flaky once, and one test flaky in it.
    recent = flaky_report(config, ["api"], runs=1)
    assert [p.project for p in recent.projects] == ["api"]
    assert [t.name for t in recent.tests] == ["s::two"]


def test_the_report_draws_one_box_per_run_and_a_trend_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    runs = [
        _record(config, f"r{i}", "web", result, at=float(i), duration=float(i + 1))
        for i, result in enumerate([Result.PASSED, Result.FLAKY, Result.FAILED])
    ]
    page = html_history(history(config, "web"), runs[-1])
    assert page.count("<i ") == 3
    assert 'data-result="flaky"' in page and 'class="h-red current"' in page
    assert "<polyline" in page
