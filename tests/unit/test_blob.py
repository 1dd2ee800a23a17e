"""A Playwright blob report read in Python: outcomes over retries, errors, attachments, JUnit."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from e2e_infra.report.blob import BlobError, Outcome, junit_from_blobs, read_blob, root_dir
from e2e_infra.report.junit import read_junit


def _blob(path: Path, events: list[dict[str, Any]], files: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("report.jsonl", "\n".join(json.dumps(e) for e in events) + "\n")
        for name, data in (files or {}).items():
            archive.writestr(name, data)
    return path


def _entry(test_id: str, title: str, line: int) -> dict[str, Any]:
    return {"testId": test_id, "title": title, "location": {"file": "a/x.spec.ts", "line": line}}


def _end(test_id: str, status: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    result = {"id": f"r-{test_id}-{status}", "duration": 1500, "status": status}
    return {
        "method": "onTestEnd",
        "params": {
            "test": {"testId": test_id, "expectedStatus": "passed"},
            "result": {**result, "errors": errors or []},
        },
    }


EVENTS: list[dict[str, Any]] = [
    {"method": "onBlobReportMetadata", "params": {"version": 2}},
    {"method": "onConfigure", "params": {"config": {"rootDir": "/repo/e2e"}}},
    {
        "method": "onProject",
        "params": {
            "project": {
                "name": "api",
                "suites": [
                    {
                        "title": "a/x.spec.ts",
                        "entries": [
                            _entry("t1", "passes", 3),
                            {"title": "orders", "entries": [_entry("t2", "retried", 7)]},
                            _entry("t3", "fails", 9),
                            _entry("t4", "skipped", 12),
                        ],
                    }
                ],
            }
        },
    },
    _end("t1", "passed"),
    _end("t2", "failed", [{"message": "boom"}]),
    _end("t2", "passed"),
    {"method": "onTestBegin", "params": {"testId": "t3", "result": {"id": "r3"}}},
    {
        "method": "onAttach",
        "params": {
            "testId": "t3",
            "attachments": [{"name": "screenshot", "path": "resources/ab.png"}],
        },
    },
    _end(
        "t3",
        "failed",
        [
            {
                "message": "\x1b[31mError: expected 99\x1b[39m\nReceived: 12",
                "location": {"file": "/repo/e2e/a/x.spec.ts", "line": 10, "column": 5},
            }
        ],
    ),
    _end("t4", "skipped"),
]


def test_outcomes_over_retries_are_playwrights_own(tmp_path: Path) -> None:
    report = read_blob(_blob(tmp_path / "b.zip", EVENTS))
    outcomes = {t.title: t.outcome for t in report.tests}
    assert outcomes == {
        "passes": Outcome.EXPECTED,
        "orders \u203a retried": Outcome.FLAKY,
        "fails": Outcome.UNEXPECTED,
        "skipped": Outcome.SKIPPED,
    }
    assert report.root_dir == "/repo/e2e" == root_dir(tmp_path / "b.zip")


def test_the_junit_made_from_it_names_each_failure_with_its_location_and_files(
    tmp_path: Path,
) -> None:
    blob = _blob(tmp_path / "b.zip", EVENTS, {"resources/ab.png": b"png"})
    out = junit_from_blobs([blob], tmp_path / "p" / "junit.xml", tmp_path / "p" / "attachments")
    assert out is not None
    summary = read_junit(out)
    assert (summary.passed, summary.failed, summary.skipped) == (2, 1, 1)
    [failure] = summary.failures
    assert failure.name == "a/x.spec.ts::fails"
    assert failure.message.splitlines()[:2] == ["Error: expected 99", "Received: 12"]
    assert failure.location == "a/x.spec.ts:9"
    [shot] = failure.attachments
    assert Path(shot) == tmp_path / "p" / "attachments" / "1-fails" / "screenshot.png"
    assert Path(shot).read_bytes() == b"png"


def test_another_format_is_said_never_guessed(tmp_path: Path) -> None:
    blob = _blob(tmp_path / "b.zip", [{"method": "onBlobReportMetadata", "params": {"version": 9}}])
    with pytest.raises(BlobError, match="format 9"):
        read_blob(blob)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert junit_from_blobs([tmp_path / "junk.zip"], tmp_path / "j.xml", tmp_path / "a") is None
    assert not (tmp_path / "j.xml").exists()
