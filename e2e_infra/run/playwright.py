"""Playwright Test projects side by side: per-run output folders, one merged HTML report.

Playwright Test empties its ``outputDir`` (default ``test-results/`` next to the config) at every
start, and writes its HTML report, blob and JUnit files to fixed places. Several projects of one
``playwright.config`` run at once (``npx playwright test --project=X`` each) therefore delete each
other's traces and reports. For a project whose command runs Playwright Test (``playwright test``
in its command, also inside ``sh -c '...'``, or ``playwright = true`` in its table), the tool
leaves the config and the command alone and redirects, with Playwright's own flags and
environment variables, everything that run writes into the project's results folder:

- ``--output=<results>/test-results``: ``outputDir`` (traces, screenshots, ``.last-run.json``);
- ``PLAYWRIGHT_HTML_OUTPUT_DIR=<results>/playwright-report`` (an ``html`` reporter) and
  ``PLAYWRIGHT_HTML_OPEN=never`` (no report server waiting for Ctrl-C after a failure);
- ``PLAYWRIGHT_JUNIT_OUTPUT_FILE=<results>/junit.xml`` (a ``junit`` reporter), with
  ``PLAYWRIGHT_JUNIT_INCLUDE_RETRIES=1``: a test that passed on a retry is named flaky;
- ``--add-reporter=blob`` (Playwright >= 1.63) with ``PLAYWRIGHT_BLOB_OUTPUT_DIR=<results>/
  blob-report``.

The flags go right after ``playwright test``, so a flag the command or the suite's arguments
pass themselves comes later and wins; a variable set in the project's ``env`` wins too.
``playwright = false`` turns all of it off. After the run, :func:`merge_playwright_reports`
merges the blobs of every project into one Playwright HTML report,
``<run>/playwright-report/index.html`` (``playwright merge-reports``, made for sharded runs),
which ``report.html`` links at its top.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config import Config, ProjectConfig
from ..processes import child_environ
from ..results.record import RunRecord

__all__ = [
    "merge_playwright_reports",
    "runs_playwright_test",
    "suite_argv",
    "suite_env",
]

log = logging.getLogger("e2e_infra")

BLOB_DIR = "blob-report"  # <project results>/blob-report/*.zip
_ADD_REPORTER_SINCE = (1, 63)  # the first Playwright with --add-reporter
_MERGE_TIMEOUT = 300.0  # seconds; merging is ~1 s per project, attachments copied included
# `playwright test` as words of a shell script: `npx playwright test`, `./node_modules/.bin/
# playwright test`, `pnpm exec playwright test`; not `my-playwright test` nor `playwright tests`.
_IN_SCRIPT = re.compile(r"(?:(?<=^)|(?<=[\s'\"/;&|(]))playwright\s+test(?=$|[\s'\";&|)])")


def runs_playwright_test(project: ProjectConfig) -> bool:
    """Whether ``project``'s suite is Playwright Test: its ``playwright`` setting, else whether
    its command says ``playwright test``."""
    if project.playwright is not None:
        return project.playwright
    return _IN_SCRIPT.search(project.command) is not None


def suite_env(project: ProjectConfig, results_dir: Path) -> dict[str, str]:
    """The reporter variables for a Playwright Test project (empty for any other project)."""
    if not runs_playwright_test(project):
        return {}
    return {
        "PLAYWRIGHT_HTML_OUTPUT_DIR": str(results_dir / "playwright-report"),
        "PLAYWRIGHT_HTML_OPEN": "never",
        "PLAYWRIGHT_JUNIT_OUTPUT_FILE": str(results_dir / "junit.xml"),
        # A test that passed on one of Playwright's own retries keeps its failures as
        # <flakyFailure>: the run names it flaky (see e2e_infra.report.junit).
        "PLAYWRIGHT_JUNIT_INCLUDE_RETRIES": "1",
        "PLAYWRIGHT_BLOB_OUTPUT_DIR": str(results_dir / BLOB_DIR),
    }


def suite_argv(project: ProjectConfig, argv: Sequence[str], results_dir: Path) -> list[str]:
    """``argv`` (the rendered command) with the output flags right after ``playwright test``:
    as words, or inside a ``sh -c`` script, quoted for it; appended when neither is found (a
    project with ``playwright = true`` whose command passes its arguments on, ``npm test --``)."""
    words = list(argv)
    if not runs_playwright_test(project):
        return words
    flags = [f"--output={results_dir / 'test-results'}"]
    version = _playwright_version(project.cwd)
    if version is None or version >= _ADD_REPORTER_SINCE:
        flags.append("--add-reporter=blob")
    for i, word in enumerate(words[:-1]):
        if Path(word).name == "playwright" and words[i + 1] == "test":
            return [*words[: i + 2], *flags, *words[i + 2 :]]
    quoted = " ".join(shlex.quote(flag) for flag in flags)
    for i, word in enumerate(words):
        if _IN_SCRIPT.search(word) and any(c.isspace() for c in word):
            words[i] = _IN_SCRIPT.sub(lambda m: f"{m.group(0)} {quoted}", word)
            return words
    return [*words, *flags]


def _playwright_version(cwd: Path) -> tuple[int, int] | None:
    """The version of the ``playwright`` package that ``cwd`` resolves, if installed."""
    package = _package_dir(cwd)
    if package is None:
        return None
    try:
        version = str(json.loads((package / "package.json").read_text("utf-8"))["version"])
        major, minor = (int(part) for part in version.split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return major, minor


def _package_dir(cwd: Path) -> Path | None:
    """``node_modules/playwright`` as Node resolves it from ``cwd`` (the nearest one up)."""
    for folder in (cwd.resolve(), *cwd.resolve().parents):
        candidate = folder / "node_modules" / "playwright"
        if (candidate / "cli.js").is_file():
            return candidate
    return None


# --- after the run: one report ------------------------------------------------------------------


def merge_playwright_reports(
    config: Config, runs: Sequence[RunRecord], *, timeout: float = _MERGE_TIMEOUT
) -> Path | None:
    """Merge the blob reports of ``runs`` into ``<run dir>/playwright-report/index.html``.

    Returns its path, or None when no run wrote a blob or the merge failed (said in one warning
    line: the run's own results stand without it). Runs ``playwright merge-reports`` from the
    ``node_modules`` of the first Playwright Test project that has one.
    """
    blobs: list[tuple[str, Path]] = []
    cli: Path | None = None
    for run in sorted(runs, key=lambda r: (r.started_at, r.project)):
        found = sorted((run.folder / BLOB_DIR).glob("*.zip")) if run.folder else []
        blobs += [(run.project, blob) for blob in found]
        project = config.projects.get(run.project)
        if found and cli is None and project is not None:
            package = _package_dir(project.cwd)
            cli = package / "cli.js" if package is not None else None
    if not blobs:
        return None
    node = shutil.which("node")
    if cli is None or node is None:
        log.warning(
            "no merged Playwright report: %s; each project's own report is in its results folder",
            "node is not on PATH" if node is None else "no node_modules/playwright found",
        )
        return None
    out = config.layout.merged_playwright
    staging = config.layout.run_dir / f".{BLOB_DIR}s.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for n, (project_name, blob) in enumerate(blobs, 1):
            shutil.copy2(blob, staging / f"{project_name}-{n}.zip")  # unique names, one folder
        env: Mapping[str, str] = {
            **child_environ(),  # the project's Playwright package runs: no admin URL for it
            "PLAYWRIGHT_HTML_OUTPUT_DIR": str(out),
            "PLAYWRIGHT_HTML_OPEN": "never",
        }
        try:
            proc = subprocess.run(
                [node, str(cli), "merge-reports", "--reporter=html", str(staging)],
                cwd=cli.parent,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            log.warning("no merged Playwright report: merge-reports ran over %gs", timeout)
            return None
        except OSError as exc:
            log.warning("no merged Playwright report: cannot run %s (%s)", node, exc.strerror)
            return None
    except OSError as exc:
        log.warning("no merged Playwright report: cannot stage the blobs (%s)", exc)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    index = out / "index.html"
    if proc.returncode != 0 or not index.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        log.warning(
            "no merged Playwright report: playwright merge-reports exited with %s (%s)",
            proc.returncode,
            lines[-1] if lines else "no output",
        )
        return None
    return index
