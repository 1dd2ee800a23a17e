"""What a suite's JUnit XML says: counts, and each failing test with the first lines of its message.

Read with :mod:`xml.etree` (Python's expat refuses entity expansion bombs) and never raises: a
missing, unreadable or corrupt file gives a :class:`JUnitSummary` whose ``problem`` says so
("no JUnit", "unreadable JUnit: ..."), which the summary and the report show instead of counts.
Works with pytest's, Playwright Test's and most other runners' files: ``<testsuites>`` or a bare
``<testsuite>``, ``<failure>``/``<error>``/``<skipped>`` children of ``<testcase>``. A test case
that passed with ``<flakyFailure>``/``<flakyError>`` children (Surefire's convention, which
Playwright Test's JUnit reporter follows with ``PLAYWRIGHT_JUNIT_INCLUDE_RETRIES``) passed on a
retry: it counts as passed and is named in ``flaky``.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

from ..conninfo import mask_secrets

__all__ = [
    "FLAKY_TAGS",
    "MAX_JUNIT_BYTES",
    "FailedTest",
    "JUnitSummary",
    "case_name",
    "first_lines",
    "parse_junit_text",
    "read_junit",
]

MAX_JUNIT_BYTES = 50 * 1024 * 1024  # larger is a runaway log, not a test report
_MESSAGE_LINES = 6
_LINE_CHARS = 300
_MAX_FAILURES = 50  # per project; the file itself has the rest
# Playwright's JUnit reporter (and e2e-infra's, from a blob) name a test's files in its output.
_ATTACHMENT = re.compile(r"\[\[ATTACHMENT\|([^\]\n]+)\]\]")
_MAX_NAMES = 5000  # passing and flaky tests named per file (for history); counts stay exact
#: A passing test case's children that say it failed first and passed on a retry.
FLAKY_TAGS = ("flakyFailure", "flakyError")


@dataclass(frozen=True)
class FailedTest:
    """One failing (``failure``) or broken (``error``) test case."""

    name: str  # classname::name, or name alone
    kind: str  # "failure" | "error"
    message: str  # its first lines, secrets masked
    location: str = ""  # file:line, when the file says
    attachments: tuple[str, ...] = ()  # its files ([[ATTACHMENT|path]]), resolved when read

    @property
    def first_line(self) -> str:
        return self.message.partition("\n")[0]


@dataclass(frozen=True)
class JUnitSummary:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failures: tuple[FailedTest, ...] = ()
    problem: str | None = None  # why there are no counts: "no JUnit", "unreadable JUnit: ..."
    flaky: tuple[str, ...] = ()  # passed on a retry of the suite's own (counted in passed)
    passed_tests: tuple[str, ...] = ()  # the names of the tests that passed (flaky ones too)

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped

    def counts(self) -> list[tuple[str, int]]:
        """The non-zero counts, as ``(label, n)``, in a fixed order."""
        pairs = [
            ("passed", self.passed),
            ("flaky", len(self.flaky)),
            ("failed", self.failed),
            ("errors", self.errors),
            ("skipped", self.skipped),
        ]
        return [(label, n) for label, n in pairs if n]

    def text(self) -> str:
        """``"12 passed, 1 failed"``, ``"0 tests"``, or the problem."""
        if self.problem:
            return self.problem
        return ", ".join(f"{n} {label}" for label, n in self.counts()) or "0 tests"


def first_lines(text: str, lines: int = _MESSAGE_LINES) -> str:
    """The first ``lines`` non-blank lines of ``text``, each cut to a readable length."""
    out = []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        out.append(line if len(line) <= _LINE_CHARS else line[: _LINE_CHARS - 1] + "…")
        if len(out) == lines:
            break
    return "\n".join(out)


def _message(element: ET.Element) -> str:
    # pytest puts the short form in message= and the traceback in the text; Playwright Test
    # puts a summary in message= and the error with its code frame in the text.
    message = (element.get("message") or "").strip()
    text = (element.text or "").strip()
    if message and text and not text.startswith(message):
        return first_lines(f"{message}\n{text}")
    if text:  # it starts with the message: the message and what follows it
        return first_lines(text)
    return first_lines(message or element.get("type") or element.tag)


def _name(case: ET.Element) -> str:
    name = case.get("name") or "?"
    classname = case.get("classname") or ""
    return f"{classname}::{name}" if classname else name


def _location(case: ET.Element) -> str:
    file = case.get("file") or ""
    line = case.get("line") or ""
    return f"{file}:{line}" if file and line and line != "0" else file


def _attachments(case: ET.Element) -> tuple[str, ...]:
    texts = [element.text or "" for element in case.iter("system-out")]
    return tuple(dict.fromkeys(m.strip() for text in texts for m in _ATTACHMENT.findall(text)))


def case_name(case: ET.Element) -> str:
    """A ``<testcase>``'s name as :class:`FailedTest` and ``flaky`` give it: ``classname::name``."""
    return _name(case)


def _from_attributes(root: ET.Element) -> JUnitSummary:
    """Counts from ``<testsuite tests= failures= ...>`` when a file lists no test cases."""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            with contextlib.suppress(ValueError):
                totals[key] += int(suite.get(key) or 0)
    failed, errors, skipped = totals["failures"], totals["errors"], totals["skipped"]
    return JUnitSummary(
        passed=max(0, totals["tests"] - failed - errors - skipped),
        failed=failed,
        errors=errors,
        skipped=skipped,
    )


def parse_junit_text(text: str | bytes, *, secrets: tuple[str, ...] = ()) -> JUnitSummary:
    """Parse a JUnit document; a corrupt one gives a summary with ``problem`` set."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        return JUnitSummary(problem=f"unreadable JUnit ({exc})")
    if root.tag not in ("testsuites", "testsuite"):
        return JUnitSummary(problem=f"unreadable JUnit (root element <{root.tag}>)")
    cases = list(root.iter("testcase"))
    if not cases:
        return _from_attributes(root)
    passed = failed = errors = skipped = 0
    failures: list[FailedTest] = []
    flaky: list[str] = []
    passed_tests: list[str] = []
    for case in cases:
        failure = case.find("failure")
        error = case.find("error")
        if failure is not None or error is not None:
            # pytest reports a teardown error of a failed test as both: count it once, as failed.
            if failure is not None:
                failed += 1
            else:
                errors += 1
            if len(failures) < _MAX_FAILURES:
                for kind, element in (("failure", failure), ("error", error)):
                    if element is not None:
                        message = mask_secrets(_message(element), secrets)
                        failures.append(
                            FailedTest(
                                _name(case), kind, message, _location(case), _attachments(case)
                            )
                        )
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
            if len(passed_tests) < _MAX_NAMES:
                passed_tests.append(_name(case))
            if len(flaky) < _MAX_NAMES and any(case.find(tag) is not None for tag in FLAKY_TAGS):
                flaky.append(_name(case))
    return JUnitSummary(
        passed,
        failed,
        errors,
        skipped,
        tuple(failures),
        flaky=tuple(flaky),
        passed_tests=tuple(passed_tests),
    )


def read_junit(path: str | Path | None, *, secrets: tuple[str, ...] = ()) -> JUnitSummary:
    """Read the JUnit file at ``path``; never raises (see the module docstring)."""
    if not path:
        return JUnitSummary(problem="no JUnit")
    file = Path(path)
    try:
        if file.stat().st_size > MAX_JUNIT_BYTES:
            return JUnitSummary(problem="unreadable JUnit (larger than 50 MB)")
        data = file.read_bytes()
    except FileNotFoundError:
        return JUnitSummary(problem="no JUnit")
    except OSError as exc:
        return JUnitSummary(problem=f"unreadable JUnit ({exc.strerror or exc})")
    if not data.strip():
        return JUnitSummary(problem="unreadable JUnit (empty file)")
    summary = parse_junit_text(data, secrets=secrets)
    if not any(failure.attachments for failure in summary.failures):
        return summary
    base = file.parent  # attachments are named relative to the JUnit file's folder
    failures = tuple(
        replace(f, attachments=tuple(str(base / a) for a in f.attachments))
        for f in summary.failures
    )
    return replace(summary, failures=failures)
