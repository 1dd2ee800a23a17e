"""The main job end to end: nox runs the demo's projects, each isolated, and nothing is left.

Every test here drives the real thing from the outside: ``nox`` (or ``invoke``) as a subprocess
with ``E2E_CONFIG`` pointing at a copy of the repository's configuration whose state and results
live in a temporary folder, the embedded PostgreSQL cluster, the demo's real servers and suites.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from support import REPO_ROOT
from support.cli import CLI, Cli, config_environ
from support.clusters import running_cluster
from support.runs import project_folder, run_folder, run_processes

import e2e_infra
from e2e_infra.testing import copy_config

pytestmark = pytest.mark.integration

PORT_RANGE = "17000-17999"


def write_config(
    folder: Path,
    *,
    extra_servers: dict[str, Any] | None = None,
    extra_projects: dict[str, Any] | None = None,
) -> Path:
    """A copy of the repository's [tool.e2e_infra] with state and results under ``folder``."""
    return copy_config(
        REPO_ROOT / "pyproject.toml",
        folder,
        port_range=PORT_RANGE,
        extra_servers=extra_servers,
        extra_projects=extra_projects,
    )


def nox(config_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return CLI.nox(*args, env=config_environ(config_path), timeout=timeout)


class Leftovers:
    """What a finished run might have left behind: leases, processes, databases."""

    def __init__(self, config: e2e_infra.Config) -> None:
        self.config = config

    def leases(self) -> list[e2e_infra.Lease]:
        registry = e2e_infra.make_registry(self.config)
        return [lease for lease in registry.snapshot() if lease.project != "postgres"]

    def processes(self) -> list[psutil.Process]:
        return run_processes(self.config.results_dir)

    def databases(self) -> list[str]:
        registry = e2e_infra.make_registry(self.config)
        ports = e2e_infra.PortAllocator.from_config(self.config, registry)
        cluster = e2e_infra.LocalCluster(self.config, registry, ports)
        if not cluster.status().running:
            return []
        with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname LIKE %s",
                (self.config.database.name_base + "\\_%",),
            ).fetchall()
        return [row[0] for row in rows if "_tpl_" not in row[0]]

    def assert_none(self) -> None:
        assert self.leases() == []
        assert self.processes() == []
        assert self.databases() == []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("e2e")
    config_path = write_config(
        folder,
        extra_servers={
            "never_healthy": {
                "command": '{python} -c \'import time; print("starting up", flush=True); '
                "time.sleep(60)'",
                "port": "backend",
                "health": "http://127.0.0.1:{port}/health",
                "startup_timeout": 2,
                "stop_timeout": 2,
            }
        },
        extra_projects={
            "failing": {"command": "{python} -c 'import sys; sys.exit(3)'", "servers": ["backend"]},
            "slow": {
                "command": "{python} -c 'import time; time.sleep(120)'",
                "servers": ["backend", "frontend"],
            },
            "ancestry": {  # writes which process started its suite
                "command": "{python} -c \"import os, psutil; open(r'{results_dir}/parent.txt', 'w')"
                ".write(' '.join(psutil.Process(os.getppid()).cmdline()))\"",
                "database": False,
                "servers": [],
            },
            "unhealthy": {
                "command": "{python} -c 'pass'",
                "database": False,
                "servers": ["never_healthy"],
            },
        },
    )
    config = e2e_infra.load_config(config_path, environ={})
    # Started here once for the module; stopped and its folders removed at the end.
    with running_cluster(config):
        yield config_path


@pytest.fixture
def config(workspace: Path) -> e2e_infra.Config:
    return e2e_infra.load_config(workspace, environ={})


def run_json(config: e2e_infra.Config, project: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (project_folder(config.results_dir, project) / "run.json").read_text()
    )
    return data


def test_one_project_passes_through_nox_and_leaves_nothing(
    workspace: Path, config: e2e_infra.Config
) -> None:
    proc = nox(workspace, "-s", "e2e-auth_tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = run_json(config, "auth_tests")
    assert record["result"] == "passed"
    assert record["seed"] == "auth_only"
    assert set(record["phases"]) >= {"ports", "database", "servers", "health", "suite", "teardown"}
    assert (project_folder(config.results_dir, "auth_tests") / "junit.xml").is_file()
    # The backend inherited its listening socket on the leased port (listen_socket = true).
    log = (project_folder(config.results_dir, "auth_tests") / "backend.log").read_text()
    assert "--fd " in log and f"127.0.0.1:{record['ports']['backend']}" in log
    Leftovers(config).assert_none()


def test_posargs_reach_the_suite(workspace: Path, config: e2e_infra.Config) -> None:
    proc = nox(workspace, "-s", "e2e-auth_tests", "--", "-k", "no_test_matches_this_name")
    # pytest exits 5 when -k deselects everything: the posargs reached it.
    assert proc.returncode != 0
    assert run_json(config, "auth_tests")["returncode"] == 5
    Leftovers(config).assert_none()


def test_every_demo_project_passes_in_parallel(workspace: Path, config: e2e_infra.Config) -> None:
    demo = ["auth_tests", "work_orders", "inventory", "quality", "dashboard", "static_pages"]
    proc = nox(workspace, "-j", "auto", "-s", *[f"e2e-{p}" for p in demo])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    databases = set()
    for project in demo:
        record = run_json(config, project)
        assert record["result"] == "passed", record
        if project != "static_pages":
            databases.add(record["database"])
    assert len(databases) == 5  # each project had its own database
    merged = run_folder(config.results_dir) / "junit.xml"
    assert merged.is_file() and merged.read_text().count("<testsuite ") == len(demo)
    assert "e2e run summary" in proc.stderr
    Leftovers(config).assert_none()


def test_same_project_twice_at_once_gets_two_databases_and_port_sets(
    workspace: Path, config: e2e_infra.Config, cli: Cli
) -> None:
    argv = cli.nox_argv("-s", "e2e-work_orders")
    procs = [cli.start(argv, env=config_environ(workspace)) for _ in range(2)]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    records = [
        json.loads(path.read_text())
        for path in [
            *{p.resolve() for p in config.results_dir.glob("*/work_orders/run.json")},
            *{p.resolve() for p in config.results_dir.glob("*/work_orders/runs/*/run.json")},
        ]
    ]
    latest = sorted(records, key=lambda r: r["started_at"])[-2:]
    assert latest[0]["database"] != latest[1]["database"]
    assert set(latest[0]["ports"].values()).isdisjoint(latest[1]["ports"].values())
    Leftovers(config).assert_none()


def test_a_failing_suite_fails_the_run_and_still_releases(
    workspace: Path, config: e2e_infra.Config
) -> None:
    proc = nox(workspace, "-s", "e2e-failing")
    assert proc.returncode != 0
    record = run_json(config, "failing")
    assert record["result"] == "failed" and record["returncode"] == 3
    Leftovers(config).assert_none()


def test_a_server_that_never_gets_healthy_fails_with_its_log_tail(
    workspace: Path, config: e2e_infra.Config
) -> None:
    started = time.monotonic()
    proc = nox(workspace, "-s", "e2e-unhealthy")
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    record = run_json(config, "unhealthy")
    assert record["result"] == "error"
    assert "never_healthy" in record["error"]
    assert "starting up" in record["log_tail"]
    Leftovers(config).assert_none()


def test_sigint_to_a_parallel_nox_run_releases_everything_within_10s(
    workspace: Path, config: e2e_infra.Config, cli: Cli
) -> None:
    argv = cli.nox_argv("-j", "auto", "-s", "e2e-slow", "e2e-static_pages", "e2e-failing")
    proc = cli.start(argv, env=config_environ(workspace))
    leftovers = Leftovers(config)
    try:
        suite = _await_the_slow_suite(leftovers)
        assert any(
            lease.kind == "server" and lease.project == "slow" for lease in leftovers.leases()
        )
        # The session runs in nox's own worker: suite -> session (a nox worker) -> main nox.
        session = suite.parent()
        assert session is not None and session.ppid() == proc.pid
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        proc.communicate(timeout=30)

        def released() -> bool:
            return (
                not leftovers.leases() and not leftovers.processes() and not (leftovers.databases())
            )

        e2e_infra.wait_until(released, timeout=10, what="everything to be released")
        assert time.monotonic() - interrupted < 10
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parallel_sessions_run_each_in_noxs_own_worker(
    workspace: Path, config: e2e_infra.Config
) -> None:
    sessions = ["-s", "e2e-ancestry", "e2e-static_pages"]
    proc = nox(workspace, "-j", "2", *sessions, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parent = (project_folder(config.results_dir, "ancestry") / "parent.txt").read_text()
    assert "nox" in parent  # the session ran in a nox process, the suite its child
    assert run_json(config, "static_pages")["result"] == "passed"
    # One summary, printed by the main nox process only (not once more per worker).
    assert proc.stderr.count("e2e run summary") == 1, proc.stderr
    Leftovers(config).assert_none()


SLOW_SUITE = "time.sleep(120)"  # the slow project's suite, by its command line


def _await_the_slow_suite(leftovers: Leftovers) -> psutil.Process:
    """The slow project's suite process, once it runs (2 minutes at most)."""

    def suite() -> psutil.Process | None:
        return next((p for p in leftovers.processes() if SLOW_SUITE in " ".join(p.cmdline())), None)

    e2e_infra.wait_until(
        lambda: suite() is not None, timeout=120, what="the slow project's suite to start"
    )
    found = suite()
    assert found is not None
    return found


def invoke_all(workspace: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return CLI.start(CLI.invoke_argv("e2e.all", *args), env=config_environ(workspace, **env))


def test_invoke_e2e_all_runs_projects_on_a_pool_of_warm_workers_without_nox(
    workspace: Path, config: e2e_infra.Config
) -> None:
    proc = invoke_all(workspace, "--projects", "ancestry,static_pages", "--jobs", "1")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    parent = (project_folder(config.results_dir, "ancestry") / "parent.txt").read_text()
    # A worker forked from multiprocessing's fork server (the session's modules preloaded there):
    # no interpreter, no nox per project.
    assert "multiprocessing.forkserver" in parent and "nox" not in parent
    assert "== e2e-static_pages: passed ==" in out
    # One worker (--jobs 1) took both projects, one after the other.
    records = [run_json(config, p) for p in ("ancestry", "static_pages")]
    assert run_json(config, "static_pages")["result"] == "passed"
    status = [
        json.loads((project_folder(config.results_dir, p) / "status.json").read_text())
        for p in ("ancestry", "static_pages")
    ]
    assert status[0]["pid"] == status[1]["pid"] != proc.pid, (records, status)
    Leftovers(config).assert_none()


@pytest.mark.parametrize("jobs", ["3", "1"])
def test_sigint_to_invoke_e2e_all_releases_everything_within_10s(
    workspace: Path, config: e2e_infra.Config, jobs: str
) -> None:
    proc = invoke_all(workspace, "--projects", "slow,static_pages,failing", "--jobs", jobs)
    leftovers = Leftovers(config)
    try:
        _await_the_slow_suite(leftovers)
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, _ = proc.communicate(timeout=60)

        def released() -> bool:
            return (
                not leftovers.leases() and not leftovers.processes() and not leftovers.databases()
            )

        e2e_infra.wait_until(released, timeout=10, what="everything to be released")
        assert time.monotonic() - interrupted < 10, out
        assert proc.returncode != 0
        assert "Traceback" not in out
        if jobs == "1":  # the queued projects never started
            run = run_folder(config.results_dir)
            assert not (run / "static_pages").exists() and not (run / "failing").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_invoke_e2e_all_runs_with_an_environment_larger_than_a_socket_message(
    workspace: Path, config: e2e_infra.Config
) -> None:
    # 3 x 100 KB: more than a unix socket message holds (212,992 bytes here), the size at which
    # the fork server this pool replaced failed every project ("no fork server").
    big = {f"E2E_TEST_BIG_{n}": "x" * 100_000 for n in range(3)}
    proc = invoke_all(workspace, "--projects", "static_pages,ancestry", "--jobs", "2", **big)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert run_json(config, "static_pages")["result"] == "passed"
    Leftovers(config).assert_none()


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2, 0.4])
def test_a_ctrl_c_while_the_pool_starts_is_never_lost(
    workspace: Path, config: e2e_infra.Config, delay: float
) -> None:
    """The interrupt lands right as the first project starts (after ``delay`` more seconds):
    the run stops with a non-zero exit, no project runs to its end after it, nothing runs on."""
    run_id = f"ctrl-c-{int(delay * 1000)}"
    proc = invoke_all(
        workspace, "--projects", "slow,static_pages,failing", "--jobs", "2", E2E_RUN_ID=run_id
    )
    run = config.results_dir / run_id
    leftovers = Leftovers(config)
    try:
        e2e_infra.wait_until(
            lambda: any(run.glob("*/status.json")) or proc.poll() is not None,
            timeout=60,
            what="the first project to start",
            first=0.002,
            cap=0.002,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        interrupted = time.time()
        try:
            out, _ = proc.communicate(timeout=8)
        except subprocess.TimeoutExpired:
            import os

            for q in psutil.process_iter(["cmdline"]):
                if "multiprocessing.forkserver" in " ".join(q.info["cmdline"] or []):
                    os.kill(q.pid, signal.SIGUSR1)
            time.sleep(1)
            import shutil

            shutil.copytree(run, "/tmp/cc/slowrun", dirs_exist_ok=True)
            out, _ = proc.communicate(timeout=90)
        assert proc.returncode != 0, out
        assert "Traceback" not in out
        started = {
            p.parent.name: json.loads(p.read_text())["started_at"]
            for p in run.glob("*/status.json")
        }
        # A worker may pick a project up in the moment between the signal and the pool's stop
        # (the owner's main thread handles it between two bytecodes, later under load): such a
        # project is interrupted at once, never run to its end.
        for name, at in started.items():
            record = run / name / "run.json"
            if at > interrupted + 0.05 and record.is_file():
                result = json.loads(record.read_text())["result"]
                assert result == "interrupted", f"{name} started after the interrupt: {result}"
        passed = [
            name
            for name in ("slow", "static_pages", "failing")
            if (run / name / "run.json").is_file()
            and json.loads((run / name / "run.json").read_text())["result"] == "passed"
            and json.loads((run / name / "run.json").read_text())["started_at"] > interrupted
        ]
        assert passed == []
        try:
            e2e_infra.wait_until(
                lambda: not leftovers.processes() and not leftovers.leases(),
                timeout=10,
                what="everything to be released",
            )
        except e2e_infra.DeadlineExceeded:
            left = [(x.kind, x.resource, x.data) for x in leftovers.leases()]
            procs = [" ".join(x.cmdline()) for x in leftovers.processes()]
            pytest.fail(f"left behind: leases {left}, processes {procs}\n{out}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _kill_the_slow_suites_worker(
    proc: subprocess.Popen[str], leftovers: Leftovers
) -> tuple[psutil.Process, str]:
    """SIGKILL the process that runs the slow project's session (its suite's parent: a pool
    worker or a nox worker) once the suite runs; the worker and the run's output."""
    try:
        suite = _await_the_slow_suite(leftovers)
        worker = suite.parent()
        assert worker is not None
        worker.kill()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return worker, out


def test_a_killed_pool_worker_is_named_as_an_error_and_the_rest_still_run(
    workspace: Path, config: e2e_infra.Config
) -> None:
    proc = invoke_all(
        workspace, "--projects", "slow,static_pages,ancestry", "--jobs", "2", E2E_RUN_ID="kill-1"
    )
    leftovers = Leftovers(config)
    worker, out = _kill_the_slow_suites_worker(proc, leftovers)
    assert proc.returncode == 1, out
    assert "1 of 3 projects did not pass: slow" in out, out
    slow = json.loads((config.results_dir / "kill-1" / "slow" / "run.json").read_text())
    assert slow["result"] == "error"
    assert f"pid {worker.pid}" in slow["error"] and "suite" in slow["error"]
    for name in ("static_pages", "ancestry"):
        record = json.loads((config.results_dir / "kill-1" / name / "run.json").read_text())
        assert record["result"] == "passed", record
    report = (config.results_dir / "kill-1" / "report.html").read_text()
    assert 'data-project="slow"' in report
    # Its guardian reclaimed what the dead worker held.
    e2e_infra.wait_until(
        lambda: not leftovers.processes() and not leftovers.leases(),
        timeout=30,
        what="the guardian to reclaim the killed worker's servers and ports",
    )


def test_a_killed_nox_worker_is_named_in_the_summary(
    workspace: Path, config: e2e_infra.Config, cli: Cli
) -> None:
    argv = cli.nox_argv("-j", "2", "-s", "e2e-slow", "e2e-static_pages")
    proc = cli.start(argv, env=config_environ(workspace, E2E_RUN_ID="kill-nox"))
    leftovers = Leftovers(config)
    worker, out = _kill_the_slow_suites_worker(proc, leftovers)
    assert proc.returncode != 0
    slow = json.loads((config.results_dir / "kill-nox" / "slow" / "run.json").read_text())
    assert slow["result"] == "error" and f"pid {worker.pid}" in slow["error"], slow
    summary = out[out.index("e2e run summary") :]
    assert "slow" in summary and "error" in summary, out
    e2e_infra.wait_until(
        lambda: not leftovers.processes() and not leftovers.leases(),
        timeout=30,
        what="the guardian to reclaim the killed worker's servers and ports",
    )
