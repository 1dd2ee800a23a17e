"""The daily loop on the demo: e2e.up, e2e.env, e2e.reset under running servers, e2e.run --attach,
e2e.down; an up process SIGKILLed; a server that dies; retries that name a flaky project.

One embedded cluster for the module, a config in a temp folder (ports 19800-19849) with the
demo's backend (its own small connection pool), a Node server on a ``pg.Pool`` (the npm ``pg`` of
the demo's browser_node package), the demo's auth_tests suite, and a suite that fails once then
passes. Every ``invoke`` runs as a user runs it; what a test leaves is checked from the outside.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import FIXTURES_DIR, REPO_ROOT
from support.cli import CLI, clean_environ, config_environ
from support.clusters import running_cluster
from support.configs import write_pyproject
from support.runs import run_processes

import e2e_infra
from e2e_infra.clock import wait_until
from e2e_infra.resources.leases import process_start_time
from e2e_infra.results.record import Result, RunRecord
from e2e_infra.run.up import UpState, read_up

pytestmark = pytest.mark.integration

PORT_RANGE = "19800-19849"
NODE_MODULES = REPO_ROOT / "demo" / "e2e" / "browser_node" / "node_modules"

# Fails (a JUnit failure) the first time it runs for a marker file, passes after.
FLAKY_SUITE = """\
import pathlib, sys
marker, junit = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
first = not marker.exists()
marker.write_text("ran")
failure = '<failure message="flaked: the first run fails"/>' if first else ""
junit.write_text(
    '<testsuite name="flaky_suite" tests="2">'
    f'<testcase classname="flaky_suite" name="test_sometimes">{failure}</testcase>'
    '<testcase classname="flaky_suite" name="test_always"/></testsuite>'
)
print("first run: failing" if first else "passing")
sys.exit(1 if first else 0)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    subprocess.run(["sh", "ensure-deps.sh"], cwd=NODE_MODULES.parent, check=True, timeout=600)
    folder = tmp_path_factory.mktemp("loop")
    (folder / "flaky_suite.py").write_text(FLAKY_SUITE)
    servers = {
        "backend": {
            "command": "{python} demo/backend/app.py --fd {fd}",
            "cwd": str(REPO_ROOT),
            "listen_socket": True,
            "port": "backend",
            "health": "http://127.0.0.1:{port}/health",
            "needs_database": True,
            "stop_timeout": 5,
        },
        "nodepool": {
            "command": f"node {FIXTURES_DIR / 'loop' / 'pool_server.js'}",
            "cwd": str(folder),
            "port": "frontend",
            "health": "http://127.0.0.1:{port}/",
            "env": {"NODE_PATH": str(NODE_MODULES)},
            "needs_database": True,
            "stop_timeout": 5,
        },
    }
    demo = "{python} -m pytest demo/e2e/auth_tests -p no:cacheprovider -p no:playwright -q"
    projects = {
        "auth_tests": {
            "command": f"{demo} --junitxml={{results_dir}}/junit.xml",
            "cwd": str(REPO_ROOT),
            "seed": "auth_only",
            "servers": ["backend"],
        },
        "nodepool": {"command": "true", "seed": "auth_only", "servers": ["nodepool"]},
        "flaky": {
            "command": f"{{python}} {folder / 'flaky_suite.py'} {folder / 'flaky.marker'} "
            "{results_dir}/junit.xml",
            "cwd": str(folder),
            "database": False,
            "servers": [],
            "retries": 1,
        },
    }
    path = write_pyproject(folder, port_range=PORT_RANGE, servers=servers, projects=projects)
    with running_cluster(e2e_infra.load_config(path, environ=clean_environ())):
        yield path


@pytest.fixture
def config(workspace: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(workspace, environ=clean_environ())


def invoke(path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(*args, env=config_environ(path), timeout=timeout)


class Up:
    """``invoke e2e.up`` in a session of its own, its output in a file."""

    def __init__(self, path: Path, project: str, *args: str) -> None:
        self.config = e2e_infra.load_config(path, environ=clean_environ())
        self.project = project
        self.output = path.parent / f"up-{project}-{time.monotonic_ns()}.out"
        with self.output.open("w") as out:
            self.proc = CLI.popen(
                CLI.invoke_argv("e2e.up", project, *args),
                env=config_environ(path),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text()

    def ready(self, timeout: float = 120) -> UpState:
        def check() -> UpState | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"e2e.up exited {self.proc.returncode}:\n{self.text()}")
            state = read_up(self.config, self.project)
            return state if state is not None and state.pid == self.proc.pid else None

        return wait_until(check, timeout=timeout, what="e2e.up", first=0.05, cap=0.2)

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.end()


def request(url: str, body: dict[str, Any] | None = None, token: str = "") -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def login(base: str) -> str:
    status, body = request(f"{base}/api/login", {"username": "admin", "password": "admin-pass"})
    assert status == 200, body
    return str(body["token"])


def query(url: str, sql: str) -> Any:
    with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
        cursor = conn.execute(sql.encode())
        row = cursor.fetchone() if cursor.description else None
    return row[0] if row else None


def leases(config: e2e_infra.Config, project: str) -> list[e2e_infra.Lease]:
    return [x for x in e2e_infra.make_registry(config).snapshot() if x.project == project]


def databases(config: e2e_infra.Config, prefix: str) -> list[str]:
    """The databases whose name starts with ``prefix`` (asked as the cluster's admin)."""
    ws = e2e_infra.Workspace(config)
    with psycopg.connect(ws.cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
    return [str(row[0]) for row in rows]


def spares(config: e2e_infra.Config) -> list[str]:
    return databases(config, f"{config.database.name_base}_spare_")


def alive(pid: int) -> bool:
    return process_start_time(pid) is not None  # None: gone, or a zombie


def gone(config: e2e_infra.Config, state: UpState) -> bool:
    """Nothing of ``state``'s environment is left: leases, processes, ports, database."""
    return (
        not leases(config, state.project)
        and not any(alive(int(s["pid"])) for s in state.servers.values())
        and not run_processes(config.results_dir)
        and all(e2e_infra.port_is_free(port) for port in state.ports.values())
        and not (state.database and state.database in databases(config, state.database))
    )


# --- the loop -------------------------------------------------------------------------------------


def test_up_env_reset_attach_and_down_on_the_demo(
    workspace: Path, config: e2e_infra.Config, ups: list[Up]
) -> None:
    up = Up(workspace, "auth_tests")
    ups.append(up)
    state = up.ready()
    backend = state.env["BACKEND_URL"]
    url = state.env["DATABASE_URL"]
    banner = up.text()
    assert "auth_tests is up: backend (pid" in banner and f"BACKEND_URL    {backend}" in banner
    assert "invoke e2e.reset auth_tests" in banner
    assert state.database is not None and state.database.startswith(config.database.name_base)
    password = state.database_url.password if state.database_url else ""
    assert password and password not in banner  # shown masked; handed over in the file

    # The environment file and `e2e.env`: what another shell needs, the password included.
    env_file = config.layout.up_env("auth_tests")
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert f"DATABASE_URL={url}" in env_file.read_text()
    exports = invoke(workspace, "e2e.env", "auth_tests")
    assert exports.returncode == 0, exports.stderr
    shell = subprocess.run(
        ["sh", "-c", f'{exports.stdout}\nprintf "%s\\n" "$BACKEND_URL" "$DATABASE_URL"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.splitlines() == [backend, url]
    as_json = json.loads(invoke(workspace, "e2e.env", "auth_tests", "--json").stdout)
    assert as_json["env"]["BACKEND_PORT"] == str(state.ports["backend"])
    listed = json.loads(invoke(workspace, "e2e.list", "--json").stdout)["projects"]
    assert {p["project"]: p["up"] is not None for p in listed} == {
        "auth_tests": True,
        "nodepool": False,
        "flaky": False,
    }

    # Data made by hand (psql, a test that ran) and a session made through the backend, whose
    # pool keeps its connection to the database.
    query(url, "CREATE TABLE scratch (x int)")
    token = login(backend)
    assert request(f"{backend}/api/me", token=token)[0] == 200
    assert query(url, "SELECT count(*) FROM sessions") == 1

    reset = invoke(workspace, "e2e.reset", "auth_tests", "--json")
    assert reset.returncode == 0, reset.stderr
    report = json.loads(reset.stdout)
    assert report["database"] == state.database and report["connections_ended"] >= 1
    # The backend answers at once, from a fresh database of the same name and URL: no table made
    # by hand, no session, the old token unknown; and it is the same process.
    assert request(f"{backend}/api/me", token=token)[0] == 401
    assert query(url, "SELECT to_regclass('public.scratch') IS NULL") is True
    assert query(url, "SELECT count(*) FROM sessions") == 0
    login(backend)
    assert alive(int(state.servers["backend"]["pid"]))
    assert read_up(config, "auth_tests") == state  # nothing of the environment changed

    # The suite against it: the same run record and report as a run; the database reset first.
    query(url, "UPDATE users SET active = false")  # would fail the suite's logins
    attached = invoke(workspace, "e2e.run", "auth_tests", "--attach")
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert "reset " in attached.stderr and "report:" in attached.stderr
    record = config.layout.newest("auth_tests")
    assert record is not None and record.result is Result.PASSED and record.attached
    assert record.ports == state.ports and record.database == state.database
    assert "database" in record.phases and record.folder is not None
    assert record.folder.parent.name != "up" and (record.folder.parent / "report.html").is_file()
    # nox too, the database as it is (--no-reset), the rest to the suite.
    nox = CLI.nox(
        "-s", "e2e-auth_tests", "--", "--attach", "--no-reset", "-k", "login",
        env=config_environ(workspace),
    )  # fmt: skip
    assert nox.returncode == 0, nox.stdout + nox.stderr
    newest = config.layout.newest("auth_tests")
    assert newest is not None and newest.attached and "database" not in newest.phases
    assert alive(int(state.servers["backend"]["pid"]))

    # Down, from another shell: everything released, the up process ends well.
    down = invoke(workspace, "e2e.down", "auth_tests")
    assert down.returncode == 0 and "auth_tests is down" in down.stdout, down.stderr
    assert up.proc.wait(timeout=30) == 0
    assert "auth_tests is down: released" in up.text()
    assert gone(config, state)
    assert not env_file.exists() and not config.layout.up_state("auth_tests").exists()
    assert spares(config) == []  # the one kept for resets too: spares = 0 here
    assert invoke(workspace, "e2e.down", "auth_tests").stdout.strip() == "auth_tests is not up"
    again = invoke(workspace, "e2e.reset", "auth_tests")
    assert again.returncode == 2 and "auth_tests is not up" in again.stderr
    assert "Traceback" not in again.stderr


def test_reset_under_a_node_server_with_a_pg_pool_beside_another_project_up(
    workspace: Path, config: e2e_infra.Config, ups: list[Up]
) -> None:
    up, other = Up(workspace, "nodepool"), Up(workspace, "auth_tests")
    ups += [up, other]
    state, beside = up.ready(), other.ready()
    assert not set(state.ports.values()) & set(beside.ports.values())
    assert state.database != beside.database
    listed = json.loads(invoke(workspace, "e2e.list", "--json").stdout)["projects"]
    assert sorted(p["project"] for p in listed if p["up"]) == ["auth_tests", "nodepool"]
    base = state.env["FRONTEND_URL"]
    url = state.env["DATABASE_URL"]
    query(url, "CREATE TABLE scratch (x int)")
    query(beside.env["DATABASE_URL"], "CREATE TABLE kept (x int)")
    # Four requests at once: the pool opens several connections and keeps them idle.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: request(base), range(4)))
    assert all(status == 200 and body["scratch"] for status, body in answers), answers
    held = query(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
    assert held >= 3  # ours and the pool's

    reset = invoke(workspace, "e2e.reset", "nodepool", "--json")
    assert reset.returncode == 0, reset.stderr
    assert json.loads(reset.stdout)["connections_ended"] >= 2  # the pool's
    status, body = request(base)  # at once: the pool drops its ended clients and reconnects
    assert status == 200 and body == {**body, "scratch": False, "users": 3}, body
    assert alive(int(state.servers["nodepool"]["pid"]))
    log = Path(str(state.servers["nodepool"]["log"])).read_text()
    assert "pool: an idle client was ended" in log and "request failed" not in log
    # The other project's database is untouched.
    assert query(beside.env["DATABASE_URL"], "SELECT to_regclass('public.kept')") == "kept"
    invoke(workspace, "e2e.down", "nodepool")
    invoke(workspace, "e2e.down", "auth_tests")
    assert up.proc.wait(timeout=30) == 0 and other.proc.wait(timeout=30) == 0
    assert gone(config, state) and gone(config, beside) and spares(config) == []


def test_an_up_process_killed_with_sigkill_is_reclaimed_by_its_guardian(
    workspace: Path, config: e2e_infra.Config, ups: list[Up]
) -> None:
    up = Up(workspace, "auth_tests")
    ups.append(up)
    state = up.ready()
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(timeout=10)
    wait_until(
        lambda: gone(config, state), timeout=60, what="the guardian's reclaim", first=0.1, cap=0.5
    )
    listed = json.loads(invoke(workspace, "e2e.list", "--json").stdout)["projects"]
    assert all(p["up"] is None for p in listed)
    env = invoke(workspace, "e2e.env", "auth_tests")
    assert env.returncode == 2 and "auth_tests is not up any more" in env.stderr
    assert not config.layout.up_state("auth_tests").exists()  # forgotten once seen dead


def test_a_server_that_dies_is_named_at_once_and_restarted(
    workspace: Path, config: e2e_infra.Config, ups: list[Up]
) -> None:
    up = Up(workspace, "auth_tests", "--restart")
    ups.append(up)
    state = up.ready()
    old = int(state.servers["backend"]["pid"])
    os.kill(old, signal.SIGKILL)

    def restarted() -> UpState | None:
        now = read_up(config, "auth_tests")
        server = now.servers["backend"] if now is not None else {}
        return now if server.get("pid") not in (None, old) and server.get("alive") else None

    later = wait_until(restarted, timeout=60, what="the restart", first=0.05, cap=0.2)
    text = up.text()
    assert "server backend was killed by SIGKILL at" in text and "backend.log" in text
    assert "restarted backend" in text and "during the suite" not in text
    assert later.ports == state.ports and later.env == state.env  # same port, same URL
    login(state.env["BACKEND_URL"])
    invoke(workspace, "e2e.down", "auth_tests")
    assert up.proc.wait(timeout=30) == 0 and gone(config, later)


# --- retries --------------------------------------------------------------------------------------


def test_a_flaky_project_fails_once_then_passes_and_is_named_flaky(
    workspace: Path, config: e2e_infra.Config
) -> None:
    marker = workspace.parent / "flaky.marker"
    marker.unlink(missing_ok=True)
    run = invoke(workspace, "e2e.run", "flaky")  # retries = 1 in its table
    assert run.returncode == 0, run.stdout + run.stderr
    assert "attempt 1 of 2 failed; running it again on fresh resources" in run.stderr
    record = config.layout.newest("flaky")
    assert record is not None and record.result is Result.FLAKY and record.passed
    assert record.flaky_tests == ("flaky_suite::test_sometimes",)
    assert [a["failed_tests"] for a in record.attempts] == [["flaky_suite::test_sometimes"]]
    assert record.folder is not None
    assert (record.folder / "attempts" / "1" / "run.json").is_file()
    assert "flaky" in run.stderr and "flaky test (failed, then passed on a retry)" in run.stderr
    run_folder = record.folder.parent
    page = (run_folder / "report.html").read_text()
    assert 'data-project="flaky" data-result="flaky"' in page
    merged = ET.parse(run_folder / "junit.xml").getroot()
    flaky_cases = [
        c.get("name") for c in merged.iter("testcase") if c.find("flakyFailure") is not None
    ]
    assert flaky_cases == ["test_sometimes"]
    assert {p.get("value") for p in merged.iter("property")} >= {"flaky", "2"}

    # The pool's path (e2e.all), a --retries of the command line, then a run without retries.
    marker.unlink()
    pooled = invoke(workspace, "e2e.all", "--projects", "flaky", "--jobs", "1", "--retries", "2")
    assert pooled.returncode == 0, pooled.stdout + pooled.stderr
    assert _newest(config).result is Result.FLAKY
    marker.unlink()
    failed = invoke(workspace, "e2e.run", "flaky", "--retries", "0")
    assert failed.returncode == 1 and _newest(config).result is Result.FAILED

    listed = json.loads(invoke(workspace, "e2e.list", "--json").stdout)["projects"]
    mine = next(p for p in listed if p["project"] == "flaky")
    assert mine["last_result"] == "failed"
    assert [h["result"] for h in mine["history"]][-3:] == ["flaky", "flaky", "failed"]
    flips = json.loads(invoke(workspace, "e2e.flaky", "--json").stdout)
    assert [p["project"] for p in flips["projects"]] == ["flaky"]
    assert flips["projects"][0]["strip"].endswith("~~✗")
    test = next(t for t in flips["tests"] if t["project"] == "flaky")
    assert test["test"] == "flaky_suite::test_sometimes" and test["flaky"] == 2
    table = invoke(workspace, "e2e.flaky")
    assert "flaky_suite::test_sometimes" in table.stdout


def _newest(config: e2e_infra.Config) -> RunRecord:
    record = config.layout.newest("flaky")
    assert record is not None
    return record
