"""Readiness of a server whose socket the tool bound: noticed as soon as the server answers."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
from support import FIXTURES_DIR

from e2e_infra.clock import wait_until
from e2e_infra.errors import ServerExitedError
from e2e_infra.run.health import HttpCheck
from e2e_infra.run.servers import ServerProcess, bind_listen_socket

pytestmark = pytest.mark.integration

FIXTURE = FIXTURES_DIR / "servers" / "http_server.py"
PORTS = range(17400, 17500)


def _listener() -> tuple[int, object]:
    for port in PORTS:
        try:
            return port, bind_listen_socket(port)
        except Exception:
            continue
    raise AssertionError("no free port in 17400-17499")


def _start(tmp_path: Path, *extra: str, listening: bool = True) -> tuple[ServerProcess, float]:
    """Start the fixture server on a socket we bound; return it and the seconds from the
    server's answer to our notice (time.monotonic is one clock for every process here)."""
    port, sock = _listener()
    answered = tmp_path / f"answered-{port}-{time.monotonic_ns()}"
    fd = sock.fileno()  # type: ignore[attr-defined]
    server = ServerProcess(
        "web",
        [sys.executable, str(FIXTURE), "--fd", str(fd), "--answered", str(answered), *extra],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / "web.log",
        health=HttpCheck(f"http://127.0.0.1:{port}/health"),
        startup_timeout=20,
        port=port,
        pass_fds=(fd,) if listening else (),
    )
    try:
        server.start()
    finally:
        sock.close()  # type: ignore[attr-defined]
    try:
        server.wait_healthy()
        noticed = time.monotonic()
    except BaseException:
        server.stop()
        raise
    wait_until(
        lambda: answered.exists() and answered.read_text().endswith("\n"),
        timeout=5,
        what="the server's answer time",
        first=0.001,
    )
    first = float(answered.read_text().splitlines()[-1])
    return server, noticed - first


def test_readiness_is_noticed_within_milliseconds_of_the_answer(tmp_path: Path) -> None:
    delays = []
    for _ in range(5):
        server, delay = _start(tmp_path, "--delay", "0.15")
        server.stop()
        delays.append(delay)
    # The goal is < 5 ms; the bound leaves room for a machine shared with other work.
    assert statistics.median(delays) < 0.03, delays
    assert all(d >= 0 for d in delays), delays


def test_a_server_answering_503_first_falls_back_to_polling(tmp_path: Path) -> None:
    server, _ = _start(tmp_path, "--fail-first", "2")
    try:
        assert server.running
        log = (tmp_path / "web.log").read_text()
        assert log.count('"GET /health HTTP/1.1" 503') == 2
    finally:
        server.stop()


def test_a_server_that_exits_ends_the_blocking_wait_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ServerExitedError):
        _start(tmp_path, "--exit-code", "3")
    assert time.monotonic() - started < 5
