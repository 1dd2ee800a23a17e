"""The fork server: a warm process that runs a worker's request in a fork, with the worker's stdio,
cwd and environment; signals relayed; the worker's death stops the child; nothing outlives it.

Real processes only: ``tests/fixtures/forkserver_starter.py`` starts a server (as the main nox
process does), and each "worker" is a ``python -c`` calling ``forkserver.request`` (as a nox
``-j`` worker does).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from e2e_infra.clock import wait_until
from e2e_infra.forkserver import ADDRESS_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STARTER = ROOT / "tests" / "fixtures" / "forkserver_starter.py"
WORKER = (
    "import json, sys\n"
    "from e2e_infra import forkserver\n"
    "result = forkserver.request(json.loads(sys.argv[1]))\n"
    "print('RESULT ' + json.dumps(result), flush=True)\n"
)


class Server:
    def __init__(self, proc: subprocess.Popen[str], address: str, pid: int) -> None:
        self.proc = proc
        self.address = address
        self.pid = pid

    def worker(
        self, payload: dict[str, Any], *, cwd: Path = ROOT, **env: str
    ) -> subprocess.Popen[str]:
        environ = {**os.environ, "PYTHONPATH": str(ROOT), ADDRESS_ENV: self.address, **env}
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(payload)],
            cwd=cwd,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the starter closes the server and exits
            self.proc.wait(timeout=15)


def result_of(out: str) -> Any:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture
def server() -> Iterator[Server]:
    proc = subprocess.Popen(
        [sys.executable, str(STARTER)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    started = Server(proc, info["address"], info["pid"])
    try:
        yield started
    finally:
        started.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def test_a_request_runs_in_a_fork_of_the_server_with_the_workers_stdio_cwd_and_env(
    server: Server, tmp_path: Path
) -> None:
    worker = server.worker({"do": "echo", "n": 1}, cwd=tmp_path, FORK_TEST_MARKER="from-worker")
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    result = result_of(out)
    assert result["ppid"] == server.pid  # forked by the server, not started by the worker
    assert result["pid"] not in (server.pid, worker.pid)
    assert result["sid"] == result["pid"]  # its own session: the terminal's Ctrl-C goes to nox
    assert result["preloaded_in"] == [server.pid]  # preloaded once, in the server
    assert Path(result["cwd"]) == tmp_path
    assert result["marker"] == "from-worker"
    assert result["payload"] == {"do": "echo", "n": 1}
    # The child wrote to the worker's own stdout and stderr (passed over the socket).
    assert "hello from the child" in out
    assert "and its stderr" in err
    # Answered, the child waits for the server's next connection holding nothing of the
    # worker's (its reader saw the end of the output above): stdio on /dev/null.
    wait_until(
        lambda: all(
            os.readlink(f"/proc/{result['pid']}/fd/{fd}") == os.devnull for fd in (0, 1, 2)
        ),
        timeout=10,
        what="the idle child to give back the worker's stdio",
    )


def test_the_socket_lives_in_a_private_folder(server: Server) -> None:
    folder = Path(server.address).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(Path(server.address).stat().st_mode)


def test_a_signal_to_the_worker_reaches_the_child_and_the_worker_gets_the_answer(
    server: Server, tmp_path: Path
) -> None:
    ready, done = tmp_path / "ready", tmp_path / "done"
    worker = server.worker({"do": "wait_signal", "ready": str(ready), "done": str(done)})
    wait_until(ready.exists, timeout=60, what="the child to start")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err  # the worker relayed it and waited for the answer
    assert result_of(out) == {"signals": [signal.SIGTERM]}


def test_a_worker_killed_outright_stops_its_child(server: Server, tmp_path: Path) -> None:
    ready, done = tmp_path / "ready", tmp_path / "done"
    worker = server.worker({"do": "wait_signal", "ready": str(ready), "done": str(done)})
    wait_until(ready.exists, timeout=60, what="the child to start")
    child = int(ready.read_text())
    worker.kill()  # as nox does to a worker 2 s after an interrupt
    worker.communicate(timeout=10)
    wait_until(done.exists, timeout=10, what="the child to notice its worker died")
    assert json.loads(done.read_text()) == [signal.SIGTERM]
    wait_until(lambda: not _alive(child), timeout=10, what="the child to exit")


def test_a_failing_handler_is_an_answer_not_a_hang(server: Server) -> None:
    worker = server.worker({"do": "raise"})
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert result_of(out) == {"error": "ValueError: the handler failed"}


def test_no_server_means_run_it_yourself(server: Server) -> None:
    server.close()  # its starter ends: the server stops and removes its folder
    assert not Path(server.address).parent.exists()
    assert not _alive(server.pid)
    worker = server.worker({"do": "echo"})
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert result_of(out) is None
    assert "hello from the child" not in out


def test_a_server_whose_starter_died_ends_too(server: Server) -> None:
    server.proc.kill()
    server.proc.wait(timeout=10)
    wait_until(lambda: not _alive(server.pid), timeout=10, what="the server to end")
    assert not Path(server.address).parent.exists()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


AGAIN = """\
import json, os, signal, sys, time
from e2e_infra import forkserver
out = [open(path, "w") for path in sys.argv[1:3]]
null = open(os.devnull, "rb")
os.environ["FORK_TEST_MARKER"] = "first"
call = forkserver.start({"do": "echo"}, None, (null.fileno(), out[0].fileno(), out[0].fileno()))
first = call.result(keep=True)
os.environ["FORK_TEST_MARKER"] = "second"
os.chdir(sys.argv[3])
again = call.again({"do": "echo", "n": 2}, (null.fileno(), out[1].fileno(), out[1].fileno()))
second = call.result(keep=True)
call.close()
# Once the child is idle (it gave back the stdio, then told the server), a new connection is
# handed to it: no fork.
while os.readlink(f"/proc/{call.pid}/fd/1") != os.devnull:
    time.sleep(0.01)
time.sleep(0.2)
call = forkserver.start({"do": "echo"}, None, (null.fileno(), out[0].fileno(), out[0].fileno()))
third = call.result(keep=True)
# A child that is gone cannot take another request.
os.kill(call.pid, signal.SIGKILL)
dead = call.again({"do": "echo"}, (null.fileno(), out[1].fileno(), out[1].fileno()))
print("RESULT " + json.dumps([first, again, second, third, dead]), flush=True)
"""


def test_a_child_takes_the_next_request_then_the_next_connection_without_a_fork(
    server: Server, tmp_path: Path
) -> None:
    outs = [tmp_path / "first.log", tmp_path / "second.log"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", AGAIN, *map(str, outs), str(elsewhere)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), ADDRESS_ENV: server.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first, again, second, third, dead = result_of(done.stdout)
    # The same process ran all three (no second fork), each time as the requester's stand-in.
    assert again is True and second["pid"] == first["pid"] == third["pid"]
    assert (first["marker"], second["marker"]) == ("first", "second")
    assert first["cwd"] == str(ROOT) and second["cwd"] == str(elsewhere)
    assert second["payload"] == {"do": "echo", "n": 2}
    assert [path.read_text().count("hello from the child") for path in outs] == [2, 1]
    assert dead is False
    wait_until(  # killed: the server sees its channel end and reaps it
        lambda: not psutil.pid_exists(first["pid"]), timeout=10, what="the killed child reaped"
    )


def test_idle_children_exit_with_the_server(server: Server) -> None:
    workers = [server.worker({"do": "echo"}) for _ in range(2)]
    pids = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        pids.append(result_of(out)["pid"])
    children = {p.pid for p in psutil.Process(server.pid).children()}
    assert set(pids) <= children  # idle, waiting for the next worker
    server.close()
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
