"""``test-results/report.html`` after real parallel runs, read back with an HTML parser.

Three trivial projects (one fails, each writes a JUnit file) run through ``invoke e2e.all`` (not a
terminal: plain status lines) and through ``nox -j auto -t e2e`` directly (its exit hook writes the
page). The page must have one row per project with its result, a timeline of its phases, links
that resolve to its files, and nothing loaded from the network.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from support import FIXTURES_DIR
from support.cli import Cli, config_environ
from support.runs import project_folder, run_folder

from e2e_infra.report.html import nice_ticks

pytestmark = pytest.mark.integration

PORT_RANGE = "19200-19299"
PROJECTS = {"alpha": 0, "beta": 0, "gamma": 3}  # name -> exit code of its suite

SUITE = """\
import sys, time
name, code, junit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(f"suite {name} says hello", flush=True)
time.sleep(0.3)
with open(junit, "w") as out:
    out.write(f'<testsuite name="{name}" tests="1" failures="{int(code != 0)}">'
              '<testcase classname="suite" name="t">'
              + (f'<failure message="exit {code}"/>' if code else "") + '</testcase></testsuite>')
sys.exit(code)
"""


def write_config(folder: Path) -> Path:
    (folder / "suite.py").write_text(SUITE)
    body = textwrap.dedent(
        f"""
        [tool.e2e_infra]
        state_dir = "{folder / "state"}"
        results_dir = "{folder / "results"}"
        port_range = "{PORT_RANGE}"
        """
    )
    for name, code in PROJECTS.items():
        body += textwrap.dedent(
            f"""
            [tool.e2e_infra.projects.{name}]
            command = "{{python}} suite.py {name} {code} {{results_dir}}/junit.xml"
            cwd = "{folder}"
            servers = []
            database = false
            """
        )
    (folder / "pyproject.toml").write_text(body)
    return folder / "pyproject.toml"


class Page(HTMLParser):
    """The rows, the phase bars per row, every link and every resource reference."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        for key in ("href", "src", "srcset", "action", "data"):
            if key in a:
                self.refs.append((tag, key, a[key]))
        if tag == "tr" and "run" in a.get("class", "").split():
            self.rows.append(
                {
                    "project": a["data-project"],
                    "result": a["data-result"],
                    "phases": [],
                    "links": [],
                }
            )
        elif self.rows and tag == "div" and "phase" in a.get("class", "").split():
            self.rows[-1]["phases"].append((a["data-phase"], a["style"]))
        elif self.rows and tag == "a":
            self.rows[-1]["links"].append(a["href"])


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check_page(report: Path) -> Page:
    page = parse(report)
    assert sorted(row["project"] for row in page.rows) == sorted(PROJECTS)  # one row each
    results = {row["project"]: row["result"] for row in page.rows}
    assert results == {"alpha": "passed", "beta": "passed", "gamma": "failed"}
    for row in page.rows:
        phases = [name for name, _ in row["phases"]]
        assert "suite" in phases and "ports" in phases, row
        for _, style in row["phases"]:
            assert "left:" in style and "width:" in style
        names = {Path(href).name for href in row["links"]}
        assert {"junit.xml", "run.json"} <= names
        for href in row["links"]:
            assert not href.startswith(("http:", "https:", "/")), href  # relative, offline
            assert (report.parent / href).is_file(), href
    # Self-contained: no script, no stylesheet link, no image or frame, nothing remote.
    assert not page.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert all(tag == "a" for tag, _, _ in page.refs)
    assert "http://" not in report.read_text() and "https://" not in report.read_text()
    return page


def test_invoke_e2e_all_shows_plain_status_lines_and_writes_the_report(
    tmp_path: Path, cli: Cli
) -> None:
    config = write_config(tmp_path)
    proc = cli.invoke("e2e.all", env=config_environ(config), cwd=tmp_path, timeout=180)
    assert proc.returncode != 0  # gamma failed
    report = run_folder(tmp_path / "results").resolve() / "report.html"  # latest -> the run
    check_page(report)
    assert f"report: {report}" in proc.stderr
    # Not a terminal: one plain line per phase change, ending with each project's result.
    for name in PROJECTS:
        assert f"] {name}: suite (" in proc.stderr
    assert "] alpha: passed in" in proc.stderr and "] gamma: failed in" in proc.stderr
    # Each project's output as one block when it ends (it ran in a fork of one warm process).
    block = proc.stderr.partition("== e2e-alpha: passed ==")[2]
    assert block.lstrip().startswith("suite alpha says hello"), proc.stderr
    assert "== e2e-gamma: failed ==" in proc.stderr
    status = json.loads((project_folder(tmp_path / "results", "gamma") / "status.json").read_text())
    assert status["done"] is True and status["phase"] == "failed"


def test_on_a_terminal_the_status_is_a_live_table_and_project_output_goes_to_files(
    tmp_path: Path, cli: Cli
) -> None:
    config = write_config(tmp_path)
    controller, terminal = pty.openpty()
    proc = cli.popen(
        cli.invoke_argv("e2e.all"),
        cwd=tmp_path,
        # CI=true asks for plain lines even on a terminal; this test is about the terminal.
        env={k: v for k, v in config_environ(config, TERM="xterm").items() if k != "CI"},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert proc.wait(timeout=180) != 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "e2e run: 3/3 done" in screen  # the live table's title, redrawn in place
    # The projects' output went to a file each; only a failed one's tail is shown, after the run.
    # Not while the table runs; after it, the summary's tail of gamma's console (its suite.log),
    # once: not again from gamma.output.log.
    during, _, after = screen.partition("e2e run summary")
    assert "says hello" not in during
    assert "gamma/suite.log" in after and "gamma.output.log" not in after, after
    run = run_folder(tmp_path / "results")
    assert "suite alpha says hello" in (run / "alpha.output.log").read_text()
    check_page(run_folder(tmp_path / "results") / "report.html")


def test_nox_in_parallel_writes_the_report_at_exit(tmp_path: Path, cli: Cli) -> None:
    config = write_config(tmp_path)
    proc = cli.nox("-j", "auto", "-t", "e2e", env=config_environ(config), timeout=180)
    assert proc.returncode != 0
    page = check_page(run_folder(tmp_path / "results") / "report.html")
    # One time axis for every project: each row's first bar starts at its own start time.
    records = {
        name: json.loads((project_folder(tmp_path / "results", name) / "run.json").read_text())
        for name in PROJECTS
    }
    t0 = min(r["started_at"] for r in records.values())
    end = max(
        r["started_at"] + max(r["duration"], sum(r["phases"].values())) for r in records.values()
    )
    for row in page.rows:
        first_style = row["phases"][0][1]
        left = float(first_style.split("left:")[1].split("%")[0])
        axis = nice_ticks(end - t0)[-1]  # the axis ends on its last round tick
        expected = 100 * (records[row["project"]]["started_at"] - t0) / axis
        assert abs(left - expected) < 0.01, (row["project"], left, expected)


# --- what a person sees: a run with a passed, a failed and a broken project, in real Chromium ----

FIXTURES = FIXTURES_DIR / "report"
VISUAL_PROJECTS = {"web_api": "pass", "checkout_ui": "fail", "reports": "broken"}


def write_visual_config(folder: Path) -> Path:
    body = textwrap.dedent(
        f"""
        [tool.e2e_infra]
        state_dir = "{folder / "state"}"
        results_dir = "{folder / "results"}"
        port_range = "19300-19399"

        [tool.e2e_infra.servers.api]
        command = "{{python}} {FIXTURES / "broken_server.py"}"
        cwd = "{folder}"
        port = "backend"
        startup_timeout = 5
        """
    )
    for name, mode in VISUAL_PROJECTS.items():
        body += textwrap.dedent(
            f"""
            [tool.e2e_infra.projects.{name}]
            command = "{{python}} {FIXTURES / "suite.py"} {mode} {{results_dir}}"
            cwd = "{folder}"
            servers = {'["api"]' if mode == "broken" else "[]"}
            database = false
            """
        )
    (folder / "pyproject.toml").write_text(body)
    return folder / "pyproject.toml"


def chromium() -> str:
    """Chromium for the visual check: CHROMIUM_PATH or on PATH. Required, never skipped."""
    found = os.environ.get("CHROMIUM_PATH") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None
    )
    if not found:
        pytest.fail(
            "the report is checked in a real browser: install Chromium "
            "(apt-get install chromium) or set CHROMIUM_PATH"
        )
    return found


def test_a_failed_run_reads_well_in_chromium(tmp_path: Path, cli: Cli) -> None:
    browser_path = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the visual check drives Chromium with playwright: pip install -e '.[dev]'")
    config = write_visual_config(tmp_path)
    proc = cli.invoke("e2e.all", env=config_environ(config), cwd=tmp_path, timeout=180)
    assert proc.returncode != 0, proc.stderr
    # The terminal summary says it too: the counts, the failing test and its message.
    assert "3 passed, 1 failed, 1 skipped" in proc.stderr, proc.stderr
    failing = "tests.test_orders::test_order_total[chromium]"
    assert f"{failing}: AssertionError: the order total shows 41.00" in proc.stderr
    assert 'relation "orders" does not exist' in proc.stderr
    report = run_folder(tmp_path / "results") / "report.html"
    text = report.read_text(encoding="utf-8")
    assert "s3cret-pw" not in text and "s3cret-pw" not in proc.stderr
    started = {
        name: json.loads((project_folder(tmp_path / "results", name) / "run.json").read_text())[
            "started_at"
        ]
        for name in VISUAL_PROJECTS
    }
    rows = [row["project"] for row in parse(report).rows]
    assert rows == sorted(started, key=lambda name: started[name])  # in the order they started

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 900})
            tab.goto(report.as_uri())
            assert tab.locator("tr.run").count() == 3
            failed = tab.locator('tr.run[data-project="checkout_ui"]')
            assert "status-red" in (failed.get_attribute("class") or "").split()
            assert "bar-red" in (failed.locator(".track").get_attribute("class") or "")
            red = failed.locator(".phase.result").evaluate("e => getComputedStyle(e).background")
            assert "rgb(211, 47, 47)" in red  # the suite's bar is red, not a passed green
            passed = tab.locator('tr.run[data-project="web_api"]')
            assert "status-green" in (passed.get_attribute("class") or "").split()
            assert failed.locator("td.tests").inner_text() == "3 passed, 1 failed, 1 skipped"
            # The failing test, its message and its screenshot.
            detail = tab.locator('tr.detail[data-project="checkout_ui"]')
            assert detail.locator(".test").inner_text() == failing
            message = detail.locator("pre.message").inner_text()
            assert "the order total shows 41.00, expected 42.00" in message
            href = detail.locator('a[data-kind="screenshot"]').get_attribute("href") or ""
            assert not href.startswith(("/", "file:")), href  # relative: the folder travels
            target = (report.parent / href).resolve()
            assert target.is_file() and target.name == "test-failed-1.png", target
            kinds = failed.locator("td.files a.artifact").evaluate_all(
                "links => links.map(a => a.dataset.kind)"
            )
            assert {"screenshot", "trace", "Playwright report"} <= set(kinds), kinds
            # The broken server: its error and the tail of its log.
            broken = tab.locator('tr.detail[data-project="reports"]')
            assert 'relation "orders" does not exist' in broken.locator("pre.log").inner_text()
            # Every phase can be seen and hovered, however short.
            for bar in tab.locator(".phase").all():
                box = bar.bounding_box()
                assert box is not None and box["width"] >= 3.5, bar.get_attribute("title")
                assert " s (from +" in (bar.get_attribute("title") or "")
            # Round tick labels: 0 s, then steps of 1, 2 or 5 x 10^n.
            labels = tab.locator(".axis span").all_inner_texts()
            values = [float(label.removesuffix(" s")) for label in labels]
            assert values[0] == 0 and len(values) >= 3, labels
            assert f"{values[1]:e}"[0] in "125" and set(f"{values[1]:e}"[1:5]) <= {".", "0"}
            tab.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
