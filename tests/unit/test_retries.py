"""Retries: a failed attempt is set aside, the next runs afresh, a pass after a failure is flaky."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.configs import make_config

from e2e_infra.errors import UsageError
from e2e_infra.results.layout import Layout
from e2e_infra.results.record import Result, RunRecord
from e2e_infra.run.retries import mark_flaky, run_with_retries, with_retries

PASSING = """<testsuite tests="2"><testcase classname="t" name="a"/>
<testcase classname="t" name="b"/></testsuite>"""
FAILING_A = """<testsuite tests="2"><testcase classname="t" name="a"><failure message="boom"/>
</testcase><testcase classname="t" name="b"/></testsuite>"""
# Playwright Test's JUnit with PLAYWRIGHT_JUNIT_INCLUDE_RETRIES: passed on its own retry.
PLAYWRIGHT_FLAKY = """<testsuites><testsuite name="x.spec.ts" tests="2">
<testcase classname="x.spec.ts" name="logs in"><flakyFailure message="expected 200" type="FAILURE">
<stackTrace>Error</stackTrace></flakyFailure></testcase>
<testcase classname="x.spec.ts" name="logs out"/></testsuite></testsuites>"""


class Attempts:
    """Writes what a session leaves in the project's folder: run.json, junit.xml, a log."""

    def __init__(self, folder: Path, outcomes: list[tuple[Result, str | None]]) -> None:
        self.folder = folder
        self.outcomes = outcomes
        self.calls: list[bool] = []

    def __call__(self, last: bool) -> RunRecord:
        self.calls.append(last)
        result, junit = self.outcomes[len(self.calls) - 1]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "backend.log").write_text(f"attempt {len(self.calls)}\n")
        (self.folder / "status.json").write_text("{}")
        path = None
        if junit is not None:
            path = self.folder / "junit.xml"
            path.write_text(junit)
        record = RunRecord(
            project="p",
            run_id=f"run-{len(self.calls)}",
            started_at=time.time(),
            result=result,
            duration=1.5,
            junit=str(path) if path else None,
            error="the suite failed" if not result.ok else None,
        )
        return record.write(Layout.record(self.folder))


def test_a_project_that_passes_on_a_retry_is_flaky_and_names_the_tests(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "run1" / "p"
    attempts = Attempts(folder, [(Result.FAILED, FAILING_A), (Result.PASSED, PASSING)])
    record = run_with_retries("p", 2, attempts)
    assert attempts.calls == [False, False]  # it passed: no third attempt
    assert record.result is Result.FLAKY and record.result.ok
    assert record.flaky_tests == ("t::a",)
    assert [a["result"] for a in record.attempts] == ["failed"]
    assert record.attempts[0]["failed_tests"] == ["t::a"]
    # The record on disk says the same, and the failed attempt is set aside, not a second record.
    again = RunRecord.load(Layout.record(folder))
    assert again is not None and again.result is Result.FLAKY and again.attempt_count == 2
    moved = Layout.attempt_dir(folder, 1)
    assert (moved / "run.json").is_file() and (moved / "backend.log").read_text() == "attempt 1\n"
    assert (folder / "status.json").is_file()  # the live status stays where the table reads it
    records = Layout(tmp_path / "results", "run1").records("p")
    assert [r.run_id for r in records] == ["run-2"]
    assert any("attempt 1 of 2 failed" in note for note in record.notes())
    assert any("flaky test" in note and "t::a" in note for note in record.notes())


def test_a_project_that_fails_every_attempt_stays_failed_with_its_attempts(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "p"
    attempts = Attempts(folder, [(Result.FAILED, FAILING_A), (Result.ERROR, None)])
    record = run_with_retries("p", 1, attempts)
    assert attempts.calls == [False, True]  # the last one may keep its database
    assert record.result is Result.ERROR
    assert record.flaky_tests == () and len(record.attempts) == 1


@pytest.mark.parametrize("result", [Result.PASSED, Result.INTERRUPTED])
def test_no_retry_after_a_pass_or_an_interrupt(tmp_path: Path, result: Result) -> None:
    attempts = Attempts(tmp_path / "p", [(result, None), (Result.PASSED, None)])
    record = run_with_retries("p", 3, attempts)
    assert len(attempts.calls) == 1 and record.result is result and record.attempts == ()


def test_no_retries_runs_once_and_leaves_the_record_alone(tmp_path: Path) -> None:
    attempts = Attempts(tmp_path / "p", [(Result.FAILED, FAILING_A)])
    record = run_with_retries("p", 0, attempts)
    assert attempts.calls == [True] and record.result is Result.FAILED
    assert not (tmp_path / "p" / "attempts").exists()


def test_tests_playwright_retried_itself_make_a_passing_run_flaky(tmp_path: Path) -> None:
    record = Attempts(tmp_path / "p", [(Result.PASSED, PLAYWRIGHT_FLAKY)])(True)
    settled = mark_flaky(record, [])
    assert settled.result is Result.FLAKY
    assert settled.flaky_tests == ("x.spec.ts::logs in",)
    loaded = RunRecord.load(Layout.record(tmp_path / "p"))
    assert loaded is not None and loaded.flaky_tests == settled.flaky_tests


def test_the_command_line_overrides_every_projects_retries(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, projects={"a": {"command": "true", "retries": 2}, "b": {"command": "true"}}
    )
    assert config.projects["a"].retries == 2 and config.projects["b"].retries == 0
    assert with_retries(config, None) is config
    assert {p.retries for p in with_retries(config, 1).projects.values()} == {1}
    with pytest.raises(UsageError, match="--retries"):
        with_retries(config, -2)
