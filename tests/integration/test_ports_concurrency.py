"""The port allocator with real processes and real sockets (ports 20000-20399 only)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from e2e_infra.clock import wait_until
from e2e_infra.config import PortRange
from e2e_infra.resources.leases import Owner, Registry
from e2e_infra.resources.ports import PortAllocator, port_is_free

pytestmark = pytest.mark.integration

WORKERS = 16
ROUNDS = 20
CONCURRENT_RANGE = PortRange(20000, 20199)
KILLED_RANGE = PortRange(20200, 20201)
PROBE_RANGE = PortRange(20300, 20399)
WAIT = 60.0


def _allocating_worker(
    state_dir: str, index: int, barrier: Barrier, results: Queue[tuple[int, int, Any]]
) -> None:
    """One process: each round, wait for everyone, allocate, report, wait, release."""
    ports = PortAllocator(Registry(Path(state_dir), lock_timeout=WAIT), CONCURRENT_RANGE)
    project = f"project_{index}"
    for round_ in range(ROUNDS):
        owner = Owner.current(run_id=f"round-{round_}")
        barrier.wait(WAIT)  # all WORKERS hit the registry lock at the same moment
        try:
            results.put((round_, index, ports.allocate(project, ["backend", "frontend"], owner)))
        except Exception as exc:
            results.put((round_, index, f"{type(exc).__name__}: {exc}"))
        barrier.wait(WAIT)  # the test checks what everyone holds at once
        ports.release(project, run_id=owner.run_id)


def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for proc in processes:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def test_sixteen_processes_allocating_at_once_never_share_a_port(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(WORKERS + 1)
    results: Queue[tuple[int, int, Any]] = spawn.Queue()
    workers = [
        spawn.Process(target=_allocating_worker, args=(str(tmp_path), i, barrier, results))
        for i in range(WORKERS)
    ]
    for proc in workers:
        proc.start()
    try:
        for round_ in range(ROUNDS):
            barrier.wait(WAIT)
            got = [results.get(timeout=WAIT) for _ in range(WORKERS)]
            assert sorted((r, i) for r, i, _ in got) == [(round_, i) for i in range(WORKERS)]
            failures = [value for _, _, value in got if not isinstance(value, dict)]
            assert failures == [], f"round {round_}"
            held = [port for _, _, value in got for port in value.values()]
            assert len(held) == 2 * WORKERS
            assert len(set(held)) == len(held), f"duplicate ports in round {round_}"
            assert all(port in CONCURRENT_RANGE for port in held)
            document = json.loads((tmp_path / "leases.json").read_text())  # valid JSON, always
            assert sorted(int(lease["resource"]) for lease in document["leases"]) == sorted(held)
            barrier.wait(WAIT)
    except BaseException:
        barrier.abort()  # wake the workers so they exit now instead of after WAIT
        raise
    finally:
        _stop(workers)
    assert [proc.exitcode for proc in workers] == [0] * WORKERS
    assert json.loads((tmp_path / "leases.json").read_text())["leases"] == []


_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from e2e_infra.config import PortRange
    from e2e_infra.resources.leases import Owner, Registry
    from e2e_infra.resources.ports import PortAllocator

    state, out = Path(sys.argv[1]), Path(sys.argv[2])
    ports = PortAllocator(Registry(state), PortRange({low}, {high}))
    got = ports.allocate("crashed", ["backend", "frontend"], Owner.current(run_id="doomed"))
    out.write_text(json.dumps(got))
    time.sleep(120)
    """
)


def test_ports_of_a_sigkilled_holder_are_reclaimed_by_the_next_allocation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ports.json"
    script = _HOLDER.format(low=KILLED_RANGE.low, high=KILLED_RANGE.high)
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(out)])
    try:
        text = wait_until(
            lambda: out.exists() and out.read_text(),
            timeout=WAIT,
            what="the holder process to lease its ports",
        )
        held = json.loads(text)
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    ports = PortAllocator(Registry(tmp_path), KILLED_RANGE)

    # The range has exactly the dead holder's two ports: only a reclaim can satisfy this.
    with caplog.at_level("INFO", logger="e2e_infra"):
        mine = ports.allocate("next", ["backend", "frontend"], Owner.current(run_id="next"))

    assert sorted(mine.values()) == sorted(held.values())
    assert {lease.project for lease in ports.leases()} == {"next"}
    assert caplog.text.count("reclaimed port") == 2
    assert f"owner pid {holder.pid} is gone" in caplog.text


# --- the probe against real sockets -------------------------------------------------------------


def _listener(host: str, port: int, *, reuse: bool = True, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    if listen:
        sock.listen()
    return sock


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_listening_port_is_taken_on_either_probe_host(host: str) -> None:
    port = PROBE_RANGE.low + (0 if host == "127.0.0.1" else 1)
    with _listener(host, port):
        assert not port_is_free(port)
        assert not port_is_free(port, ("127.0.0.1",))
        assert not port_is_free(port, ("0.0.0.0",))
    assert port_is_free(port)


def test_a_port_bound_without_reuse_is_taken_even_before_listen() -> None:
    port = PROBE_RANGE.low + 2
    with _listener("127.0.0.1", port, reuse=False, listen=False):
        assert not port_is_free(port)
    assert port_is_free(port)


def test_a_time_wait_socket_does_not_make_a_port_look_taken() -> None:
    port = PROBE_RANGE.low + 3
    server = _listener("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection enters TIME_WAIT
    server.close()
    client.close()
    plain = socket.socket()
    try:
        with pytest.raises(OSError):  # proof that the TIME_WAIT is there
            plain.bind(("127.0.0.1", port))
    finally:
        plain.close()

    assert port_is_free(port)
    with _listener("127.0.0.1", port) as server:  # and a server really can bind it
        assert server.getsockname()[1] == port


def test_an_unbindable_probe_host_is_skipped_not_counted_as_taken() -> None:
    assert port_is_free(PROBE_RANGE.low + 4, ("127.0.0.1", "192.0.2.1"))  # TEST-NET: not local


def test_the_allocator_steps_over_ports_foreign_processes_listen_on(tmp_path: Path) -> None:
    small = PortRange(PROBE_RANGE.low + 10, PROBE_RANGE.low + 13)
    foreign = [_listener("0.0.0.0", port) for port in (small.low, small.low + 1, small.low + 3)]
    try:
        ports = PortAllocator(Registry(tmp_path), small)
        got = ports.allocate("web", ["backend"], Owner.current(run_id="r"))
    finally:
        for sock in foreign:
            sock.close()
    assert got == {"backend": small.low + 2}
