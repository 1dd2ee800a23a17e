"""A warm interpreter that forks a child per connection: what a ``nox -j`` worker asks to run its
session, instead of importing the tool (psycopg, servers, health...) and parsing the config itself.

Why: under ``nox -j`` every session runs in a fresh ``python -m nox`` worker. nox's own start-up
is nox's, but before this each worker also imported psycopg and the session's modules (~0.5 s of
CPU per project on a 2-core runner, the largest part of the tool's cost under ``-j``). The main
nox process loads the noxfile once; :meth:`ForkServer.start`, called there, forks a *server* that
imports all of that once and then forks a child per request. A child costs a ``fork``.

The protocol (a ``SOCK_SEQPACKET`` unix socket in a 0700 temporary folder; peers of another uid
are refused):

1. The worker sends one JSON message (the request: its cwd, its environment, the payload) with
   its standard input, output and error attached (``SCM_RIGHTS``).
2. The server forks. The child leaves the server's session (``setsid``: the terminal's Ctrl-C
   reaches nox, which passes it on, as it does to its workers), takes the worker's descriptors as
   0/1/2, its cwd and environment, and answers ``{"pid": ...}``.
3. While the child runs, the worker relays each SIGINT/SIGTERM/SIGHUP it gets as a message; the
   child raises it on itself. If the worker dies (nox SIGKILLs workers 2 s after an interrupt),
   the child sees the end of the connection and stops as if interrupted once.
4. The child answers with the handler's JSON result. Then it waits on the same connection: a
   next request (:meth:`Call.again`: a batch's thread sends its next project to its child, so a
   project costs no fork, no exit and no page copied again) starts again at step 2 without the
   fork. At the end of the connection the child gives back the requester's stdio and tells the
   server, over a control channel made at its fork, that it is idle; the server hands it the
   next connection it accepts (a ``nox -j`` worker's), before it forks another child.
5. A child stopped by a signal, or whose requester died, exits (``os._exit``: no inherited
   ``atexit`` runs twice); so do the idle ones when the server ends. The server reaps them.

Anything that goes wrong before the child answered ``pid`` (no server, a server that died, a
refused peer) makes :func:`request` return ``None``: the caller runs the work itself, so the fork
server can only make a run cheaper, never make it fail. The server ends when the process that
started it does (a pipe it holds), and removes its folder.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import queue
import select
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ADDRESS_ENV", "RELAYED", "Call", "ForkServer", "enabled", "request", "start"]

log = logging.getLogger("e2e_infra")

ADDRESS_ENV = "E2E_FORKSERVER_ADDRESS"  # set by the process that started the server
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_MAX_MESSAGE = 4 << 20  # a request carries the worker's environment
_PID_TIMEOUT = 60.0  # the server may still be importing when the first workers ask
_POLL = 0.5
_STOP_TIMEOUT = 5.0
_IDLE_TIMEOUT = 600.0  # an idle child nobody hands a connection to exits after this
_IDLE_WAIT = 2.0  # for the children to exit once the server ends (its starter waits 5 s)

Handler = Callable[[Mapping[str, Any]], dict[str, Any]]


def enabled() -> bool:
    """Whether sessions may run in a fork server (``E2E_FORKSERVER=0`` says no)."""
    return os.environ.get("E2E_FORKSERVER", "").lower() not in ("0", "off", "no")


class ForkServer:
    """The server as its starter sees it: its address, and :meth:`close` (also at exit)."""

    def __init__(self, pid: int, folder: Path, address: str, stop_fd: int) -> None:
        self.pid = pid
        self.folder = folder
        self.address = address
        self._stop_fd = stop_fd

    @classmethod
    def start(cls, handler: Handler, preload: Callable[[], None]) -> ForkServer | None:
        """Fork the server from this (single-threaded) process; ``None`` where it cannot be.

        ``preload`` runs in the server before its first fork (imports); ``handler`` in each child.
        The socket listens before the fork, so a request sent while the server still preloads
        waits in the backlog instead of failing.
        """
        if not hasattr(os, "fork") or threading.active_count() != 1:
            return None  # forking a process with other threads could copy a held lock
        folder = Path(tempfile.mkdtemp(prefix="e2e-infra-fork-"))  # 0700
        address = str(folder / "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(address)
            listener.listen(64)
        except OSError:
            listener.close()
            shutil.rmtree(folder, ignore_errors=True)
            return None
        stop_r, stop_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would print what this process had buffered, again
        pid = os.fork()
        if pid == 0:  # the server
            code = 1
            try:
                os.close(stop_w)
                code = _Server(listener, stop_r, folder, handler).serve(preload)
            except BaseException:
                with contextlib.suppress(BaseException):
                    log.exception("e2e-infra fork server failed; sessions run in their workers")
            finally:
                os._exit(code)
        listener.close()
        os.close(stop_r)
        os.set_inheritable(stop_w, False)
        return cls(pid, folder, address, stop_w)

    def close(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server (children already forked run on) and reap it; idempotent."""
        if self._stop_fd < 0:
            return
        os.close(self._stop_fd)
        self._stop_fd = -1
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.005)
        shutil.rmtree(self.folder, ignore_errors=True)


class _Server:
    def __init__(self, listener: socket.socket, stop_fd: int, folder: Path, handler: Handler):
        self.listener = listener
        self.stop_fd = stop_fd
        self.folder = folder
        self.handler = handler
        self.selector = selectors.DefaultSelector()
        # Each child's end of the control channel, by the server's socket: "idle" from the child
        # (its connection ended cleanly), a new connection to it (SCM_RIGHTS), or the end.
        self.children: dict[socket.socket, int] = {}
        self.idle: list[socket.socket] = []

    def serve(self, preload: Callable[[], None]) -> int:
        # The terminal's Ctrl-C reaches the whole foreground group, this server too: nox decides
        # what an interrupt means for its sessions; the server ends when its starter does.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        preload()
        # Every object so far is shared with the children copy-on-write; the garbage collector
        # of a child would walk (and write to) all of them, copying their pages. Frozen, it
        # leaves them alone: a child copies only what it really changes.
        gc.collect()
        gc.freeze()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.stop_fd, selectors.EVENT_READ)
        running = True
        while running:
            for key, _ in self.selector.select(timeout=_POLL):
                if key.fileobj == self.stop_fd:
                    running = False  # the starter closed its end, or died
                elif key.fileobj is self.listener:
                    if running:
                        self._accept()
                elif isinstance(key.fileobj, socket.socket):
                    self._heard(key.fileobj)
            _reap()
        self.listener.close()
        # An idle child exits when its channel ends, a running one once it has answered: they
        # are waited for a moment (and reaped, their CPU counted here); a long run goes on.
        pids = list(self.children.values())
        for ctl in list(self.children):
            self._forget(ctl)
        _wait_gone(pids, _IDLE_WAIT)
        _reap()
        shutil.rmtree(self.folder, ignore_errors=True)
        return 0

    def _heard(self, ctl: socket.socket) -> None:
        try:
            message = ctl.recv(16)
        except OSError:
            message = b""
        if message == b"idle":
            if ctl not in self.idle:
                self.idle.append(ctl)
        else:  # the child ended
            self._forget(ctl)

    def _forget(self, ctl: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(ctl)
        self.children.pop(ctl, None)
        if ctl in self.idle:
            self.idle.remove(ctl)
        ctl.close()

    def _hand_over(self, conn: socket.socket, message: bytes, fds: list[int]) -> bool:
        """Give the connection and its request to an idle child: no fork. False: none took it."""
        while self.idle:
            ctl = self.idle.pop()
            try:
                socket.send_fds(ctl, [message], [conn.fileno(), *fds])
                return True
            except OSError:  # it ended meanwhile
                self._forget(ctl)
        return False

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            if _peer_uid(conn) != os.getuid():
                return
            message, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
            if len(fds) != 3:
                return
            request = json.loads(message)
            if self._hand_over(conn, message, fds):
                return
            ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:
                ctl.close()
                others = (other.fileno() for other in self.children)
                inherited = (self.listener.fileno(), self.stop_fd, *others)
                _child(conn, fds, request, self.handler, inherited, ctl_child)
            ctl_child.close()
            self.children[ctl] = pid
            self.selector.register(ctl, selectors.EVENT_READ)
        except (OSError, ValueError):
            return
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


def _child(
    conn: socket.socket,
    fds: list[int],
    request: Mapping[str, Any],
    handler: Handler,
    server_fds: tuple[int, ...],
    ctl: socket.socket,
) -> None:
    """In the forked child: become the worker's stand-in, run the handler, answer; take the
    next request on the same connection (:meth:`Call.again`) until its end. Then, if it ended
    cleanly, tell the server it is idle and wait for the next connection the server hands over
    (a ``nox -j`` worker's: no fork per session); exit when the server ends or after
    :data:`_IDLE_TIMEOUT`."""
    code = 1
    try:
        for fd in server_fds:
            os.close(fd)
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ctl.settimeout(_IDLE_TIMEOUT)
        taken: tuple[socket.socket, Mapping[str, Any], list[int]] | None = (conn, request, fds)
        while taken is not None:
            conn, request, fds = taken
            _serve_connection(conn, request, fds, handler)
            code = 0
            _let_go()
            conn.close()
            ctl.sendall(b"idle")
            taken = _handed_over(ctl)
    except BaseException:  # a worker gone (or a signal relayed) between requests: nothing runs
        pass
    finally:
        os._exit(code)


def _serve_connection(
    conn: socket.socket, request: Mapping[str, Any], fds: list[int], handler: Handler
) -> None:
    """Run the requests of one connection; return when it ended cleanly (raise otherwise)."""
    inbox = _Inbox(conn)
    inbox.start()
    taken: tuple[Mapping[str, Any], list[int]] | None = (request, fds)
    while taken is not None:
        request, fds = taken
        _take_over(request, fds)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode())
        inbox.begin()
        try:
            result = handler(request["payload"])
        except BaseException as exc:  # the handler's own failures are its answer
            result = {"error": f"{type(exc).__name__}: {exc}"}
        interrupted = inbox.relayed
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        inbox.end()
        conn.sendall(json.dumps({"result": result}).encode())
        if interrupted:
            raise SystemExit(1)  # a run stopped by a signal: this process ends with it
        taken = inbox.next_request()
    inbox.join(_STOP_TIMEOUT)


def _handed_over(ctl: socket.socket) -> tuple[socket.socket, Mapping[str, Any], list[int]] | None:
    """The next connection the server hands over, with its request; None: the server ended."""
    message, fds, _flags, _addr = socket.recv_fds(ctl, _MAX_MESSAGE, 4)
    if not message or len(fds) != 4:
        for fd in fds:
            os.close(fd)
        return None
    return socket.socket(fileno=fds[0]), json.loads(message), fds[1:]


def _let_go() -> None:
    """Give back the last requester's stdio (its reader waits for their end): /dev/null."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)


def _take_over(request: Mapping[str, Any], fds: list[int]) -> None:
    """Become the requester's stand-in: its stdin/stdout/stderr, cwd and environment."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])


class _Inbox(threading.Thread):
    """The one reader of the child's connection: raises on this process the signals the worker
    relays, queues the next request (it comes with descriptors), and at the end of the
    connection stops a request still running (a SIGTERM: the worker died, as nox would have
    asked, unless it relayed a signal already) or ends the child's loop."""

    def __init__(self, conn: socket.socket) -> None:
        super().__init__(name="e2e-infra relay", daemon=True)
        self.conn = conn
        self._lock = threading.Lock()
        self._running = False
        self._relayed = False
        self._requests: queue.SimpleQueue[tuple[bytes, list[int]] | None] = queue.SimpleQueue()

    def begin(self) -> None:
        with self._lock:
            self._running, self._relayed = True, False

    def end(self) -> None:
        with self._lock:
            self._running = False

    @property
    def relayed(self) -> bool:
        """A signal was relayed during the current (or last) request."""
        with self._lock:
            return self._relayed

    def run(self) -> None:
        # Until the end of the connection: the requester closes it or dies, or this child exits
        # (a daemon thread); no wait of its own: a run is bounded by the session's timeouts, an
        # idle connection by next_request's deadline.
        with contextlib.suppress(OSError):
            message, fds = self._receive()
            while message:  # b"": the end of the connection
                if fds:  # a request comes with the requester's stdio
                    self._requests.put((message, fds))
                else:
                    with self._lock:
                        self._relayed = True
                    with contextlib.suppress(ValueError):
                        os.kill(os.getpid(), int(message))
                message, fds = self._receive()
        with self._lock:
            died = self._running and not self._relayed
        if died:
            os.kill(os.getpid(), signal.SIGTERM)
        self._requests.put(None)

    def _receive(self) -> tuple[bytes, list[int]]:
        message, fds, _flags, _addr = socket.recv_fds(self.conn, _MAX_MESSAGE, 3)
        return message, fds

    def next_request(self) -> tuple[Mapping[str, Any], list[int]] | None:
        """The next request and its descriptors; None at the end of the connection. A
        connection with no request for :data:`_IDLE_TIMEOUT` raises ``queue.Empty``: the child
        exits (its requester forks a new one if it asks again)."""
        while (item := self._requests.get(timeout=_IDLE_TIMEOUT)) is not None:
            message, fds = item
            try:
                request = json.loads(message)
                if len(fds) == 3 and isinstance(request, dict):
                    return request, fds
            except ValueError:
                pass
            for fd in fds:
                os.close(fd)
        return None


class Call:
    """A request the server took: the child's pid, its relay, and (blocking) its answer."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid

    def signal(self, signum: int) -> None:
        """Have the child raise ``signum`` on itself (as if it had been sent to it)."""
        with contextlib.suppress(OSError):
            self.sock.send(str(signum).encode())

    def result(self, *, keep: bool = False) -> dict[str, Any]:
        """The handler's answer; an ``error`` if the child ended without one. Closes the call,
        unless ``keep``: then the child waits for :meth:`again` or :meth:`close`.

        No deadline of its own: the child's run is bounded by the session's own timeouts, and
        its end, by any means, closes the connection.
        """
        self.sock.settimeout(None)
        try:
            answer = self.sock.recv(_MAX_MESSAGE)
            result: dict[str, Any] = json.loads(answer)["result"] if answer else {}
        except (OSError, ValueError, KeyError):
            result = {}
        if not result or not keep:
            self.close()
        if not result:
            return {"error": f"the session process {self.pid} ended without an answer"}
        return result

    def again(self, payload: Mapping[str, Any], stdio: tuple[int, int, int]) -> bool:
        """Start ``payload`` in the same child, its last answer taken (``result(keep=True)``):
        no fork, no exit, no page copied again. False (the call closed) if the child is gone."""
        if self.sock.fileno() < 0:
            return False
        try:
            self.sock.settimeout(_PID_TIMEOUT)
            if _send(self.sock, payload, stdio) == self.pid:
                return True
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.close()
        return False

    def close(self) -> None:
        """End the call: its child waits for the server's next connection, or exits with it."""
        self.sock.close()


def start(
    payload: Mapping[str, Any],
    address: str | None = None,
    stdio: tuple[int, int, int] = (0, 1, 2),
) -> Call | None:
    """Have the fork server start ``payload`` with ``stdio`` and this process's cwd and environment.

    ``None`` when no server took it (run it yourself then): no address, no server, a server that
    died before its child answered.
    """
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(_PID_TIMEOUT)
        sock.connect(address)
        pid = _send(sock, payload, stdio)
    except (OSError, ValueError, KeyError, TypeError):
        sock.close()
        return None
    if pid <= 0:
        sock.close()
        return None
    return Call(sock, pid)


def _send(sock: socket.socket, payload: Mapping[str, Any], stdio: tuple[int, int, int]) -> int:
    """Send a request with ``stdio``; the pid of the child that took it (0: none did)."""
    if stdio[1:] == (1, 2):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # what this process printed comes before what the child prints
    message = json.dumps({"cwd": os.getcwd(), "env": dict(os.environ), "payload": payload})
    socket.send_fds(sock, [message.encode()], list(stdio))
    started = sock.recv(_MAX_MESSAGE)
    return int(json.loads(started)["pid"]) if started else 0


def request(payload: Mapping[str, Any], address: str | None = None) -> dict[str, Any] | None:
    """:func:`start` with this process's stdio, relay its signals, and wait for the answer.

    Returns the handler's result, or ``None`` when no server took the request (run it here).
    """
    call = start(payload, address)
    if call is None:
        return None
    with _relaying(call):
        return call.result()


@contextlib.contextmanager
def _relaying(call: Call) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, _: call.signal(signum)) for sig in RELAYED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait (at most ``timeout`` in all) for these processes to have exited."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
            try:
                select.select([pidfd], [], [], max(deadline - time.monotonic(), 0.0))
            finally:
                os.close(pidfd)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        for _ in range(1024):
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
