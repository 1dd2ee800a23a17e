"""The results layout: every path of a run, and the only code that looks for run records.

::

    <results_dir>/
      latest -> <run id>                 the newest run
      durations.json                     recorded durations (CI plans, longest first)
      <run id>/                          one nox call, one `invoke e2e.all`, one `e2e.run`
        report.html  junit.xml  nox.log  playwright-report/
        playwright-report-<label>/       one merged report per test directory, when several
        prepare.json  prepare/<step>.log the run's prepare steps: what ran, how long, their output
        database/<kind>-<db>.log         a migrate or seed command's whole output
        <project>.output.log             a project's console output (`invoke e2e.all`)
        <project>/                       run.json, status.json, junit.xml, <server>.log, ...
          suite.log                      the suite's console output
          blob-report/  attachments/     Playwright Test's blob; a failing test's attachments
          runs/<session run id>/         another run of the project writing into this run
          attempts/<n>/                  what a failed attempt left when the project ran again
      up/                                environments kept up by `invoke e2e.up` (never pruned)
        <project>.env  <project>.json    what the suite would get (0600), and who keeps it up
        <project>/                       its servers' logs

Writers ask :class:`Layout` where to write; readers ask it what was written
(:meth:`Layout.records`, :meth:`Layout.newest`): nothing else globs the results folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import FolderError
from ..files import RESULTS_SETTING, folder_error, symlink_error
from .record import RunRecord

__all__ = ["LATEST", "UP", "Layout"]

LATEST = "latest"
RECORD = "run.json"
STATUS = "status.json"
JUNIT = "junit.xml"
REPORT = "report.html"
NOX_LOG = "nox.log"
DURATIONS = "durations.json"
MERGED_PLAYWRIGHT = "playwright-report"
PREPARE = "prepare"  # <run>/prepare.json and <run>/prepare/<step>.log
DATABASE_LOGS = "database"  # <run>/database/<kind>-<database>.log
SUITE_LOG = "suite.log"
BLOB_DIR = "blob-report"
ATTACHMENTS = "attachments"
OTHER_RUNS = "runs"  # <project>/runs/<id>: a concurrent run of the project into the same run
ATTEMPTS = "attempts"  # <project>/attempts/<n>: an earlier attempt of a project run again
UP = "up"  # <results>/up/: the environments kept up by `invoke e2e.up`; not a run's folder


@dataclass(frozen=True)
class Layout:
    """Where the results of run ``run`` (None: no run chosen yet) lie under ``results_dir``."""

    results_dir: Path
    run: str | None = None

    # --- the run ----------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """``<results_dir>/<run>`` (``results_dir`` itself when no run is chosen)."""
        return self.results_dir / self.run if self.run else self.results_dir

    @property
    def report(self) -> Path:
        return self.run_dir / REPORT

    @property
    def merged_junit(self) -> Path:
        return self.run_dir / JUNIT

    @property
    def nox_log(self) -> Path:
        return self.run_dir / NOX_LOG

    @property
    def merged_playwright(self) -> Path:
        return self.run_dir / MERGED_PLAYWRIGHT

    def merged_playwright_group(self, label: str | None) -> Path:
        """A merged Playwright report: ``playwright-report/`` (``label`` None: one test directory
        in the run) or ``playwright-report-<label>/`` (one per test directory)."""
        return (
            self.merged_playwright
            if label is None
            else self.run_dir / f"{MERGED_PLAYWRIGHT}-{label}"
        )

    def merged_playwright_reports(self) -> list[Path]:
        """The ``index.html`` of every merged Playwright report of the run, by folder name."""
        try:
            folders = sorted(
                p
                for p in self.run_dir.iterdir()
                if p.name == MERGED_PLAYWRIGHT or p.name.startswith(MERGED_PLAYWRIGHT + "-")
            )
        except OSError:
            return []
        return [folder / "index.html" for folder in folders if (folder / "index.html").is_file()]

    @property
    def prepare_record(self) -> Path:
        """``<run>/prepare.json``: the run's prepare steps, written once per run."""
        return self.run_dir / f"{PREPARE}.json"

    def prepare_log(self, step: str) -> Path:
        return self.run_dir / PREPARE / f"{step}.log"

    def database_log(self, kind: str, dbname: str) -> Path:
        """A migrate or seed command's output (``kind``: ``migrate``, ``seed-<profile>``) on
        database ``dbname``: in the run's folder; with no run chosen (``invoke db.template``), in
        a hidden folder of the results folder that no run's retention touches."""
        folder = (
            self.run_dir / DATABASE_LOGS if self.run else self.results_dir / f".{DATABASE_LOGS}"
        )
        return folder / f"{kind}-{dbname}.log"

    @property
    def latest(self) -> Path:
        return self.results_dir / LATEST

    @property
    def durations(self) -> Path:
        return self.results_dir / DURATIONS

    def output_log(self, project: str) -> Path:
        """A project's console output when the runner keeps it apart (``invoke e2e.all``)."""
        return self.run_dir / f"{project}.output.log"

    # --- a project of the run ---------------------------------------------------------------------

    def project_dir(self, project: str) -> Path:
        return self.run_dir / project

    @staticmethod
    def attempt_dir(folder: Path, attempt: int) -> Path:
        """Where attempt ``attempt``'s files go (from a project's folder) when it runs again."""
        return folder / ATTEMPTS / str(attempt)

    # --- environments kept up (`invoke e2e.up`) ------------------------------------------------

    @property
    def up_dir(self) -> Path:
        """``<results_dir>/up``: what ``e2e.up`` keeps, whichever run this layout is of."""
        return self.results_dir / UP

    def up_env(self, project: str) -> Path:
        """The environment file of ``project`` kept up (``KEY=value`` lines, 0600)."""
        return self.up_dir / f"{project}.env"

    def up_state(self, project: str) -> Path:
        """Who keeps ``project`` up, and what it holds (JSON, 0600)."""
        return self.up_dir / f"{project}.json"

    def for_up(self) -> Layout:
        """The layout of the environments kept up: their servers' logs in ``up/<project>/``."""
        return Layout(self.results_dir, UP)

    def other_run_dir(self, project: str, session_run: str) -> Path:
        """The folder of a second, concurrent run of ``project`` writing into this run."""
        return self.project_dir(project) / OTHER_RUNS / session_run

    def status(self, project: str) -> Path:
        return self.project_dir(project) / STATUS

    @staticmethod
    def record(folder: Path) -> Path:
        """``run.json`` in a project's folder."""
        return folder / RECORD

    @staticmethod
    def junit(folder: Path) -> Path:
        return folder / JUNIT

    @staticmethod
    def server_log(folder: Path, server: str) -> Path:
        return folder / f"{server}.log"

    @staticmethod
    def suite_log(folder: Path) -> Path:
        """The suite's console output (also shown where it ran)."""
        return folder / SUITE_LOG

    @staticmethod
    def blob_dir(folder: Path) -> Path:
        """Playwright Test's blob report of a project's run (``*.zip``)."""
        return folder / BLOB_DIR

    @staticmethod
    def attachments_dir(folder: Path) -> Path:
        """The attachments of a project's failing Playwright tests, taken out of its blob."""
        return folder / ATTACHMENTS

    # --- reading ----------------------------------------------------------------------------------

    def records(self, project: str) -> list[RunRecord]:
        """This run's records of ``project`` (its folder, then concurrent runs into it); with no
        run chosen, its newest record of any run."""
        if self.run is None:
            newest = self.newest(project)
            return [newest] if newest is not None else []
        folder = self.project_dir(project)
        paths = [self.record(folder), *sorted((folder / OTHER_RUNS).glob(f"*/{RECORD}"))]
        return [run for run in map(RunRecord.load, paths) if run is not None]

    def collect(self, projects: Iterable[str], *, since: float | None = None) -> list[RunRecord]:
        """The records of ``projects`` (see :meth:`records`) started at or after ``since``,
        by project then start."""
        found = [
            run
            for project in sorted(set(projects))
            for run in self.records(project)
            if since is None or run.started_at >= since
        ]
        return sorted(found, key=lambda r: (r.project, r.started_at))

    def newest(self, project: str) -> RunRecord | None:
        """``project``'s newest record of any run in the results folder."""
        loaded = [run for run in map(RunRecord.load, self._all_records(project)) if run]
        return max(loaded, key=lambda r: r.started_at, default=None)

    def history(self, project: str) -> list[RunRecord]:
        """Every record of ``project`` in the results folder, oldest first."""
        loaded = [run for run in map(RunRecord.load, self._all_records(project)) if run]
        return sorted(loaded, key=lambda r: r.started_at)

    def _all_records(self, project: str) -> Iterator[Path]:
        top = self.results_dir
        yield from top.glob(f"{project}/{RECORD}")  # results written without a run folder
        yield from top.glob(f"{project}/{OTHER_RUNS}/*/{RECORD}")
        for pattern in (f"*/{project}/{RECORD}", f"*/{project}/{OTHER_RUNS}/*/{RECORD}"):
            # latest/ is a link to a run read already; up/<project>/ an environment kept up
            yield from (
                p for p in top.glob(pattern) if p.relative_to(top).parts[0] not in (LATEST, UP)
            )

    @staticmethod
    def statuses_in(run_folder: Path) -> list[Path]:
        """The ``status.json`` of each project in ``run_folder`` (another run's, as retention
        reads them)."""
        return sorted(run_folder.glob(f"*/{STATUS}"))

    def run_folders(self) -> list[Path]:
        """Every run's folder (not ``latest``, not hidden ones), oldest first by modification."""
        try:
            folders = [
                p
                for p in self.results_dir.iterdir()
                if p.is_dir()
                and not p.is_symlink()
                and not p.name.startswith(".")
                and p.name not in (LATEST, UP)  # up/: environments in use, never pruned
            ]
        except OSError:
            return []
        return sorted(folders, key=_mtime)

    # --- writing ----------------------------------------------------------------------------------

    def claim_project_dir(
        self, project: str, session_run: str, *, others: bool, stale: Iterable[str] = ()
    ) -> Path:
        """Make and return the folder a session of ``project`` writes to.

        ``<run>/<project>``; when ``others`` (another live run of the project) may write there,
        ``<run>/<project>/runs/<session_run>`` unless this run's own folder for the project is
        still free (first come). Both folders are made private (0700: logs and records are the
        user's), ``latest`` points at the run, and in a folder of its own what an earlier
        attempt under the same run id left (``run.json``, ``junit.xml``, the ``stale`` names) is
        removed.
        """
        folder = self.project_dir(project)
        if others and self.run is not None:
            try:
                _make(self.run_dir)
                _own(folder)
                folder.mkdir()
                others = False  # the other run writes into another run's folder
            except FileExistsError:
                pass
            except OSError as exc:
                raise _folder_error(folder, exc) from None
        if others:
            folder = self.other_run_dir(project, session_run)
        chain = [self.run_dir]
        for part in folder.relative_to(self.run_dir).parts:
            chain.append(chain[-1] / part)
        for made in chain:  # each one a folder of ours, never a link to somewhere else
            _make(made)
        for made in {self.run_dir, folder}:
            with contextlib.suppress(OSError):
                made.chmod(0o700)  # not through a link: _make refused those
        self.point_latest()
        if not others:
            for name in (RECORD, JUNIT, *stale):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
        return folder

    def make_run_dir(self) -> Path:
        """The run's folder, made if missing (never through a link); one line if it cannot be."""
        _make(self.results_dir)
        _make(self.run_dir)
        return self.run_dir

    def point_latest(self) -> None:
        """Make ``latest`` point at this run's folder (atomically; best effort)."""
        if self.run is None or self.run == UP:  # up/ holds environments, not a run
            return
        tmp = self.results_dir / f".{LATEST}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            self.results_dir.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.run, target_is_directory=True)
            os.replace(tmp, self.latest)


def _own(path: Path) -> None:
    """Refuse a symbolic link where the tool makes (and later chmods and writes into) a folder of
    its own: a link planted at ``<results>/<run id>`` would send a run's files elsewhere."""
    if path.is_symlink():
        raise symlink_error(path, RESULTS_SETTING)


def _make(path: Path) -> None:
    """``path`` as a folder of the tool's (made if missing); a link or an error is one line."""
    _own(path)
    if path.exists() and not path.is_dir():
        raise FolderError(
            f"{path} exists and is not a folder; remove it or point {RESULTS_SETTING} elsewhere",
            path=str(path),
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(path, exc) from None
    _own(path)


def _folder_error(path: Path, exc: OSError) -> FolderError:
    return folder_error(path, exc, setting=RESULTS_SETTING, what="create the folder")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
