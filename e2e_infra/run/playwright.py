"""Playwright Test projects side by side: per-run output folders, merged HTML reports.

Playwright Test empties its ``outputDir`` (default ``test-results/`` next to the config) at every
start, and writes its HTML report, blob and JUnit files to fixed places. Several projects of one
``playwright.config`` run at once (``npx playwright test --project=X`` each) therefore delete each
other's traces and reports. For a project whose command runs Playwright Test (``playwright test``
in its command, also inside ``sh -c '...'``, or ``playwright = true`` in its table), the tool
leaves the config and the command alone and redirects, with Playwright's own flags and
environment variables, what that run would otherwise collide on:

- ``--output=<results>/test-results``: ``outputDir`` (traces, screenshots, ``.last-run.json``);
- ``PLAYWRIGHT_HTML_OUTPUT_DIR=<results>/playwright-report`` (an ``html`` reporter) and
  ``PLAYWRIGHT_JUNIT_OUTPUT_FILE=<results>/junit.xml`` (a ``junit`` reporter), unless the config
  is used by this e2e project alone and Playwright says where those reporters write
  (:mod:`.playwright_config`): then they stay where the team put them (:func:`outputs_of`);
  with ``PLAYWRIGHT_JUNIT_INCLUDE_RETRIES=1`` (a test that passed on a retry is named flaky);
- ``PLAYWRIGHT_HTML_OPEN=never`` (no report server waiting for Ctrl-C after a failure);
- ``--add-reporter=blob`` (Playwright >= 1.63) with ``PLAYWRIGHT_BLOB_OUTPUT_DIR=<results>/
  blob-report``: every test's result, whatever reporters the config names.

The flags go right after ``playwright test``, so a flag the command or the suite's arguments
pass themselves comes later and wins; a variable set in the project's ``env`` wins too.
``playwright = false`` turns all of it off. After the suite, :func:`after_suite` finds its JUnit
file (or makes one from the blob: the failing tests of a config without a ``junit`` reporter).
After the run, :func:`merge_playwright_reports` merges the blobs into one Playwright HTML report
per test directory (``playwright merge-reports`` refuses blobs of different ones), linked at the
top of ``report.html``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ProjectConfig
from ..processes import child_environ
from ..results.layout import BLOB_DIR, Layout
from ..results.record import RunRecord
from .playwright_config import (
    ResolvedConfig,
    config_file_of,
    package_dir,
    playwright_version,
    resolve,
)

__all__ = [
    "Outputs",
    "SuiteFiles",
    "after_suite",
    "merge_playwright_reports",
    "outputs_of",
    "runs_playwright_test",
    "suite_argv",
    "suite_env",
]

log = logging.getLogger("e2e_infra")

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


@dataclass(frozen=True)
class Outputs:
    """What a Playwright Test project's config writes where the team wants it, left alone."""

    html: Path | None = None  # its html reporter's folder
    junit: Path | None = None  # its junit reporter's file
    resolved: ResolvedConfig | None = None


def outputs_of(config: Config, project: ProjectConfig, env: Mapping[str, str]) -> Outputs:
    """The reporter outputs of ``project``'s config that stay where it puts them: those of a
    config that no other configured e2e project uses (so no other run of this tool writes there
    at the same time), as Playwright resolves it (``env``: the suite's environment, which the
    config may read). A config shared by several projects ("N projects of one config"), a
    command that names its own ``--reporter``, or a config that cannot be read: nothing stays,
    every reporter file goes to the project's results (:func:`suite_env`)."""
    if not runs_playwright_test(project):
        return Outputs()
    words = _command_words(project)
    if any(w == "--reporter" or w.startswith("--reporter=") for w in words):
        return Outputs()
    config_file = config_file_of(words, project.cwd)
    resolved = resolve(project.cwd, config_file, cache_dir=config.state_dir / "playwright", env=env)
    if resolved is None:
        return Outputs()
    for other in config.projects.values():
        if (
            other.name != project.name
            and runs_playwright_test(other)
            and config_file_of(_command_words(other), other.cwd) == config_file
        ):
            return Outputs(resolved=resolved)  # shared: their reports would collide
    return Outputs(resolved.html_folder(), resolved.junit_file(), resolved)


def _command_words(project: ProjectConfig) -> list[str]:
    try:
        return shlex.split(project.command)
    except ValueError:
        return project.command.split()


def suite_env(
    project: ProjectConfig, results_dir: Path, *, keep: Outputs | None = None
) -> dict[str, str]:
    """The reporter variables for a Playwright Test project (empty for any other project);
    ``keep``: the outputs left where the config puts them (see :func:`outputs_of`)."""
    if not runs_playwright_test(project):
        return {}
    keep = keep or Outputs()
    # A test that passed on one of Playwright's own retries keeps its failures as <flakyFailure>:
    # the run names it flaky (see e2e_infra.report.junit).
    env = {"PLAYWRIGHT_HTML_OPEN": "never", "PLAYWRIGHT_JUNIT_INCLUDE_RETRIES": "1"}
    if keep.html is None:
        env["PLAYWRIGHT_HTML_OUTPUT_DIR"] = str(results_dir / "playwright-report")
    if keep.junit is None:
        env["PLAYWRIGHT_JUNIT_OUTPUT_FILE"] = str(results_dir / "junit.xml")
    env["PLAYWRIGHT_BLOB_OUTPUT_DIR"] = str(Layout.blob_dir(results_dir))
    return env


@dataclass(frozen=True)
class SuiteFiles:
    """What a suite left for the report: its JUnit file, its own HTML report when it stays in
    the team's folder."""

    junit: str | None = None
    html_report: str | None = None


def after_suite(
    project: ProjectConfig,
    results_dir: Path,
    keep: Outputs | None,
    *,
    started: float,
    secrets: Sequence[str] = (),
) -> SuiteFiles:
    """The suite's JUnit file: the project folder's ``junit.xml`` when the suite wrote one, else
    the config's own ``junit`` file (written since ``started``), else one made from its blob
    report (:func:`~e2e_infra.report.blob.junit_from_blobs`: every test, the failing ones with
    their message, location and attachments); and the config's own HTML report if it stays."""
    junit = Layout.junit(results_dir)
    html = None
    if keep is not None and keep.html is not None:
        index = keep.html / "index.html"
        html = str(index) if _written_since(index, started) else None
    if junit.is_file():
        return SuiteFiles(str(junit), html)
    if not runs_playwright_test(project):
        return SuiteFiles(None, html)
    if keep is not None and keep.junit is not None and _written_since(keep.junit, started):
        return SuiteFiles(str(keep.junit), html)
    blobs = sorted(Layout.blob_dir(results_dir).glob("*.zip"))
    if blobs:
        from ..report.blob import junit_from_blobs

        made = junit_from_blobs(
            blobs, junit, Layout.attachments_dir(results_dir), secrets=tuple(secrets)
        )
        if made is not None:
            return SuiteFiles(str(made), html)
    return SuiteFiles(None, html)


def _written_since(path: Path, started: float) -> bool:
    try:
        return path.stat().st_mtime >= started - 1.0  # some file systems keep whole seconds
    except OSError:
        return False


def suite_argv(project: ProjectConfig, argv: Sequence[str], results_dir: Path) -> list[str]:
    """``argv`` (the rendered command) with the output flags right after ``playwright test``:
    as words, or inside a ``sh -c`` script, quoted for it; appended when neither is found (a
    project with ``playwright = true`` whose command passes its arguments on, ``npm test --``)."""
    words = list(argv)
    if not runs_playwright_test(project):
        return words
    flags = [f"--output={results_dir / 'test-results'}"]
    version = playwright_version(package_dir(project.cwd))
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


# --- after the run: one report per test directory ------------------------------------------------


def merge_playwright_reports(
    config: Config, runs: Sequence[RunRecord], *, timeout: float = _MERGE_TIMEOUT
) -> list[Path]:
    """Merge the blob reports of ``runs`` into Playwright HTML reports; their ``index.html``.

    ``playwright merge-reports`` merges only blobs recorded with one test directory (a config's
    ``rootDir``), so the blobs are grouped by it: one group gives ``<run>/playwright-report/``,
    several give ``<run>/playwright-report-<folder>/`` each (the folder: the test directory,
    relative to the repository). A group that cannot be merged is left out, said in one warning
    line quoting Playwright's own message (the run's own results stand without it). Each group
    is merged with the ``node_modules/playwright`` of its first project that has one.
    """
    from ..report.blob import root_dir

    groups: dict[str, list[tuple[str, Path, Path | None]]] = {}
    for run in sorted(runs, key=lambda r: (r.started_at, r.project)):
        found = sorted(Layout.blob_dir(run.folder).glob("*.zip")) if run.folder else []
        project = config.projects.get(run.project)
        package = package_dir(project.cwd) if project is not None else None
        for blob in found:
            key = root_dir(blob) or ""
            groups.setdefault(key, []).append((run.project, blob, package))
    if not groups:
        return []
    node = shutil.which("node")
    if node is None:
        log.warning(
            "no merged Playwright report: node is not on PATH; each project's own report is in "
            "its results folder"
        )
        return []
    merged = []
    labels = _labels(config, sorted(groups)) if len(groups) > 1 else {next(iter(groups)): None}
    for key in sorted(groups):
        out = config.layout.merged_playwright_group(labels[key])
        index = _merge_group(config, node, groups[key], out, timeout)
        if index is not None:
            merged.append(index)
    return merged


def _labels(config: Config, roots: Sequence[str]) -> dict[str, str | None]:
    """A folder-name part per test directory: its path from the repository, as a slug."""
    out: dict[str, str | None] = {}
    used: set[str] = set()
    for root in roots:
        try:
            shown = Path(root).resolve().relative_to(config.root.resolve()).as_posix()
        except ValueError:
            shown = Path(root).name
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", shown).strip("-.") or "tests"
        while label in used:
            label += "-2"
        used.add(label)
        out[root] = label
    return out


def _merge_group(
    config: Config,
    node: str,
    blobs: Sequence[tuple[str, Path, Path | None]],
    out: Path,
    timeout: float,
) -> Path | None:
    package = next((p for _project, _blob, p in blobs if p is not None), None)
    if package is None:
        log.warning(
            "no merged Playwright report for %s: no node_modules/playwright found; each "
            "project's own report is in its results folder",
            ", ".join(sorted({project for project, _b, _p in blobs})),
        )
        return None
    cli = package / "cli.js"
    staging = config.layout.run_dir / f".{BLOB_DIR}s.{os.getpid()}.{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for n, (project_name, blob, _package) in enumerate(blobs, 1):
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
        log.warning(
            "no merged Playwright report in %s: playwright merge-reports exited with %s: %s",
            out,
            proc.returncode,
            playwright_message(proc.stderr or proc.stdout),
        )
        return None
    return index


def playwright_message(output: str, limit: int = 600) -> str:
    """Playwright's own message in ``output``: from its first ``Error`` line to the first blank
    line or stack frame, as one line (not the last line of a stack trace)."""
    lines = output.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if "Error" in line), None)
    if start is None:
        return " ".join(lines[-1].split()) if lines else "no output"
    taken = []
    for line in lines[start:]:
        if not line.strip() or line.lstrip().startswith("at "):
            break
        taken.append(line.strip())
    text = " ".join(" ".join(taken).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
