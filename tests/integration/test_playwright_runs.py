"""Playwright runs side by side: projects of one config, overlapping runs, a hostile test-results/.

- ``tests/fixtures/pwconfig``: ONE root ``playwright.config.ts`` with three Playwright projects,
  the default ``outputDir`` and an HTML reporter folder inside it (which Playwright calls a clash),
  run unchanged as three e2e projects (``npx playwright test --project=X``) at once through
  ``nox -j auto -t e2e``; their blobs merge into one Playwright HTML report linked from
  ``report.html``. It reuses the packages of the demo's ``browser_node`` (a symlink), no install.
- Two overlapping runs of that checkout: each run's summary and report list only its projects.
- The whole demo (eight projects, two of them in Chromium) through ``nox -j auto -t e2e`` while a
  loop deletes ``test-results/`` every 0.3 s: everything passes and nothing is left.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import FIXTURES_DIR, REPO_ROOT
from support.cli import CLI, Cli, config_environ
from support.clusters import running_cluster
from support.runs import project_folder, run_processes

import e2e_infra
from e2e_infra.testing import copy_config

pytestmark = pytest.mark.integration

FIXTURE = FIXTURES_DIR / "pwconfig"
NODE_PROJECT = REPO_ROOT / "demo" / "e2e" / "browser_node"
PW_PROJECTS = ("alpha", "beta", "gamma")


def ensure_node_packages() -> Path:
    """The demo's browser_node packages, installed by its own step (a no-op when they are)."""
    subprocess.run(["sh", "ensure-deps.sh"], cwd=NODE_PROJECT, check=True, timeout=600)
    return NODE_PROJECT / "node_modules"


def nox(
    config_path: Path, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> subprocess.Popen[str]:
    return CLI.start(CLI.nox_argv(*args), env=config_environ(config_path, **(env or {})), cwd=cwd)


def finish(proc: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


class Rows(HTMLParser):
    """``report.html``: the projects of its rows and the href of the merged report link."""

    def __init__(self) -> None:
        super().__init__()
        self.projects: list[str] = []
        self.merged: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and "run" in (values.get("class") or "").split():
            self.projects.append(str(values["data-project"]))
        if tag == "a" and values.get("class") == "playwright-report":
            self.merged = values.get("href")


def read_report(run_dir: Path) -> Rows:
    rows = Rows()
    rows.feed((run_dir / "report.html").read_text())
    return rows


def merged_tests(index: Path) -> dict[str, list[str]]:
    """The tests of a Playwright HTML report: file -> test titles (from its embedded data)."""
    found = re.search(r"data:application/zip;base64,([A-Za-z0-9+/=]+)", index.read_text())
    assert found, f"{index} has no embedded report data"
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(found.group(1)))) as archive:
        report: dict[str, Any] = json.loads(archive.read("report.json"))
    return {f["fileName"]: [t["title"] for t in f["tests"]] for f in report["files"]}


def assert_no_leftovers(config: e2e_infra.Config) -> None:
    registry = e2e_infra.make_registry(config)
    assert [lease for lease in registry.snapshot() if lease.project != "postgres"] == []
    # Servers, suites and the Chromium they launched all carry the run's E2E_RESULTS_DIR.
    assert run_processes(config.results_dir) == []


# --- N projects of one playwright.config ----------------------------------------------------------


@pytest.fixture
def pwconfig(tmp_path: Path) -> Path:
    """A copy of the fixture repository with its own state, results and ports."""
    packages = ensure_node_packages()
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURE, repo)
    (repo / "node_modules").symlink_to(packages)
    return copy_config(repo / "pyproject.toml", repo, port_range="19600-19699")


def test_three_projects_of_one_root_config_run_at_once_unchanged_into_one_report(
    pwconfig: Path,
) -> None:
    repo = pwconfig.parent
    config_text = (repo / "playwright.config.ts").read_text()
    code, out = finish(nox(pwconfig, "-j", "auto", "-t", "e2e", cwd=repo))
    assert code == 0, out
    assert "clashes" not in out  # Playwright's complaint about the HTML report in outputDir
    config = e2e_infra.load_config(pwconfig, environ={})
    run_dir = project_folder(config.results_dir, "alpha").parent
    for project in PW_PROJECTS:
        folder = run_dir / project
        assert json.loads((folder / "run.json").read_text())["result"] == "passed"
        junit = (folder / "junit.xml").read_text()
        assert 'tests="1"' in junit and 'failures="0"' in junit
        # Its own outputDir (a trace of its one test: nothing deleted it) and HTML report.
        [trace] = (folder / "test-results").glob("*/trace.zip")
        assert project in trace.parent.name
        assert (folder / "playwright-report" / "index.html").is_file()
    # The team's folders stay untouched: nothing went to the shared default outputDir.
    assert not (repo / "test-results").exists()
    assert not (repo / "playwright-report").exists()
    assert (repo / "playwright.config.ts").read_text() == config_text
    # One merged Playwright HTML report with the tests of all three, linked from report.html.
    index = run_dir / "playwright-report" / "index.html"
    assert merged_tests(index) == {
        f"{p}/page.spec.ts": [f"{p} reads the page of its own server"] for p in PW_PROJECTS
    }
    rows = read_report(run_dir)
    assert sorted(rows.projects) == list(PW_PROJECTS)
    assert rows.merged is not None and (run_dir / rows.merged).resolve() == index.resolve()
    assert f"Playwright report: {index}" in out
    assert not list(run_dir.glob(".blob-reports*"))  # the merge's staging folder is gone
    assert_no_leftovers(config)


def test_two_overlapping_runs_each_list_only_their_own_projects(pwconfig: Path) -> None:
    repo = pwconfig.parent
    first = nox(pwconfig, "-j", "auto", "-s", "e2e-alpha", "e2e-beta", env={"E2E_RUN_ID": "run-a"})
    config = e2e_infra.load_config(pwconfig, environ={})
    deadline = time.monotonic() + 60
    while not (config.results_dir / "run-a" / "alpha").exists():  # the first run has begun
        assert time.monotonic() < deadline and first.poll() is None, "run-a did not start"
        time.sleep(0.1)
    second = nox(pwconfig, "-s", "e2e-gamma", env={"E2E_RUN_ID": "run-b"})
    (code_a, out_a), (code_b, out_b) = finish(first), finish(second)
    assert code_a == 0, out_a
    assert code_b == 0, out_b
    runs = {"run-a": ("alpha", "beta"), "run-b": ("gamma",)}
    spans = {}
    for run, projects in runs.items():
        run_dir = config.results_dir / run
        records = [json.loads((run_dir / p / "run.json").read_text()) for p in projects]
        spans[run] = (
            min(r["started_at"] for r in records),
            max(r["started_at"] + r["duration"] for r in records),
        )
        assert sorted(p.name for p in run_dir.iterdir() if (p / "run.json").exists()) == list(
            projects
        )
        assert sorted(read_report(run_dir).projects) == list(projects)
        tests = merged_tests(run_dir / "playwright-report" / "index.html")
        assert sorted(tests) == [f"{p}/page.spec.ts" for p in projects]
    (a0, a1), (b0, b1) = spans["run-a"], spans["run-b"]
    assert a0 < b1 and b0 < a1, f"the runs did not overlap: {spans}"
    # Each summary table (printed at nox's exit) names only its own projects.
    summary_a = out_a[out_a.index("e2e run summary") :]
    summary_b = out_b[out_b.index("e2e run summary") :]
    assert "alpha" in summary_a and "beta" in summary_a and "gamma" not in summary_a
    assert "gamma" in summary_b and "alpha" not in summary_b and "beta" not in summary_b
    assert str(config.results_dir / "run-a" / "report.html") in out_a
    assert str(config.results_dir / "run-b" / "report.html") in out_b
    assert_no_leftovers(config)
    assert not (repo / "test-results").exists()


# --- the whole demo while something keeps deleting test-results/ ---------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("hostile")
    ensure_node_packages()
    config_path = copy_config(REPO_ROOT / "pyproject.toml", folder, port_range="19700-19799")
    with running_cluster(e2e_infra.load_config(config_path, environ={})):
        yield config_path


class Deleter(threading.Thread):
    """Deletes the given folders every ``period`` seconds until stopped."""

    def __init__(self, folders: list[Path], period: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.folders = folders
        self.period = period
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            for folder in self.folders:
                shutil.rmtree(folder, ignore_errors=True)


def test_a_loop_deleting_test_results_does_not_break_a_full_parallel_demo_run(
    demo: Path, cli: Cli, repo_root: Path
) -> None:
    config = e2e_infra.load_config(demo, environ={})
    # ./test-results where nox runs (the repository: pytest-playwright's default output) and
    # next to each working folder and the config (Playwright Test's default outputDir).
    targets = {repo_root / "test-results", demo.parent / "test-results"}
    targets |= {project.cwd / "test-results" for project in config.projects.values()}
    deleter = Deleter(sorted(targets))
    deleter.start()
    try:
        code, out = finish(nox(demo, "-j", "auto", "-t", "e2e"), timeout=600)
    finally:
        deleter.stopped.set()
        deleter.join()
    assert code == 0, out
    env = config_environ(demo)
    listed = cli.invoke("e2e.list", "--json", env=env, search_root=False, timeout=60, check=True)
    rows = {row["project"]: row for row in json.loads(listed.stdout)["projects"]}
    assert set(rows) == set(config.projects)
    assert {name: row["last_result"] for name, row in rows.items()} == dict.fromkeys(
        config.projects, "passed"
    )
    run_dir = project_folder(config.results_dir, "browser_node").parent
    assert sorted(read_report(run_dir).projects) == sorted(config.projects)
    assert_no_leftovers(config)
    # No database of the run is left (the templates stay, for the next run).
    cluster = e2e_infra.LocalCluster(
        config,
        e2e_infra.make_registry(config),
        e2e_infra.PortAllocator.from_config(config, e2e_infra.make_registry(config)),
    )
    with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
        names = [
            name
            for (name,) in conn.execute(
                "SELECT datname FROM pg_database "
                "WHERE NOT datistemplate AND starts_with(datname, %s)",
                (config.database.name_base + "_",),
            ).fetchall()
        ]
    assert [name for name in names if "_tpl_" not in name] == []
