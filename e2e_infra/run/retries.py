"""Retries and flaky marking: a project that did not pass runs again, on fresh resources.

``retries = N`` in a project's table (or ``--retries N`` on the command line) lets a project whose
run failed (its suite failed, or a server or the database did: any result but an interruption)
run again, up to N times, each attempt a whole new session (ports, database, servers, suite,
release). :func:`run_with_retries` is that loop, once for every runner: ``run_project`` (which
``invoke e2e.run``, the pool's workers and the nox sessions all call) goes through it.

Before the next attempt, what the failed one left in the project's folder (its ``run.json``,
JUnit file, server logs, Playwright outputs) moves to ``attempts/<n>/``, where no reader of run
records looks (the summary counts the project once), and a summary of it (result, duration,
error, failing tests, folder) goes into the final record's ``attempts``.

:func:`mark_flaky` then settles the final record: a project that passed after failing is
``flaky``, not ``passed``; so is one whose suite passed only because its runner retried some
tests itself (Playwright Test's ``retries``, reported in its JUnit file, see
:mod:`e2e_infra.report.junit`). Either way the tests that failed then passed are named in
``flaky_tests``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..results.layout import Layout
from ..results.record import Result, RunRecord

__all__ = ["attempt_summary", "mark_flaky", "run_with_retries", "with_retries"]

log = logging.getLogger("e2e_infra")

# What stays in a project's folder when an attempt's files move: the live status, the folders
# of other runs and of earlier attempts.
_STAYS = frozenset({"status.json", "runs", "attempts"})


def with_retries(config: Config, retries: int | None) -> Config:
    """``config`` with every project's ``retries`` set to ``retries`` (None: as configured)."""
    if retries is None:
        return config
    if retries < 0:
        from ..errors import UsageError

        raise UsageError(f"--retries must be 0 or more, got {retries}")
    projects = {name: replace(p, retries=retries) for name, p in config.projects.items()}
    return replace(config, projects=projects)


def run_with_retries(project: str, retries: int, attempt: Callable[[bool], RunRecord]) -> RunRecord:
    """Run ``attempt(last)`` until its record is a success, an interruption, or ``retries`` more
    attempts ran (``last``: whether no retry may follow, e.g. for ``keep_on_failure``); return
    the final record, settled by :func:`mark_flaky`."""
    earlier: list[dict[str, Any]] = []
    for number in range(1, retries + 2):
        last = number == retries + 1
        record = attempt(last)
        if last or record.result.ok or record.result is Result.INTERRUPTED:
            break
        earlier.append(attempt_summary(record, number, _set_aside(record, number)))
        log.warning(
            "%s: attempt %d of %d %s%s; running it again on fresh resources",
            project,
            number,
            retries + 1,
            record.result.label,
            f" ({record.error})" if record.error else "",
        )
    return mark_flaky(record, earlier)


def attempt_summary(record: RunRecord, number: int, folder: Path | None) -> dict[str, Any]:
    """What the final record keeps of an earlier attempt (``folder``: where its files went)."""
    from ..report.summary import tests_of

    tests = tests_of(record) if folder is None else tests_of(_moved(record, folder))
    return {
        "attempt": number,
        "run_id": record.run_id,
        "result": record.result.label,
        "duration": round(record.duration, 3),
        "started_at": record.started_at,
        "error": record.error,
        "failed_tests": [failure.name for failure in tests.failures],
        "folder": str(folder) if folder is not None else None,
    }


def mark_flaky(record: RunRecord, earlier: list[dict[str, Any]]) -> RunRecord:
    """The final record with its earlier attempts, ``flaky`` if it passed after a failure (of an
    attempt, or of tests its own runner retried), the flaky tests named; written again."""
    from ..report.summary import tests_of

    tests = tests_of(record)
    failing_now = {failure.name for failure in tests.failures}
    flaky = dict.fromkeys(tests.flaky)  # the runner's own retries: Playwright's flakyFailure
    if record.result.ok:
        for summary in earlier:
            for name in summary.get("failed_tests") or ():
                if name not in failing_now:
                    flaky[str(name)] = None
    result = record.result
    if result is Result.PASSED and (earlier or flaky):
        result = Result.FLAKY
    if not earlier and not flaky and result is record.result:
        return record
    settled = replace(
        record, result=result, attempts=tuple(earlier), flaky_tests=tuple(sorted(flaky))
    )
    return settled.write(record.path) if record.path is not None else settled


def _moved(record: RunRecord, folder: Path) -> RunRecord:
    """``record`` as it reads from ``folder``, where its files moved."""
    junit = Layout.junit(folder)
    return replace(record, junit=str(junit) if junit.is_file() else None, path=folder)


def _set_aside(record: RunRecord, number: int) -> Path | None:
    """Move what attempt ``number`` left in its project folder to ``attempts/<number>/``."""
    source = record.folder
    if source is None or not source.is_dir():
        return None
    target = Layout.attempt_dir(source, number)
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for entry in sorted(os.listdir(source)):
            if entry in _STAYS:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.replace(source / entry, target / entry)
    except OSError as exc:
        log.warning("could not keep attempt %d's files apart (%s): they are replaced", number, exc)
        with contextlib.suppress(OSError):  # never let the failed record count as the result
            Layout.record(source).unlink()
        return None
    return target
