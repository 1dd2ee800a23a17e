"""The server supervisor and probes against real processes on real ports (range 16000-16999)."""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import FIXTURES_DIR

from e2e_infra.clock import wait_until
from e2e_infra.errors import ConfigError, PortError, ServerExitedError, ServerStartTimeoutError
from e2e_infra.resources.leases import process_start_time
from e2e_infra.run.health import CommandCheck, HealthCheck, HttpCheck, TcpCheck
from e2e_infra.run.servers import (
    ProcessRecord,
    ServerProcess,
    bind_listen_socket,
    kill_group_if_ours,
    render_command,
)

pytestmark = pytest.mark.integration

FIXTURE = FIXTURES_DIR / "servers" / "http_server.py"
PORT_RANGE = range(16000, 17000)
SECRET_PASSWORD = "s3cr3t-pw-91"
SECRET_TOKEN = "tok-5c8e-secret"


def free_port() -> int:
    """A port of this module's range that nothing listens on right now."""
    for port in random.sample(PORT_RANGE, len(PORT_RANGE)):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 16000-16999")


def gone(pid: int) -> bool:
    return process_start_time(pid) is None  # zombies count as gone


def live_group_members(pgid: int) -> list[int]:
    """Pids in group ``pgid`` that still run (an orphan's zombie may linger if init never reaps)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return wait_until(lambda: predicate() or None, timeout=timeout, what=what)


def child_pid(log: Path) -> int:
    def find() -> int | None:
        match = re.search(r"child pid (\d+)", log.read_text()) if log.exists() else None
        return int(match[1]) if match else None

    return int(wait_for(find, "the forked child's pid in the log"))


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Build ServerProcess objects for the fixture server; every one is stopped at the end."""
    made: list[ServerProcess] = []

    def factory(
        *args: str,
        port: int | None = None,
        health: HealthCheck | None = None,
        name: str = "web",
        **kwargs: Any,
    ) -> ServerProcess:
        port = port if port is not None else free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PORT": str(port),
            "DATABASE_URL": f"postgresql://app:{SECRET_PASSWORD}@127.0.0.1:5432/e2e_db_x",
            "API_TOKEN": SECRET_TOKEN,
        }
        kwargs.setdefault("startup_timeout", 20.0)
        kwargs.setdefault("stop_timeout", 5.0)
        server = ServerProcess(
            name,
            [sys.executable, str(FIXTURE), *args],
            cwd=tmp_path,
            env=env,
            log_path=tmp_path / "test-results" / "proj" / f"{name}.log",
            health=health or HttpCheck(f"http://127.0.0.1:{port}/health"),
            secrets=[SECRET_TOKEN],
            port=port,
            **kwargs,
        )
        made.append(server)
        return server

    yield factory
    for server in made:
        server.stop_timeout = min(server.stop_timeout, 1.0)
        server.stop()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start the fixture server in its own session, outside the supervisor; reap it at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def factory(*args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, str(FIXTURE), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        # Also after the leader died: a child left in the group keeps the group id alive.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def record_of(proc: subprocess.Popen[bytes]) -> ProcessRecord:
    start = psutil.Process(proc.pid).create_time()
    return ProcessRecord(pid=proc.pid, pgid=proc.pid, start_time=start)


# --- start, health, stop --------------------------------------------------------------------------


def test_http_server_becomes_healthy_in_its_own_group_and_stops_on_sigterm(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("--delay", "0.3")
    record = server.start()
    assert record.pgid == record.pid == os.getpgid(record.pid)
    assert os.getsid(record.pid) == record.pid
    assert abs(record.start_time - time.time()) < 5
    took = server.wait_healthy()
    assert 0.3 <= took < 10
    assert server.running
    assert server.stop() == -signal.SIGTERM
    assert not server.running
    assert gone(record.pid)
    assert server.stop() == -signal.SIGTERM  # idempotent
    assert "listening on" in server.log_path.read_text()


def test_stop_ends_a_forked_child_left_in_the_group(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("--fork-child")
    server.start()
    server.wait_healthy()
    child = child_pid(server.log_path)
    assert not gone(child)
    assert server.stop() == -signal.SIGTERM
    assert gone(child)


def test_server_ignoring_sigterm_is_killed_with_its_grandchild_after_the_grace_period(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("--ignore-sigterm", "--fork-child", stop_timeout=0.5)
    record = server.start()
    server.wait_healthy()
    child = child_pid(server.log_path)
    began = time.monotonic()
    assert server.stop() == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - began < 5
    assert gone(record.pid)
    assert gone(child)
    assert live_group_members(record.pgid) == []
    assert server.stop() == -signal.SIGKILL


def test_terminate_then_stop_shares_one_grace_period(
    make_server: Callable[..., ServerProcess],
) -> None:
    servers = [make_server("--ignore-sigterm", stop_timeout=0.6, name=n) for n in ("a", "b")]
    for server in servers:
        server.start()
    for server in servers:
        server.wait_healthy()
    began = time.monotonic()
    for server in servers:
        server.terminate()
    assert [server.stop() for server in servers] == [-signal.SIGKILL, -signal.SIGKILL]
    assert time.monotonic() - began < 0.6 * 2  # not one grace period per server


def test_server_exiting_at_startup_fails_fast_with_the_last_20_log_lines(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("--exit-code", "3", "--lines", "30", startup_timeout=30)
    server.start()
    began = time.monotonic()
    with pytest.raises(ServerExitedError) as info:
        server.wait_healthy()
    assert time.monotonic() - began < 5
    error = info.value
    assert error.returncode == 3
    assert error.server == "web"
    lines = error.log_tail.splitlines()
    assert len(lines) == 20
    assert lines[0] == "startup line 12"
    assert lines[-1] == "exiting with 3"
    first_line = str(error).splitlines()[0]
    assert "server web exited with status 3 before it became healthy" in first_line
    assert "fix the error in its log" in first_line
    assert str(server.log_path) in first_line
    assert error.log_tail in str(error)
    assert not server.port_conflict()
    assert server.stop() == 3


def test_server_that_never_listens_times_out_naming_probe_timeout_and_log(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    server = make_server("--never-listen", port=port, startup_timeout=0.5)
    server.start()
    began = time.monotonic()
    with pytest.raises(ServerStartTimeoutError) as info:
        server.wait_healthy()
    assert 0.5 <= time.monotonic() - began < 4
    error = info.value
    assert error.timeout == 0.5
    first_line = str(error).splitlines()[0]
    assert "server web did not become healthy within 0.5s" in first_line
    assert f"HTTP GET http://127.0.0.1:{port}/health" in first_line
    assert "last probe:" in first_line
    assert "startup_timeout" in first_line
    assert str(server.log_path) in first_line
    assert "startup line 1" in error.log_tail
    assert server.running  # the caller decides; stop() still ends it
    assert server.stop() == -signal.SIGTERM


def test_port_held_by_a_foreign_listener_is_a_port_conflict(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", port))
        foreign.listen()
        server = make_server(port=port, startup_timeout=20)
        server.start()
        with pytest.raises(ServerExitedError) as info:
            server.wait_healthy()
        assert server.port_conflict()
        assert "address already in use" in str(info.value).splitlines()[0]
        assert info.value.returncode == 1


def test_a_foreign_http_server_on_the_port_is_not_mistaken_for_ours(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    foreign = http.server.HTTPServer(("127.0.0.1", port), _QuietOk)
    thread = threading.Thread(target=foreign.serve_forever, daemon=True)
    thread.start()
    try:
        assert HttpCheck(f"http://127.0.0.1:{port}/health").probe()  # it does answer
        server = make_server("--delay", "0.5", port=port, startup_timeout=20)
        server.start()
        with pytest.raises(ServerExitedError):
            server.wait_healthy()
        assert server.port_conflict()
    finally:
        foreign.shutdown()
        foreign.server_close()
        thread.join(timeout=5)


class _QuietOk(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None  # quiet: the test reads the server's own log, not the handler's


def test_a_handed_over_listening_socket_serves_without_a_bind_race(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    sock = bind_listen_socket(port)
    try:
        with pytest.raises(PortError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listen_socket(port).close()
        server = make_server("--fd", str(sock.fileno()), port=port, pass_fds=[sock.fileno()])
        server.start()
        server.wait_healthy()
        assert server.stop() == -signal.SIGTERM
    finally:
        sock.close()


def test_rendered_command_with_named_ports_starts_the_server(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    port = free_port()
    argv = render_command(
        "{python} {fixture} --port {ports.frontend}",
        {"python": sys.executable, "fixture": str(FIXTURE), "ports": {"frontend": port}},
    )
    server = ServerProcess(
        "frontend",
        argv,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
        log_path=tmp_path / "frontend.log",
        health=HttpCheck(f"http://127.0.0.1:{port}/"),
        startup_timeout=20,
        port=port,
    )
    try:
        server.start()
        server.wait_healthy()
    finally:
        assert server.stop() == -signal.SIGTERM


# --- secrets --------------------------------------------------------------------------------------


def test_secrets_printed_by_the_server_never_reach_tails_or_errors(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("--print-env", "--exit-code", "1", "--lines", "0")
    server.start()
    with pytest.raises(ServerExitedError) as info:
        server.wait_healthy()
    raw = server.log_path.read_text()
    assert SECRET_PASSWORD in raw and SECRET_TOKEN in raw  # the server did print them
    for text in (str(info.value), info.value.log_tail, server.tail()):
        assert SECRET_PASSWORD not in text
        assert SECRET_TOKEN not in text
    assert "DATABASE_URL=postgresql://app:***@127.0.0.1:5432/e2e_db_x" in info.value.log_tail
    assert "API_TOKEN=***" in info.value.log_tail


# --- probes ---------------------------------------------------------------------------------------


def test_tcp_and_http_probes_against_a_live_and_a_closed_port(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    server = make_server(port=port, health=TcpCheck("127.0.0.1", port))
    server.start()
    server.wait_healthy()
    assert HttpCheck(f"http://127.0.0.1:{port}/redirect").probe()  # a 302, not followed
    missing = HttpCheck(f"http://127.0.0.1:{port}/missing")
    assert not missing.probe()
    assert missing.last_error == "HTTP 404"
    server.stop()
    closed = TcpCheck("127.0.0.1", port, timeout=0.5)
    assert not closed.probe()
    assert "refused" in closed.last_error.lower()
    assert not HttpCheck(f"http://127.0.0.1:{port}/health", timeout=0.5).probe()


def test_command_check_server_becomes_healthy(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = free_port()
    check = CommandCheck(
        [
            sys.executable,
            "-c",
            "import socket, sys; socket.create_connection(sys.argv[1:], 1)",
            "127.0.0.1",
            str(port),
        ],
        timeout=5,
    )
    assert not check.probe()
    assert check.last_error == "exit status 1"
    server = make_server("--delay", "0.2", port=port, health=check)
    server.start()
    server.wait_healthy()
    assert check.probe()


def test_command_check_that_overruns_is_killed_with_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    check = CommandCheck(["sh", "-c", script], timeout=0.5)
    began = time.monotonic()
    assert not check.probe()
    assert time.monotonic() - began < 3
    assert check.last_error == "timed out after 0.5s"
    sleeper = int(pidfile.read_text())
    wait_for(lambda: gone(sleeper), "the overrunning check's child to die", timeout=5)


def test_command_check_that_cannot_run_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot run the health command ./nope.*cmd:"):
        CommandCheck(["./nope"], cwd=tmp_path).probe()


# --- cleanup after a crash ------------------------------------------------------------------------


def test_kill_group_if_ours_ends_a_live_group_with_a_matching_record(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    log = tmp_path / "s.log"
    proc = spawn("--never-listen", "--fork-child", log=log)
    child = child_pid(log)
    assert kill_group_if_ours(record_of(proc), grace=2.0)
    assert proc.wait(timeout=5) == -signal.SIGTERM
    wait_for(lambda: gone(child), "the forked child to die", timeout=5)


def test_kill_group_if_ours_ends_an_orphan_left_by_a_dead_leader(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    log = tmp_path / "s.log"
    proc = spawn("--never-listen", "--fork-child", "--ignore-sigterm", log=log)
    child = child_pid(log)
    record = record_of(proc)
    os.kill(proc.pid, signal.SIGKILL)  # the "crash": the leader dies, its child lives on
    proc.wait(timeout=5)
    assert not gone(child)
    began = time.monotonic()
    assert kill_group_if_ours(record, grace=0.3)  # the child ignores SIGTERM: SIGKILL
    assert time.monotonic() - began >= 0.3
    wait_for(lambda: gone(child), "the orphan to die", timeout=5)
    assert not kill_group_if_ours(record)  # nothing left: nothing to do


def test_kill_group_if_ours_spares_a_process_whose_start_time_does_not_match(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    log = tmp_path / "s.log"
    proc = spawn("--never-listen", "--fork-child", log=log)
    child = child_pid(log)
    real = record_of(proc)
    reused = ProcessRecord(pid=real.pid, pgid=real.pgid, start_time=real.start_time - 60)
    assert not kill_group_if_ours(reused, grace=0.2)
    time.sleep(0.2)  # give a wrong signal time to land
    assert proc.poll() is None
    assert not gone(child)


def test_kill_group_if_ours_spares_a_group_started_before_the_record(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    log = tmp_path / "s.log"
    proc = spawn("--never-listen", "--fork-child", log=log)
    child = child_pid(log)
    record = record_of(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
    # A record whose leader started after the survivors: they cannot be its processes.
    later = ProcessRecord(pid=record.pid, pgid=record.pgid, start_time=record.start_time + 60)
    assert not kill_group_if_ours(later, grace=0.2)
    assert not gone(child)
    assert kill_group_if_ours(record, grace=2.0)
    wait_for(lambda: gone(child), "the orphan to die", timeout=5)
