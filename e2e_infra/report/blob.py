"""What a Playwright Test blob report says: every test's outcome, and a JUnit file made from it.

The tool adds Playwright's ``blob`` reporter to every Playwright Test run (see
:mod:`e2e_infra.run.playwright`), whatever reporters the team's config names: a config with only
``list`` and ``html`` (the common setup) writes no JUnit file, so without this a failed project
showed no failing test at all. A blob is a zip: ``report.jsonl`` holds the reporter events
(``onConfigure`` with the config's ``rootDir``, ``onProject`` with the tree of suites and tests,
``onTestEnd`` with each result's status and errors, ``onAttach`` with each attachment, stored in
the zip under ``resources/``). Format version 2 (Playwright 1.5x-1.65) is read here; another
version is said, never guessed.

:func:`junit_from_blobs` turns a run's blobs into a JUnit file in the project's folder (the
failing tests' attachments taken out of the zip next to it, linked as ``[[ATTACHMENT|path]]``, the
convention Playwright's own JUnit reporter uses), so the summary, ``report.html`` and the run's
merged JUnit show the failing tests: name, message, location and attachments.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conninfo import mask_secrets

__all__ = [
    "BlobError",
    "BlobTest",
    "Outcome",
    "junit_from_blobs",
    "read_blob",
    "root_dir",
    "strip_ansi",
]

BLOB_VERSIONS = (1, 2)  # report.jsonl formats read here
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MAX_MESSAGE = 4000  # characters of a failure's text in the JUnit file
_MAX_ATTACHMENT_BYTES = 200 * 1024 * 1024  # a larger one stays in the blob only
_SKIPPED = "skipped"  # a result's status (test.skip())
TITLE_SEPARATOR = " \u203a "


class Outcome(enum.Enum):
    """A test's outcome over its retries, in Playwright's own words."""

    EXPECTED = "expected"
    UNEXPECTED = "unexpected"
    FLAKY = "flaky"  # unexpected, then expected on a retry
    SKIPPED = "skipped"


class BlobError(ValueError):
    """A blob this module cannot read (not a zip, no events, another format version)."""


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (Playwright colours its error messages)."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    member: str | None  # its path inside the zip (None: inline body, not a file)


@dataclass
class BlobTest:
    """One test of the blob and every result it had (retries included)."""

    test_id: str
    title: str  # its title path below the file, joined with TITLE_SEPARATOR
    file: str  # relative to the config's rootDir
    line: int = 0
    column: int = 0
    project: str = ""
    expected: str = "passed"
    statuses: list[str] = field(default_factory=list)
    errors: list[Mapping[str, Any]] = field(default_factory=list)  # of its last result
    attachments: list[Attachment] = field(default_factory=list)  # of its last result
    seconds: float = 0.0

    @property
    def outcome(self) -> Outcome:
        if not self.statuses or self.statuses[-1] == _SKIPPED:
            return Outcome.SKIPPED
        if self.statuses[-1] == self.expected:
            retried = any(s != self.expected for s in self.statuses[:-1])
            return Outcome.FLAKY if retried else Outcome.EXPECTED
        return Outcome.UNEXPECTED

    def message(self) -> str:
        """Its errors, colour codes removed, with the location of the first."""
        parts = []
        for error in self.errors:
            text = strip_ansi(str(error.get("message") or error.get("value") or "")).strip()
            location = error.get("location")
            if isinstance(location, Mapping) and location.get("file"):
                where = f"{location['file']}:{location.get('line')}:{location.get('column')}"
                text += f"\n    at {where}"
            parts.append(text)
        return "\n\n".join(part for part in parts if part) or f"test {self.statuses[-1]}"


@dataclass(frozen=True)
class BlobReport:
    version: int
    root_dir: str
    tests: tuple[BlobTest, ...]


def _events(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".jsonl")]
            if not names:
                raise BlobError(f"{path.name} holds no report.jsonl")
            with archive.open(names[0]) as handle:
                for raw in handle:
                    if raw.strip():
                        event = json.loads(raw)
                        yield str(event.get("method")), event.get("params")
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        if isinstance(exc, BlobError):
            raise
        raise BlobError(f"{path.name} is not a readable blob report ({exc})") from None


def root_dir(path: Path) -> str | None:
    """The ``rootDir`` a blob was recorded with (what ``merge-reports`` groups by); None when
    the blob cannot be read."""
    with contextlib.suppress(BlobError):
        for method, params in _events(path):
            if method == "onConfigure" and isinstance(params, Mapping):
                value = (params.get("config") or {}).get("rootDir")
                return str(value) if value else None
    return None


def _walk_suites(
    suites: Sequence[Mapping[str, Any]], titles: tuple[str, ...], out: list[Any]
) -> None:
    for suite in suites:
        for entry in suite.get("entries") or ():
            if "testId" in entry:
                out.append((entry, titles))
            else:  # a describe block
                _walk_suites([entry], (*titles, str(entry.get("title") or "")), out)


def read_blob(path: Path) -> BlobReport:
    """Every test of the blob at ``path``; :class:`BlobError` when it cannot be read."""
    version = 0
    root = ""
    tests: dict[str, BlobTest] = {}
    results: dict[str, str] = {}  # result id -> test id
    for method, params in _events(path):
        if not isinstance(params, Mapping):
            continue
        if method == "onBlobReportMetadata":
            version = int(params.get("version") or 0)
            if version not in BLOB_VERSIONS:
                raise BlobError(
                    f"{path.name} is a blob of format {version}; this e2e-infra reads formats "
                    f"{', '.join(map(str, BLOB_VERSIONS))} (see its Playwright HTML report instead)"
                )
        elif method == "onConfigure":
            root = str((params.get("config") or {}).get("rootDir") or "")
        elif method == "onProject":
            project = params.get("project") or {}
            entries: list[Any] = []
            for suite in project.get("suites") or ():
                _walk_suites([suite], (), entries)
            for entry, titles in entries:
                location = entry.get("location") or {}
                tests[str(entry["testId"])] = BlobTest(
                    test_id=str(entry["testId"]),
                    title=TITLE_SEPARATOR.join(
                        (*[t for t in titles if t], str(entry.get("title") or "?"))
                    ),
                    file=str(location.get("file") or ""),
                    line=int(location.get("line") or 0),
                    column=int(location.get("column") or 0),
                    project=str(project.get("name") or ""),
                )
        elif method == "onTestBegin":
            result = params.get("result") or {}
            results[str(result.get("id"))] = str(params.get("testId"))
            test = tests.get(str(params.get("testId")))
            if test is not None:
                test.attachments = []  # a retry: only its last result's attachments
        elif method == "onAttach":
            test = tests.get(str(params.get("testId")))
            if test is not None:
                for item in params.get("attachments") or ():
                    test.attachments.append(
                        Attachment(
                            name=str(item.get("name") or "attachment"),
                            content_type=str(item.get("contentType") or ""),
                            member=str(item["path"]) if item.get("path") else None,
                        )
                    )
        elif method == "onTestEnd":
            info, result = params.get("test") or {}, params.get("result") or {}
            test = tests.get(str(info.get("testId")))
            if test is None:
                continue
            test.expected = str(info.get("expectedStatus") or "passed")
            test.statuses.append(str(result.get("status") or "failed"))
            test.errors = list(result.get("errors") or ())
            test.seconds += float(result.get("duration") or 0.0) / 1000.0
            for item in result.get("attachments") or ():  # format 1 put them here
                test.attachments.append(
                    Attachment(
                        name=str(item.get("name") or "attachment"),
                        content_type=str(item.get("contentType") or ""),
                        member=str(item["path"]) if item.get("path") else None,
                    )
                )
    if version == 0:
        raise BlobError(f"{path.name} has no blob metadata: not a Playwright blob report")
    return BlobReport(version, root, tuple(tests.values()))


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:limit] or "x"


def _extract(blob: Path, test: BlobTest, folder: Path) -> list[Path]:
    """The test's file attachments, taken out of the blob into ``folder``."""
    out: list[Path] = []
    members = [a for a in test.attachments if a.member]
    if not members:
        return out
    seen: set[str] = set()
    with zipfile.ZipFile(blob) as archive:
        known = set(archive.namelist())
        for attachment in members:
            member = str(attachment.member)
            if member not in known or archive.getinfo(member).file_size > _MAX_ATTACHMENT_BYTES:
                continue
            name = _slug(attachment.name) + Path(member).suffix
            while name in seen:
                name = f"{Path(name).stem}-{len(seen)}{Path(name).suffix}"
            seen.add(name)
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = folder / name
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            out.append(target)
    return out


def junit_from_blobs(
    blobs: Sequence[Path], out: Path, attachments: Path, *, secrets: Sequence[str] = ()
) -> Path | None:
    """Write ``out``, a JUnit file of every test in ``blobs``; the failing tests' attachments go to
    ``attachments/<n>-<test>/``. None when no blob could be read (nothing written)."""
    reports: list[tuple[Path, BlobReport]] = []
    for blob in blobs:
        with contextlib.suppress(BlobError):
            reports.append((blob, read_blob(blob)))
    if not reports:
        return None
    shutil.rmtree(attachments, ignore_errors=True)  # an earlier attempt's, in this folder
    root = ET.Element("testsuites", name="Playwright Test (from its blob report, by e2e-infra)")
    suites: dict[str, ET.Element] = {}
    totals = {"tests": 0, "failures": 0, "skipped": 0, "errors": 0}
    hidden = tuple(secrets)
    failing = 0
    for blob, report in reports:
        for test in report.tests:
            suite = suites.get(test.file)
            if suite is None:
                suite = suites[test.file] = ET.SubElement(root, "testsuite", name=test.file)
            case = ET.SubElement(
                suite,
                "testcase",
                name=test.title,
                classname=test.file,
                time=f"{test.seconds:.3f}",
                file=test.file,
                line=str(test.line),
            )
            totals["tests"] += 1
            outcome = test.outcome
            if outcome is Outcome.SKIPPED:
                totals["skipped"] += 1
                ET.SubElement(case, "skipped")
            elif outcome is Outcome.UNEXPECTED:
                totals["failures"] += 1
                failing += 1
                text = mask_secrets(test.message(), hidden)[:_MAX_MESSAGE]
                first = text.partition("\n")[0]
                failure = ET.SubElement(case, "failure", message=first, type=test.statuses[-1])
                failure.text = f"{text}\n\n{test.file}:{test.line}:{test.column}"
                folder = attachments / f"{failing}-{_slug(test.title, 40)}"
                try:
                    files = _extract(blob, test, folder)
                except (OSError, zipfile.BadZipFile):
                    files = []
                if files:
                    out_dir = out.parent
                    lines = [f"[[ATTACHMENT|{os.path.relpath(f, out_dir)}]]" for f in files]
                    ET.SubElement(case, "system-out").text = "\n" + "\n".join(lines) + "\n"
            elif outcome is Outcome.FLAKY:
                ET.SubElement(case, "properties").append(
                    ET.Element("property", name="flaky", value="passed on a retry")
                )
    for element in suites.values():
        cases = list(element.iter("testcase"))
        element.set("tests", str(len(cases)))
        element.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
        element.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))
        element.set("errors", "0")
    for key, value in totals.items():
        root.set(key, str(value))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out)
    return out
