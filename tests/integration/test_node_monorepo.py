"""A Node monorepo adopted as its team would: ``tests/fixtures/nodemono``.

npm workspaces (a committed lock), an API on PostgreSQL migrated by node-pg-migrate and seeded by
two node scripts (profiles ``default`` and ``small``), a dashboard and a Playwright reporter plugin
that need a build, and two Playwright Test configs: the root one (projects ``api`` and
``orders``, only ``list`` + ``html`` reporters in an explicit folder) and the dashboard's own
(``list``, ``html`` in an explicit folder, the plugin, a real Chromium). Failing tests sit behind
``NODEMONO_FAIL=1``. Its ``e2e-config.toml`` is what the team adds after ``init``: three e2e
projects, the build as a prepare step, ``database.env`` and ``seed_inputs``.

Each test names the point of issue 22 it proves. The repository's node_modules are the
fixture's own (``ensure-deps.sh``: ``npm ci`` only when the lock changed), linked into a copy.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from support import FIXTURES_DIR, REPO_ROOT
from support.cli import CLI, config_environ
from support.clusters import running_cluster
from support.runs import run_processes

import e2e_infra
from e2e_infra.testing import copy_config

pytestmark = pytest.mark.integration

FIXTURE = FIXTURES_DIR / "nodemono"
PORT_RANGE = "25000-25099"
PROJECTS = ("api", "orders", "dashboard")


def ensure_node_packages() -> Path:
    subprocess.run(["sh", "ensure-deps.sh"], cwd=FIXTURE, check=True, timeout=600)
    return FIXTURE / "node_modules"


def make_repo(folder: Path) -> Path:
    """A copy of the fixture (its node_modules linked) with the tool's root files and its
    config; returns the config file."""
    packages = ensure_node_packages()
    repo = folder / "repo"
    shutil.copytree(FIXTURE, repo, ignore=shutil.ignore_patterns("node_modules"))
    (repo / "node_modules").symlink_to(packages)
    templates = REPO_ROOT / "e2e_infra" / "templates"
    shutil.copy(templates / "tasks.py.tmpl", repo / "tasks.py")
    shutil.copy(templates / "noxfile.py.tmpl", repo / "noxfile.py")
    return copy_config(repo / "e2e-config.toml", repo, port_range=PORT_RANGE)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    config_path = make_repo(tmp_path_factory.mktemp("nodemono"))
    with running_cluster(e2e_infra.load_config(config_path, environ={})):
        yield config_path


def invoke(
    config_path: Path, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(
        *args,
        env=config_environ(config_path, CI="1", **env),
        cwd=config_path.parent,
        search_root=False,
        timeout=timeout,
    )


def load(config_path: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(config_path, environ={})


def run_dir(config_path: Path) -> Path:
    return (load(config_path).results_dir / "latest").resolve()


def record(folder: Path, project: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / project / "run.json").read_text())
    return data


def assert_nothing_left(config_path: Path) -> None:
    config = load(config_path)
    leases = e2e_infra.make_registry(config).snapshot()
    assert [x for x in leases if x.project != "postgres"] == []
    assert run_processes(config.results_dir) == []


# --- points 2, 3, 6, 7, 12: a run of both configs, twice ----------------------------------------


def test_both_configs_pass_with_their_own_reports_one_merged_report_each_and_one_build(
    repo: Path,
) -> None:
    first = invoke(repo, "e2e.all")
    assert first.returncode == 0, first.stdout + first.stderr
    folder = run_dir(repo)
    # 6: the build ran once, before the projects, logged and timed.
    prepare = json.loads((folder / "prepare.json").read_text())
    [step] = prepare["steps"]
    assert step["name"] == "build" and step["status"] == "ran", step
    assert "built the dashboard" in Path(step["log"]).read_text()
    assert "prepare build: ran: first run" in first.stderr
    for project in PROJECTS:
        assert record(folder, project)["result"] == "passed"
        assert record(folder, project)["started_at"] > prepare["started_at"]  # type: ignore[operator]
    # 7: the seed command got database.env (the api suite checks the label it wrote).
    # 12: which template each got, and that this run built it.
    api, orders = record(folder, "api"), record(folder, "orders")
    assert api["template"]["built"] is True  # type: ignore[index]
    assert str(api["template"]["name"]).startswith("e2e_db_tpl_default_")  # type: ignore[index]
    assert str(orders["template"]["name"]).startswith("e2e_db_tpl_small_")  # type: ignore[index]
    assert api["template"]["build_seconds"] > 0  # type: ignore[index]
    # 3: the dashboard's config (used by it alone) keeps its HTML report where it says, and the
    # team's plugin finds it; the root config, shared by api and orders, is redirected per run.
    team_report = repo.parent / "packages" / "dashboard" / "html-report" / "index.html"
    assert team_report.is_file()
    assert (
        f"html-report-check: found {team_report}"
        in (folder / "dashboard" / "suite.log").read_text()
    )
    assert record(folder, "dashboard")["playwright_report"] == str(team_report)
    assert not (repo.parent / "reports").exists()  # the root config's folder: redirected
    for project in ("api", "orders"):
        assert (folder / project / "playwright-report" / "index.html").is_file()
    # 1 (counts): no junit reporter anywhere, still every test counted, from the blobs.
    junit = (folder / "api" / "junit.xml").read_text()
    assert 'tests="4"' in junit and 'failures="0"' in junit and 'skipped="2"' in junit
    # 2: two test directories, two merged reports, both linked; no failed merge.
    merged = sorted(p.parent.name for p in folder.glob("playwright-report*/index.html"))
    assert merged == ["playwright-report-e2e", "playwright-report-packages-dashboard-e2e"]
    page = (folder / "report.html").read_text()
    for name in merged:
        assert f'class="playwright-report" href="{name}/index.html"' in page
    assert "different test directories" not in first.stderr
    assert 'data-step="build" data-status="ran"' in page
    assert_nothing_left(repo)

    second = invoke(repo, "e2e.all", "--projects", "api")
    assert second.returncode == 0, second.stdout + second.stderr
    folder = run_dir(repo)
    [step] = json.loads((folder / "prepare.json").read_text())["steps"]
    assert step["status"] == "skipped" and step["reason"] == "inputs unchanged"
    template = record(folder, "api")["template"]
    assert template["built"] is False and "build_seconds" not in template  # type: ignore[operator,index]
    assert_nothing_left(repo)


# --- points 1 and 4: failures of configs without a junit reporter --------------------------------


def test_failing_tests_show_with_message_location_and_folded_attachments(repo: Path) -> None:
    run = invoke(repo, "e2e.all", "--projects", "api,dashboard", NODEMONO_FAIL="1")
    assert run.returncode == 1
    out = run.stderr
    assert (
        "✗ api/broken.spec.ts::reports the stock of a gear as 99: Error: the stock of a gear" in out
    )
    assert "✗ dashboard.spec.ts::shows a gear stock of 99: Error: expect(locator)" in out
    assert "no JUnit" not in out
    # 4: each failed project's console tail, as lines.
    assert re.search(r"last lines of its console output \(.*api/suite\.log\):\n", out)
    assert "1 failed" in out
    folder = run_dir(repo)
    page = (folder / "report.html").read_text()
    assert '<span class="location">api/broken.spec.ts:7</span>' in page
    assert html.escape("Expected: 99") in page and html.escape("Received: 12") in page
    # Its 30 step screenshots (taken out of the blob) are linked under the test, folded.
    attachments = sorted((folder / "api" / "attachments").glob("*/step-*.png"))
    assert len(attachments) == 30
    assert page.count('<details class="more"><summary>+') >= 2  # the row's files and the test's
    assert "last lines of the suite's console output</summary>" in page
    merged = (folder / "junit.xml").read_text()
    assert "reports the stock of a gear as 99" in merged and "the stock of a gear" in merged
    assert_nothing_left(repo)


# --- point 6: a prepare step that fails --------------------------------------------------------


def test_a_failed_build_fails_the_run_clearly_and_runs_no_project(repo: Path) -> None:
    source = repo.parent / "packages" / "reporter" / "src" / "reporter.mjs"
    original = source.read_text()
    source.write_text(original + "\n// changed: the build must run again\n")
    try:
        run = invoke(repo, "e2e.all", NODEMONO_BUILD_FAIL="1")
    finally:
        source.write_text(original)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    error = lines[-1]
    assert error.startswith(
        "error: prepare step build (`npm run e2e:prepare`) failed with exit code"
    )
    assert "error TS1005: the build failed on purpose" in error and "no project ran" in error
    assert "last lines of its output (" in run.stderr  # the log's tail, as lines
    folder = run_dir(repo)
    assert not any((folder / project / "run.json").exists() for project in PROJECTS)
    assert 'data-step="build" data-status="failed"' in (folder / "report.html").read_text()
    assert "Traceback" not in run.stderr


# --- points 7 and 11: a seed that fails, and what seed_inputs change -----------------------------


def test_a_failing_seed_keeps_its_whole_output_and_prints_its_last_lines(repo: Path) -> None:
    data = repo.parent / "seeds" / "data" / "items.json"
    original = data.read_text()
    data.write_text(original.replace("12]", "13]"))  # a new fingerprint: the seed runs again
    try:
        run = invoke(repo, "e2e.run", "api", NODEMONO_SEED_FAIL="1")
    finally:
        data.write_text(original)
    assert run.returncode != 0
    folder = run_dir(repo)
    api = record(folder, "api")
    log = Path(str(api["error_log"]))
    assert log.parent == folder / "database" and log.name.startswith("seed-default-")
    assert log.read_text().splitlines() == [
        "seeding line 1 of 3",
        "seeding line 2 of 3",
        "Error: the seed failed on purpose (NODEMONO_SEED_FAIL is set)",
    ]
    assert f"its whole output: {log}" in str(api["error"])
    assert "\n" not in str(api["error"])
    # The summary prints the end of it as lines, report.html links it.
    assert "    seeding line 2 of 3\n    Error: the seed failed on purpose" in run.stderr
    assert f'href="{os.path.relpath(log, folder)}"' in (folder / "report.html").read_text()


def test_seed_inputs_shape_only_their_profiles_template(repo: Path) -> None:
    from e2e_infra.databases.names import fingerprint

    config = load(repo)
    migrations = e2e_infra.migration_runner(config)

    def prints() -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            fingerprint(migrations, e2e_infra.seed_runner(config, p), p, 15)
            for p in ("default", "small")
        )

    before = prints()
    data = repo.parent / "seeds" / "data" / "items.json"
    original = data.read_text()
    data.write_text(original + "\n")
    try:
        changed = prints()
    finally:
        data.write_text(original)
    assert changed[0] != before[0] and changed[1] == before[1]
    assert prints() == before


# --- point 14: the CPU of a server's grandchildren -----------------------------------------------


def test_the_cpu_of_a_servers_grandchildren_is_counted(repo: Path) -> None:
    # The API runs as npm -> sh -> node; the node process burns 4 s of CPU for one test.
    run = invoke(repo, "e2e.run", "api", NODEMONO_BURN_MS="4000")
    assert run.returncode == 0, run.stdout + run.stderr
    resources = record(run_dir(repo), "api")["resources"]
    assert resources["cpu_seconds"] >= 4.0, resources  # type: ignore[index]


# --- point 8: a database that outlives the CI step that allocated it ----------------------------


def step(config_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    """One CI step: a new shell running ``command``; the shell is gone when it returns."""
    argv = [sys.executable, "-m", "invoke"]
    script = " ".join(argv) + " " + command
    env = config_environ(config_path, CI="1")
    env.pop("E2E_OWNER_PID", None)
    return CLI.run(["sh", "-c", script], env=env, cwd=config_path.parent, timeout=180)


def test_ci_steps_share_a_database_through_a_lease_with_a_time_to_live(repo: Path) -> None:
    # Without --ttl the database's owner is the step's shell: gone, so is the database.
    plain = step(repo, "db.allocate --project orders --json")
    assert plain.returncode == 0, plain.stderr
    lost = step(repo, "db.url --project orders")
    assert lost.returncode == 2 and "has no live database" in lost.stderr

    got = json.loads(step(repo, "db.allocate --project orders --ttl 600 --json").stdout)
    assert got["expires"] > time.time() + 500
    url = step(repo, "db.url --project orders")
    assert url.returncode == 0, url.stderr
    assert url.stdout.strip() == got["database_url"]
    assert step(repo, f"db.url --project orders --lease {got['lease']}").stdout == url.stdout
    assert step(repo, "db.cleanup").returncode == 0  # its owner's pid is gone: no proof
    assert step(repo, "e2e.cleanup").returncode == 0
    with psycopg.connect(url.stdout.strip()) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (2,)
    listed = json.loads(step(repo, "db.list --json").stdout)["databases"]
    [mine] = [d for d in listed if d["name"] == got["database"]]
    assert mine["status"].startswith("live until")
    released = step(repo, f"db.release --project orders --lease {got['lease']}")
    assert f"dropped {got['database']}" in released.stdout

    # Once its time has passed, cleanup drops it, saying why.
    short = json.loads(step(repo, "db.allocate --project orders --ttl 1 --json").stdout)
    time.sleep(2.5)
    assert step(repo, "db.url --project orders").returncode == 2
    cleaned = step(repo, "db.cleanup")
    assert (
        f"dropped {short['database']}: lease is stale: its time to live ran out" in cleaned.stdout
    )
    assert_nothing_left(repo)


# --- point 9: nox's uv probe, and prepare under nox -j ------------------------------------------


def test_nox_runs_two_projects_with_one_prepare_and_no_uv_noise(repo: Path, tmp_path: Path) -> None:
    env = config_environ(repo, CI="1", UV="/nonexistent/uv")  # no uv: nox says so on every session
    argv = [sys.executable, "-m", "nox", "-f", str(repo.parent / "noxfile.py")]
    run = CLI.run(
        [*argv, "-j", "auto", "-s", "e2e-api", "e2e-orders"], env=env, cwd=repo.parent, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "uv binary not found" not in run.stdout + run.stderr
    folder = run_dir(repo)
    assert {record(folder, p)["result"] for p in ("api", "orders")} == {"passed"}
    assert len(json.loads((folder / "prepare.json").read_text())["steps"]) == 1
    # The control: a noxfile without the tool, same environment, says it.
    (tmp_path / "noxfile.py").write_text(
        "import nox\n\n@nox.session(python=False)\ndef hello(session):\n    session.log('hi')\n"
    )
    control = CLI.run(
        [sys.executable, "-m", "nox", "-f", str(tmp_path / "noxfile.py")],
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert "uv binary not found" in control.stdout + control.stderr
    assert_nothing_left(repo)


# --- point 10: reading starts nothing ------------------------------------------------------------


def test_db_list_after_a_purge_starts_no_cluster(repo: Path, tmp_path: Path) -> None:
    env = {"E2E_STATE_DIR": str(tmp_path / "state"), "E2E_PG_TMPFS": "0"}
    assert invoke(repo, "pg.start", **env).returncode == 0
    assert invoke(repo, "pg.stop", "--purge", **env).returncode == 0
    listed = invoke(repo, "db.list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["databases"] == []
    assert json.loads(listed.stdout)["cluster"] == "not running"
    url = invoke(repo, "db.url", "--project", "api", **env)
    assert url.returncode == 2 and "no local PostgreSQL cluster runs" in url.stderr
    assert invoke(repo, "db.cleanup", **env).stdout.startswith("nothing to drop: no local")
    status = json.loads(invoke(repo, "pg.status", "--json", **env).stdout)
    assert status["running"] is False
    assert not (tmp_path / "state" / "pg").exists()
    leases = json.loads(invoke(repo, "ports.list", "--json", **env).stdout)["leases"]
    assert leases == []


# --- points 5 and 13: init in the Node repository -----------------------------------------------


def test_init_proposes_the_playwright_projects_servers_and_migrations(tmp_path: Path) -> None:
    repo = tmp_path / "shop"
    shutil.copytree(FIXTURE, repo, ignore=shutil.ignore_patterns("node_modules", "e2e-config.toml"))
    (repo / "node_modules").symlink_to(ensure_node_packages())
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2E_")}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text(".env*\n")
    first = CLI.console("init", env=env, cwd=repo, timeout=120)
    assert first.returncode == 0, first.stderr
    # The dashboard's config imports the reporter plugin, which is not built yet: named.
    assert (
        "note: packages/dashboard/playwright.config.ts: Playwright could not read it (Error: "
        "Cannot find module '../reporter/dist/reporter.mjs')" in first.stdout
    )
    # 13: the repository's rules hide the .env.example init wrote: said, with the rule.
    assert (
        "note: .env.example is ignored by the repository's rules (.gitignore:1:.env*)"
        in first.stdout
    )
    config = e2e_infra.load_config(repo / "pyproject.toml", environ={})
    assert {n: p.command for n, p in config.projects.items()} == {
        "api": "npx playwright test --project=api",
        "orders": "npx playwright test --project=orders",
    }

    # Built (the team's e2e:prepare), the dashboard's config reads: its project and servers too.
    subprocess.run(["npm", "run", "e2e:prepare"], cwd=repo, check=True, capture_output=True)
    (repo / "pyproject.toml").unlink()
    (repo / ".env.example").write_text("# E2E_STATE_DIR=.e2e-infra\n")
    again = CLI.console("init", env=env, cwd=repo, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "2 config(s), 2 webServer entr(y/ies)" in again.stdout
    assert re.search(
        r"skip \.env\.example: .* it lacks \d+ E2E_\* setting\(s\): E2E_RESULTS_DIR", again.stdout
    )
    config = e2e_infra.load_config(repo / "pyproject.toml", environ={})
    assert sorted(config.projects) == ["api", "dashboard", "orders"]
    dashboard = config.projects["dashboard"]
    assert dashboard.command == "npx playwright test"
    assert dashboard.cwd == repo / "packages" / "dashboard"
    assert dashboard.servers == ("api", "dashboard")
    assert config.projects["api"].servers == ("api",)
    api = config.servers["api"]
    assert api.command == "npm run start --workspace @nodemono/api"
    assert api.health == "http://127.0.0.1:{port}/health" and api.port == "api"
    assert config.servers["dashboard"].cwd == repo / "packages" / "dashboard"
    assert config.database.migrate_command == "npx node-pg-migrate up"
    dry = CLI.console("init", "--dry-run", env=env, cwd=repo, timeout=120)
    assert "    # E2E_RESULTS_DIR=e2e-results" in dry.stdout  # the lines to add, shown
