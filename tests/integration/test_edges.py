"""Errors at the edge, and nothing outliving its owner on disk (issue 12, items 5-7).

Real file systems (a tiny tmpfs mounted for the test, remounted read-only or filled up), real
processes, real PostgreSQL; ports 16100-16199. Every failure must be one line naming the path and
the fix, exit != 0, no traceback, through invoke, the console script and nox; and what a run held
is released or stays provably reclaimable.

Needs root (to mount a tmpfs): as root ``chmod`` does not stop writes, so a read-only folder is
made with ``mount -o remount,ro`` and a full one with a tmpfs of ``size=256k``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.cli import CLI, Cli, clean_environ, config_environ
from support.clusters import PgCluster, running_cluster
from support.configs import write_pyproject
from support.databases import drop_databases
from support.runs import project_folder

import e2e_infra
from e2e_infra.postgres.folders import OWNER_FILE, read_owner, scan_cluster_folders
from e2e_infra.resources.leases import parse_registry

pytestmark = pytest.mark.integration

PASS = "{python} -c pass"


def quiet_env(config: Path, **env: str) -> dict[str, str]:
    """The tool pointed at ``config``, without the end-of-run summary (``E2E_SUMMARY=0``)."""
    return config_environ(config, E2E_SUMMARY="0", **env)


def nox(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.nox(*args, env=quiet_env(config, **env), timeout=120)


def invoke(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(*args, env=quiet_env(config, **env), timeout=120)


def console(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.console(*args, env=quiet_env(config, **env), timeout=120)


def one_error_line(
    result: subprocess.CompletedProcess[str], *needles: str, exactly: bool = True
) -> str:
    """The run failed with one error line holding every needle (``exactly``: only one such
    line), and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert lines and (len(lines) == 1 or not exactly), text
    return lines[0]


def servers_on(low: int, high: int) -> list[int]:
    """Live http.server processes listening on a port of ``low``-``high`` (by command line)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info["cmdline"] or []
        if "http.server" in words and any(str(p) in words for p in range(low, high + 1)):
            found.append(proc.pid)
    return found


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def project(command: str = PASS, **extra: object) -> dict[str, object]:
    return {"command": command, "servers": [], "database": False, **extra}


# --- read-only, missing, non-folder state and results folders -------------------------------------


def test_a_read_only_state_folder_is_one_line_through_nox_invoke_and_the_console_script(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "state") as state:
        config = write_pyproject(
            tmp_path, state_dir=state, port_range="16100-16109", projects={"x": project()}
        )
        read_only(state)
        line = one_error_line(nox(config, "-s", "e2e-x"), str(state), "read-only")
        assert "E2E_STATE_DIR" in line
        for result in (
            invoke(config, "ports.allocate", "--project", "x", E2E_OWNER_PID=str(os.getpid())),
            console(config, "ports.list"),
            invoke(config, "e2e.cleanup"),
        ):
            line = one_error_line(result, "error:", str(state))
            assert "read-only file system" in line and "E2E_STATE_DIR" in line


def test_a_state_or_results_path_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    config = write_pyproject(
        tmp_path, state_dir=blocker / "state", port_range="16110-16119", projects={"x": project()}
    )
    one_error_line(invoke(config, "ports.list"), "error:", str(blocker / "state"))
    one_error_line(nox(config, "-s", "e2e-x"), str(blocker / "state"))

    config = write_pyproject(
        tmp_path, results_dir=blocker, port_range="16110-16119", projects={"x": project()}
    )
    line = one_error_line(nox(config, "-s", "e2e-x"), str(blocker))
    assert "not a folder" in line and "E2E_RESULTS_DIR" in line
    # Found before anything was acquired: no lease was ever written.
    assert e2e_infra.make_registry(e2e_infra.load_config(config, environ={})).snapshot() == ()


# --- a disk that fills up during the suite -------------------------------------------------------


# Writes until the disk is full, then exits 0 (a raw fd: no buffered flush to fail at exit).
FILL = """\
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(4096))
except OSError:
    pass
"""


def test_a_state_folder_that_fills_up_mid_suite_loses_nothing(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    base = f"f{uuid.uuid4().hex[:8]}"
    (tmp_path / "fill.py").write_text(FILL)
    with tmpfs(tmp_path / "state") as state:
        filler = state / "filler"
        config = write_pyproject(
            tmp_path,
            state_dir=state,
            port_range="16120-16129",
            name_base=base,
            servers={
                "web": {
                    "command": "{python} -m http.server {port} --bind 127.0.0.1",
                    "port": "backend",
                    "health": "http://127.0.0.1:{port}/",
                }
            },
            projects={"full": {"command": f"{{python}} fill.py {filler}", "servers": ["web"]}},
        )
        env = {"E2E_ADMIN_DATABASE_URL": pg_cluster.tcp.url}
        try:
            result = nox(config, "-s", "e2e-full", **env)
            line = one_error_line(result, "no space is left on its device", exactly=False)
            assert str(state) in line and "e2e.cleanup" in line
            # The registry was never half written: the last whole version is there.
            leases, malformed = parse_registry((state / "leases.json").read_bytes())
            assert not malformed and any(lease.kind == "port" for lease in leases)
            record = json.loads(
                (project_folder(tmp_path / "results", "full") / "run.json").read_text()
            )
            assert record["result"] == "error" and "no space" in record["error"]

            filler.unlink()  # space again: what was left is reclaimable on proof of death
            cleanup = invoke(config, "e2e.cleanup", "--json", **env)
            assert cleanup.returncode == 0, cleanup.stderr
            loaded = e2e_infra.load_config(config, environ=clean_environ(env))
            assert [x for x in e2e_infra.make_registry(loaded).snapshot()] == []
            assert servers_on(16120, 16129) == []
        finally:
            drop_databases(pg_cluster.admin, base + "_")


# --- checked before anything is acquired ----------------------------------------------------------


def test_a_missing_cwd_is_named_before_anything_is_acquired(tmp_path: Path) -> None:
    config = write_pyproject(
        tmp_path, port_range="16130-16139", projects={"x": project(cwd="demo/nope")}
    )
    line = one_error_line(nox(config, "-s", "e2e-x"), "cwd demo/nope does not exist")
    assert "projects.x.cwd" in line and str(config) in line
    assert not (tmp_path / "state" / "leases.json").exists()  # no port was ever leased


def test_an_evaluating_placeholder_is_a_config_error_through_nox_and_invoke(tmp_path: Path) -> None:
    config = write_pyproject(
        tmp_path, port_range="16140-16149", projects={"x": project("{python.__class__} -c pass")}
    )
    result = nox(config, "-s", "e2e-x")
    assert result.returncode == 2
    one_error_line(result, "unknown placeholder {python.__class__}", "projects.x.command")
    one_error_line(invoke(config, "ports.list"), "error:", "{python.__class__}")


def test_e2e_config_without_the_section_is_one_line_not_sessions_not_found(tmp_path: Path) -> None:
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "x"\n')
    result = nox(other, "-s", "e2e-x")
    one_error_line(result, f"{other} has no [tool.e2e_infra] section")
    assert "Sessions not found" not in result.stdout + result.stderr


def test_an_undecodable_config_file_is_one_line_through_invoke(tmp_path: Path) -> None:
    config = write_pyproject(tmp_path, port_range="16150-16159")
    config.write_bytes(config.read_bytes() + b"\n# caf\xe9\n")
    one_error_line(invoke(config, "ports.list"), "error:", str(config), "not UTF-8")


# --- an interrupt under nox -j: the record is written before the slow teardown ------------------


STUBBORN = (
    '{python} -c "import signal, sys, time, http.server as h; '
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "h.HTTPServer(('127.0.0.1', int(sys.argv[1])), h.SimpleHTTPRequestHandler).serve_forever()\" "
    "{port}"
)


def test_an_interrupt_under_nox_j_records_interrupted_before_the_teardown(
    tmp_path: Path, cli: Cli
) -> None:
    config = write_pyproject(
        tmp_path,
        port_range="16160-16169",
        servers={
            "slow": {
                "command": STUBBORN,
                "port": "backend",
                "health": "http://127.0.0.1:{port}/",
                "stop_timeout": 8,  # nox SIGKILLs the worker after 2 s: teardown cannot finish
            }
        },
        projects={"x": project("{python} -c 'import time; time.sleep(60)'", servers=["slow"])},
    )
    proc = cli.popen(
        cli.nox_argv("-j", "2", "-s", "e2e-x"),
        env=quiet_env(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        status = tmp_path / "results" / "latest" / "x" / "status.json"
        while time.monotonic() < deadline and '"suite"' not in (
            status.read_text() if status.is_file() else ""
        ):
            time.sleep(0.1)
        assert '"suite"' in status.read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    record = json.loads((project_folder(tmp_path / "results", "x") / "run.json").read_text())
    assert record["result"] == "interrupted"
    # The SIGKILLed worker's leftovers go to its guardian: the stubborn server is ended.
    loaded = e2e_infra.load_config(config, environ={})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and e2e_infra.make_registry(loaded).snapshot():
        time.sleep(0.2)
    assert e2e_infra.make_registry(loaded).snapshot() == ()
    stubborn = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if "SIG_IGN" in " ".join(proc.info["cmdline"] or [])
        and any(str(port) in (proc.info["cmdline"] or []) for port in range(16160, 16170))
    ]
    assert stubborn == []


# --- cluster folders: purge, owner record, orphans ------------------------------------------------


def test_pg_stop_purge_removes_the_cluster_folder(tmp_path: Path) -> None:
    config_path = write_pyproject(tmp_path, port_range="16170-16179", tmpfs=True)
    config = e2e_infra.load_config(config_path, environ={})
    with running_cluster(config) as cluster:
        owner = read_owner(cluster.cluster_dir)
        assert owner is not None and owner["root"] == str(tmp_path)
        assert owner["state_dir"] == str(config.state_dir)
        result = invoke(config_path, "pg.stop", "--purge")
        assert result.returncode == 0, result.stderr
        assert str(cluster.cluster_dir) in result.stdout
        assert not cluster.cluster_dir.exists() and not cluster.socket_dir.exists()
        assert not cluster.password_file.exists()
        again = invoke(config_path, "pg.stop", "--purge")  # idempotent
        assert again.returncode == 0 and "nothing" in again.stdout


def _doctor_clusters(config: Path) -> dict[str, str]:
    result = invoke(config, "e2e.doctor", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    return checks["cluster folders"]


def test_cluster_folders_of_gone_checkouts_are_reported_and_removed_when_stopped(
    tmp_path: Path,
) -> None:
    gone = tmp_path / "checkout"
    config = e2e_infra.load_config(
        write_pyproject(gone, port_range="16180-16189", tmpfs=True), environ={}
    )
    here = write_pyproject(tmp_path / "here", port_range="16190-16199")
    unknown = Path("/dev/shm") / f"e2e-infra-pg-test{uuid.uuid4().hex[:6]}"
    (unknown / "data").mkdir(parents=True)
    try:
        with running_cluster(config) as cluster:
            folder = cluster.cluster_dir
            assert (folder / OWNER_FILE).is_file()
            subprocess.run(["rm", "-rf", str(gone)], check=True)  # the checkout is deleted
            check = _doctor_clusters(here)
            assert check["status"] == "warn" and "left by a gone checkout" in check["detail"]
            assert "MB" in check["detail"] and "unknown owner" in check["detail"]
            judged = {f.path: f.state for f in scan_cluster_folders()}
            assert judged[unknown] == "unknown" and judged[folder] == "orphaned"
            assert "pg.start" not in check["fix"]

            cleanup = invoke(here, "e2e.cleanup", "--json")
            assert cleanup.returncode == 0, cleanup.stderr
            assert folder.is_dir()  # its server runs: never removed under it
            cluster.stop()
            cleanup = invoke(here, "e2e.cleanup", "--json")
            assert cleanup.returncode == 0, cleanup.stderr
            removed = [c["path"] for c in json.loads(cleanup.stdout)["clusters"]]
            assert str(folder) in removed and not folder.exists()
            assert str(unknown) not in removed and unknown.is_dir()  # never on a guess
    finally:
        subprocess.run(["rm", "-rf", str(unknown)], check=False)


def test_doctor_never_tells_an_unreachable_external_server_to_pg_start(tmp_path: Path) -> None:
    config = write_pyproject(
        tmp_path, port_range="16190-16199", admin_url="postgresql://u:pw@127.0.0.1:1/postgres"
    )
    result = invoke(config, "e2e.doctor", "--json")
    assert result.returncode == 1
    check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "postgres")
    assert check["status"] == "fail" and "pg.start" not in check["detail"] + check["fix"]
    assert "E2E_ADMIN_DATABASE_URL" in check["fix"]
    start = invoke(config, "pg.start")
    assert "pg.start" not in start.stderr and start.returncode != 0
