"""Server watch: a server that dies during the suite is named, and the run never passes.

Real nox runs against real PostgreSQL: the backend is ``http.server`` started by a small script
that writes its pid; the suites SIGKILL it themselves, then exit 0 (or would sleep on). Also
checked: the stop record of every server, the project's peak memory and CPU in ``run.json``, and
the summary and report.html showing them.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import CLI, clean_environ, config_environ
from support.clusters import running_cluster
from support.configs import write_pyproject
from support.runs import project_folder

import e2e_infra
from e2e_infra.report.summary import RunSummary, print_summary

pytestmark = pytest.mark.integration

PORT_RANGE = "19700-19799"

SERVER = """\
import http.server, os, pathlib, sys
pathlib.Path(os.environ["E2E_RESULTS_DIR"], "backend.pid").write_text(str(os.getpid()))
handler = http.server.SimpleHTTPRequestHandler
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""

# Holds 64 MiB and burns ~0.3 s of CPU, kills the backend, then sleeps argv[1] seconds; exits 0.
SUITE = """\
import os, pathlib, signal, sys, time
ballast = bytearray(64 * 1024 * 1024)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
time.sleep(0.6)  # a memory sample (every 0.5 s) sees the ballast
pid = int(pathlib.Path(os.environ["E2E_RESULTS_DIR"], "backend.pid").read_text())
os.kill(pid, signal.SIGKILL)
time.sleep(float(sys.argv[1]))
print("suite done")
"""


def server(on_exit: str | None) -> dict[str, Any]:
    table: dict[str, Any] = {
        "command": "{python} server.py {port}",
        "port": "backend",
        "health": "http://127.0.0.1:{port}/",
        "startup_timeout": 20,
        "stop_timeout": 2,
    }
    if on_exit is not None:
        table["on_exit"] = on_exit
    return table


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("watch")
    (folder / "server.py").write_text(SERVER)
    (folder / "suite.py").write_text(SUITE)
    servers = {"backend": server(None), "tolerated": server("continue")}
    for table in servers.values():
        table["cwd"] = str(folder)
    projects = {
        # The must-show: kill the backend, then exit 0 (a second later).
        "killer": {"command": "{python} suite.py 1", "servers": ["backend"], "seed": "auth_only"},
        # Would sleep 30 s after the kill: the watch stops it at once.
        "stuck": {"command": "{python} suite.py 30", "servers": ["backend"], "seed": "auth_only"},
        # on_exit = "continue": the suite runs to its end, the run still does not pass.
        "tolerant": {
            "command": "{python} suite.py 1",
            "servers": ["tolerated"],
            "seed": "auth_only",
        },
    }
    for table in projects.values():
        table["cwd"] = str(folder)
    path = write_pyproject(folder, port_range=PORT_RANGE, servers=servers, projects=projects)
    config = e2e_infra.load_config(path, environ=clean_environ())
    with running_cluster(config):
        yield path


@pytest.fixture
def config(workspace: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(workspace, environ=clean_environ())


def nox(config_path: Path, project: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    done = CLI.nox("-s", f"e2e-{project}", env=config_environ(config_path), timeout=120)
    return time.monotonic() - start, done


def record(config: e2e_infra.Config, project: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (project_folder(config.results_dir, project) / "run.json").read_text()
    )
    return data


def test_a_suite_that_sigkills_its_backend_and_exits_0_does_not_pass(
    workspace: Path, config: e2e_infra.Config
) -> None:
    _seconds, done = nox(workspace, "killer")
    assert done.returncode != 0
    run = record(config, "killer")
    assert run["result"] == "error"
    assert "server backend was killed by SIGKILL" in run["error"]
    [ended] = run["server_exits"]
    assert ended["server"] == "backend" and ended["signal"] == "SIGKILL"
    assert ended["returncode"] == -9 and ended["during"] == "suite" and ended["at"] > 0
    assert "server backend was killed by SIGKILL" in done.stdout + done.stderr
    # The stop record is kept: a dead server's says how it ended.
    assert run["server_stops"]["backend"]["ending"] == "exited"
    assert run["server_stops"]["backend"]["returncode"] == -9
    # What the project's processes cost: the suite's 64 MiB ballast and its 0.3 s of CPU.
    resources = run["resources"]
    assert resources["peak_memory_bytes"] >= 64 * 1024 * 1024
    assert resources["cpu_seconds"] >= 0.25
    assert resources["watch_cpu_seconds"] < 0.2
    # The tool's own share, apart: the session's process and what it reaped besides the suite
    # and the server (a guardian's shell): more than nothing, far from the suite's busy loop.
    assert 0 < resources["tool_cpu_seconds"] < 1.0


def test_a_suite_is_stopped_as_soon_as_the_server_it_needs_dies(
    workspace: Path, config: e2e_infra.Config
) -> None:
    seconds, done = nox(workspace, "stuck")
    assert seconds < 20, done.stderr  # not the 30 s the suite would have slept
    run = record(config, "stuck")
    assert run["result"] == "error"
    assert run["returncode"] == -15  # stopped by SIGTERM
    assert "the suite was stopped" in run["error"] and 'on_exit = "continue"' in run["error"]
    assert run["server_exits"][0]["server"] == "backend"


def test_on_exit_continue_lets_the_suite_finish_and_still_fails_the_run(
    workspace: Path, config: e2e_infra.Config
) -> None:
    _seconds, done = nox(workspace, "tolerant")
    run = record(config, "tolerant")
    assert run["returncode"] == 0, done.stderr  # the suite ran to its end
    assert run["result"] == "error"
    assert "server tolerated was killed by SIGKILL during the suite" in run["error"]
    assert "the suite was stopped" not in run["error"]


def test_summary_and_report_name_the_dead_server_and_show_resources(
    workspace: Path, config: e2e_infra.Config
) -> None:
    nox(workspace, "killer")
    path = project_folder(config.results_dir, "killer") / "run.json"
    summary = RunSummary.load(path)
    assert summary is not None
    out = io.StringIO()
    print_summary(config, [summary], file=out)
    text = out.getvalue()
    assert "peak mem" in text and "cpu" in text and "MiB" in text
    assert "server backend killed by SIGKILL during the suite" in text
    report = e2e_infra.write_html_report(config, [summary])
    page = report.read_text()
    assert "<th>peak mem</th><th>cpu</th>" in page
    assert '<div class="note">server backend killed by SIGKILL during the suite</div>' in page


def test_on_exit_accepts_only_stop_or_continue(tmp_path: Path) -> None:
    bad = server("sometimes")
    bad["cwd"] = str(tmp_path)
    path = write_pyproject(tmp_path, servers={"backend": bad})
    with pytest.raises(e2e_infra.ConfigError, match=r"on_exit.*stop.*continue"):
        e2e_infra.load_config(path, environ=clean_environ())
