"""The demo's real-browser projects, run through nox with a real Chromium.

``browser_ui`` (pytest-playwright) and ``browser_node`` (Playwright Test, installed by its own
command from the committed lock) log in through the real frontend, read data of their seeded
database, change it through the page and check it in SQL. Both keep Playwright's default output
folders, which Playwright empties at every start. Chromium is the system's (``.ci/run`` installs
Debian's package); nothing here is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import pytest
from support import REPO_ROOT
from support.cli import CLI, config_environ
from support.clusters import running_cluster
from support.runs import project_folder, run_processes

import e2e_infra
from e2e_infra.testing import copy_config

pytestmark = pytest.mark.integration

DEMO_E2E = REPO_ROOT / "demo" / "e2e"
PORT_RANGE = "19400-19499"
PROJECTS = {"browser_ui": 3, "browser_node": 2}  # project -> its number of tests

FAILING_UI_TEST = """\
from playwright.sync_api import Page, expect


def test_fails_on_purpose(page: Page, frontend_url: str) -> None:
    page.goto(f"{frontend_url}/login.html")
    expect(page.locator("h2")).to_have_text("Not the heading", timeout=500)
"""

FAILING_NODE_TEST = """\
import { test, expect } from "@playwright/test";

test("fails on purpose", async ({ page }) => {
  await page.goto(`${process.env.FRONTEND_URL}/login.html`);
  await expect(page.locator("h2")).toHaveText("Not the heading", { timeout: 500 });
});
"""


def demo_project(name: str) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"][
        "e2e_infra"
    ]["projects"][name]
    return table


def failing_copies(folder: Path) -> dict[str, Any]:
    """Copies of both suites with one extra failing test, as projects ``<name>_failing``.

    The copies live under ``folder`` so Playwright's default ``test-results/`` (relative to the
    working folder) lands there; each runs its project's real command and flags.
    """
    e2e = folder / "e2e"
    e2e.mkdir()
    for name in ("conftest.py", "pytest.ini"):
        shutil.copy2(DEMO_E2E / name, e2e / name)
    shutil.copytree(DEMO_E2E / "browser_ui", e2e / "browser_ui", ignore=_generated)
    (e2e / "browser_ui" / "test_fails_on_purpose.py").write_text(FAILING_UI_TEST)
    shutil.copytree(DEMO_E2E / "browser_node", e2e / "browser_node", ignore=_generated)
    (e2e / "browser_node" / "tests" / "fails_on_purpose.spec.ts").write_text(FAILING_NODE_TEST)
    # The packages the real folder installed (the fixture below ran its install step).
    (e2e / "browser_node" / "node_modules").symlink_to(DEMO_E2E / "browser_node" / "node_modules")

    ui = demo_project("browser_ui")
    ui["command"] = ui["command"].replace("demo/e2e/browser_ui", "e2e/browser_ui")
    ui["cwd"] = str(folder)
    node = demo_project("browser_node")
    node["cwd"] = str(e2e / "browser_node")
    return {"browser_ui_failing": ui, "browser_node_failing": node}


GENERATED = {"node_modules", "node_modules.lock", "test-results", "__pycache__"}


def _generated(_folder: str, names: list[str]) -> set[str]:
    return GENERATED.intersection(names)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("browser")
    # The project's own install step, as its command runs it: a no-op when already installed.
    subprocess.run(["sh", "ensure-deps.sh"], cwd=DEMO_E2E / "browser_node", check=True, timeout=600)
    config_path = copy_config(
        REPO_ROOT / "pyproject.toml",
        folder,
        port_range=PORT_RANGE,
        extra_projects=failing_copies(folder),
    )
    with running_cluster(e2e_infra.load_config(config_path, environ={})):
        yield config_path


@pytest.fixture
def config(workspace: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(workspace, environ={})


def nox(
    config_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return CLI.nox(*args, env=config_environ(config_path, **(env or {})), timeout=300)


def run_record(config: e2e_infra.Config, project: str) -> dict[str, Any]:
    folder = project_folder(config.results_dir, project)
    data: dict[str, Any] = json.loads((folder / "run.json").read_text())
    return data


def junit_counts(path: Path) -> tuple[int, int]:
    """(tests, failures + errors) over every <testsuite> of a JUnit file."""
    suites = list(ET.parse(path).getroot().iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    return tests, failed


def assert_nothing_left(config: e2e_infra.Config) -> None:
    registry = e2e_infra.make_registry(config)
    assert [lease for lease in registry.snapshot() if lease.project != "postgres"] == []
    # Servers, suites and the Chromium they launched all carry the run's E2E_RESULTS_DIR.
    assert run_processes(config.results_dir) == []
    ports = e2e_infra.PortAllocator.from_config(config, registry)
    cluster = e2e_infra.LocalCluster(config, registry, ports)
    with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname LIKE %s",
            (config.database.name_base + "\\_%",),
        ).fetchall()
    assert [name for (name,) in rows if "_tpl_" not in name] == []


def test_both_browser_projects_pass_in_parallel_and_leave_nothing(
    workspace: Path, config: e2e_infra.Config
) -> None:
    proc = nox(workspace, "-j", "auto", "-s", *(f"e2e-{p}" for p in PROJECTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    databases = set()
    for project, tests in PROJECTS.items():
        record = run_record(config, project)
        assert record["result"] == "passed", record
        assert record["seed"] == "default"
        databases.add(record["database"])
        junit = project_folder(config.results_dir, project) / "junit.xml"
        assert junit_counts(junit) == (tests, 0)
    assert len(databases) == 2
    assert_nothing_left(config)


def artifacts_folder(workspace: Path, config: e2e_infra.Config, project: str) -> Path:
    """Where a failed test's artifacts go: pytest-playwright's default, test-results/ in the
    working folder; Playwright Test's outputDir, moved by the tool into the project's results."""
    if project == "browser_ui":
        return workspace.parent / "test-results"
    return project_folder(config.results_dir, f"{project}_failing") / "test-results"


class FailureItems(HTMLParser):
    """The failing tests of report.html: name, message and the links next to the name."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict[str, Any]] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        if tag == "li" and cls == "failure":
            self.items.append({"name": "", "message": "", "links": []})
        elif self.items and tag == "span" and cls == "test":
            self._in = "name"
        elif self.items and tag == "pre" and cls == "message":
            self._in = "message"
        elif self.items and tag == "a" and "artifact" in cls:
            attributes = dict(attrs)
            self.items[-1]["links"].append((attributes["data-kind"], attributes["href"]))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "pre"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in and self.items:
            self.items[-1][self._in] += data


@pytest.mark.parametrize("project", list(PROJECTS))
def test_a_failing_browser_test_leaves_its_screenshot_and_trace(
    workspace: Path, config: e2e_infra.Config, project: str
) -> None:
    only_it = ["-k", "fails_on_purpose"] if project == "browser_ui" else ["--grep", "on purpose"]
    proc = nox(workspace, "-s", f"e2e-{project}_failing", "--", *only_it)
    assert proc.returncode != 0
    record = run_record(config, f"{project}_failing")
    assert record["result"] == "failed"
    folder = project_folder(config.results_dir, f"{project}_failing")
    tests, failed = junit_counts(folder / "junit.xml")
    assert (tests, failed) == (1, 1), proc.stdout
    # One folder, the failing test's: nothing of an earlier run survives Playwright's wipe.
    kept = [p for p in artifacts_folder(workspace, config, project).iterdir() if p.is_dir()]
    assert len(kept) == 1 and "fails-on-purpose" in kept[0].name, kept
    assert (kept[0] / "test-failed-1.png").read_bytes().startswith(b"\x89PNG")
    assert (kept[0] / "trace.zip").read_bytes().startswith(b"PK")
    # The report: the test's name, its message, and a link that opens its screenshot.
    report = folder.parent / "report.html"
    parser = FailureItems()
    parser.feed(report.read_text())
    [item] = parser.items
    assert "fails" in item["name"] and "purpose" in item["name"], item
    assert "Not the heading" in item["message"], item
    screenshots = [href for kind, href in item["links"] if kind == "screenshot"]
    assert screenshots, item
    assert (report.parent / unquote(screenshots[0])).resolve().read_bytes().startswith(b"\x89PNG")
    assert_nothing_left(config)


@pytest.mark.parametrize("project", list(PROJECTS))
def test_a_missing_chromium_is_one_line_naming_the_fix(
    workspace: Path, config: e2e_infra.Config, project: str
) -> None:
    proc = nox(workspace, "-s", f"e2e-{project}", env={"CHROMIUM_PATH": "/nonexistent/chromium"})
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    # Once where the suite said it; the summary repeats the end of its console output, indented.
    said, summary = output.split("e2e run summary", 1)
    lines = [line for line in said.splitlines() if "CHROMIUM_PATH=/nonexistent" in line]
    assert len(lines) == 1, output
    tail = summary.split("last lines of its console output", 1)[1].splitlines()[1]
    assert tail == "    " + lines[0].strip(), output
    assert "Traceback" not in output and "    at " not in output
    assert run_record(config, project)["result"] == "failed"
    assert_nothing_left(config)
