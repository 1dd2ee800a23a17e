"""Reading a suite's JUnit file: counts, failing tests and their messages, and never a crash."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.report.junit import JUnitSummary, parse_junit_text, read_junit

PYTEST = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.test_login" name="test_ok" time="0.1"/>
<testcase classname="tests.test_login" name="test_also_ok" time="0.1"/>
<testcase classname="tests.test_orders" name="test_total[chromium]">
  <failure message="AssertionError: total is 41.00, expected 42.00">page = ...
&gt;   assert total == 42
E   AssertionError: total is 41.00, expected 42.00</failure>
</testcase>
<testcase classname="tests.test_orders" name="test_export"><skipped message="no S3"/></testcase>
<testcase classname="tests.test_orders" name="test_db">
  <error message="failed on setup with &quot;psycopg.OperationalError: connection to
postgresql://app:hunter2@127.0.0.1:5432/app failed&quot;">trace</error>
</testcase>
</testsuite></testsuites>
"""

PLAYWRIGHT = """<testsuites id="" name="" tests="2" failures="1" skipped="0" errors="0">
<testsuite name="login.spec.ts" tests="2" failures="1">
<testcase name="logs in" classname="login.spec.ts" time="1.2"></testcase>
<testcase name="shows the orders" classname="login.spec.ts" time="3.4">
<failure message="login.spec.ts:12:5 shows the orders" type="FAILURE">
<![CDATA[Error: expect(locator).toHaveText(expected)

Expected string: "42.00"
Received string: "41.00"
]]></failure></testcase></testsuite></testsuites>
"""


def test_a_pytest_file_gives_each_outcome_and_each_failing_test() -> None:
    summary = parse_junit_text(PYTEST)
    assert (summary.passed, summary.failed, summary.errors, summary.skipped) == (2, 1, 1, 1)
    assert summary.total == 5 and summary.problem is None
    assert summary.text() == "2 passed, 1 failed, 1 errors, 1 skipped"
    names = [(f.name, f.kind) for f in summary.failures]
    assert names == [
        ("tests.test_orders::test_total[chromium]", "failure"),
        ("tests.test_orders::test_db", "error"),
    ]
    first = summary.failures[0]
    assert first.first_line == "AssertionError: total is 41.00, expected 42.00"
    assert "E   AssertionError" in first.message


def test_passwords_in_messages_are_masked() -> None:
    summary = parse_junit_text(PYTEST)
    message = summary.failures[1].message
    assert "hunter2" not in message and "postgresql://app:***@127.0.0.1" in message
    secret = parse_junit_text(PYTEST, secrets=("41.00",))
    assert "41.00" not in secret.failures[0].message


def test_a_playwright_file_gives_the_message_and_the_error_under_it() -> None:
    summary = parse_junit_text(PLAYWRIGHT)
    assert (summary.passed, summary.failed) == (1, 1)
    failure = summary.failures[0]
    assert failure.name == "login.spec.ts::shows the orders"
    assert failure.message.splitlines() == [
        "login.spec.ts:12:5 shows the orders",
        "Error: expect(locator).toHaveText(expected)",
        'Expected string: "42.00"',
        'Received string: "41.00"',
    ]


def test_a_bare_testsuite_and_a_file_without_cases_count_too() -> None:
    bare = parse_junit_text('<testsuite><testcase name="t"/><testcase name="u"/></testsuite>')
    assert bare.text() == "2 passed" and bare.failures == ()
    assert bare.failures == () and parse_junit_text("<testsuite/>").text() == "0 tests"
    totals = parse_junit_text('<testsuite tests="7" failures="2" errors="x" skipped="1"/>')
    assert (totals.passed, totals.failed, totals.skipped) == (4, 2, 1)


def test_long_messages_are_cut_to_their_first_lines() -> None:
    lines = "\n".join(f"line {i} " + "x" * 400 for i in range(30))
    text = f'<testsuite><testcase name="t"><failure>{lines}</failure></testcase></testsuite>'
    message = parse_junit_text(text).failures[0].message
    assert len(message.splitlines()) == 6
    assert all(len(line) <= 300 for line in message.splitlines())


def test_a_missing_empty_or_corrupt_file_says_so(tmp_path: Path) -> None:
    assert read_junit(None).problem == "no JUnit"
    assert read_junit(tmp_path / "absent.xml").text() == "no JUnit"
    empty = tmp_path / "empty.xml"
    empty.write_text("")
    assert read_junit(empty).problem == "unreadable JUnit (empty file)"
    corrupt = tmp_path / "corrupt.xml"
    corrupt.write_text('<testsuite><testcase name="t">')  # a suite killed mid-write
    problem = read_junit(corrupt).problem
    assert problem is not None and problem.startswith("unreadable JUnit (")
    other = tmp_path / "other.xml"
    other.write_text("<html><body/></html>")
    assert read_junit(other).problem == "unreadable JUnit (root element <html>)"
    assert read_junit(tmp_path).problem is not None  # a folder, not a file


def test_an_entity_bomb_is_refused_not_expanded() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE t [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
        + ']><testsuite><testcase name="t"><failure>&i;</failure></testcase></testsuite>'
    )
    summary = parse_junit_text(bomb)
    assert summary.problem is not None or len(summary.failures[0].message) < 10_000


@given(st.binary(max_size=300))
def test_no_input_makes_it_raise(data: bytes) -> None:
    assert isinstance(parse_junit_text(data), JUnitSummary)


# Playwright Test's JUnit reporter with PLAYWRIGHT_JUNIT_INCLUDE_RETRIES=1 (the tool sets it): a
# test that passed on a retry keeps its failure as <flakyFailure>; one that never passed has
# <rerunFailure> entries beside its <failure>.
PLAYWRIGHT_RETRIES = """<testsuites><testsuite name="login.spec.ts" tests="3" failures="1">
<testcase name="logs in" classname="login.spec.ts" time="1.2">
<flakyFailure message="expect(page).toHaveURL" type="FAILURE" time="0.8"><stackTrace>Error
</stackTrace></flakyFailure></testcase>
<testcase name="logs out" classname="login.spec.ts" time="0.4"></testcase>
<testcase name="shows orders" classname="login.spec.ts" time="3.4">
<rerunFailure message="again" type="FAILURE" time="1"/>
<failure message="login.spec.ts:12:5 shows orders" type="FAILURE">Error: no</failure>
</testcase></testsuite></testsuites>"""


def test_a_test_that_passed_on_the_runners_own_retry_is_counted_and_named_flaky() -> None:
    summary = parse_junit_text(PLAYWRIGHT_RETRIES)
    assert (summary.passed, summary.failed) == (2, 1)
    assert summary.flaky == ("login.spec.ts::logs in",)
    assert summary.passed_tests == ("login.spec.ts::logs in", "login.spec.ts::logs out")
    assert summary.text() == "2 passed, 1 flaky, 1 failed"
    assert [f.name for f in summary.failures] == ["login.spec.ts::shows orders"]
