"""Demo MES frontend: serves the static pages of demo/frontend/static/ (standard library only).

Configuration (environment):
  PORT         port to listen on (required unless a socket is handed over; `--port N` wins)
  BACKEND_URL  base URL of the backend API, e.g. http://127.0.0.1:4100 (required)
  HOST         bind address (default 127.0.0.1)

The backend URL is injected at serve time: every occurrence of the placeholder
%%BACKEND_URL%% in the .html/.js files is replaced, and GET /config.js returns
`window.BACKEND_URL = "...";`. The backend does not need to be running: this
server never calls it.

Socket hand-over: `--fd N`, or LISTEN_FDS=1 with LISTEN_PID equal to this process
id (fd 3), makes the server use that already-bound listening socket.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

STATIC_DIR = Path(__file__).resolve().parent / "static"
PLACEHOLDER = b"%%BACKEND_URL%%"
TEMPLATED_SUFFIXES = frozenset({".html", ".js"})
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
# Characters that would need escaping in an HTML attribute or a JS string.
UNSAFE_URL_CHARS = set("\"'<>\\`") | {chr(c) for c in range(33)} | {"\x7f"}

_log_lock = threading.Lock()


def log(line: str) -> None:
    with _log_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def validate_backend_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("BACKEND_URL must be an absolute http:// or https:// URL")
    if any(c in UNSAFE_URL_CHARS for c in url):
        raise ValueError("BACKEND_URL contains quotes, spaces or control characters")
    return url.rstrip("/")


class Handler(BaseHTTPRequestHandler):
    server_version = "demo-frontend/1.0"
    server: Server

    def handle_one_request(self) -> None:
        self._started = time.monotonic()
        super().handle_one_request()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        elapsed = (time.monotonic() - getattr(self, "_started", time.monotonic())) * 1000
        code_value = code.value if isinstance(code, HTTPStatus) else code
        log(f'{self.address_string()} "{self.command} {self.path}" {code_value} {elapsed:.1f}ms')

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.address_string()} {format % args}")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def not_found(self) -> None:
        self.send_body(
            404, b"<!doctype html><title>404</title><h1>Not found</h1>\n", CONTENT_TYPES[".html"]
        )

    def resolve(self, url_path: str) -> Path | None:
        """Map a URL path to a file under STATIC_DIR; None if outside or missing."""
        rel = unquote(url_path).lstrip("/")
        if rel == "" or rel.endswith("/"):
            rel += "index.html"
        if "\x00" in rel:
            return None
        candidate = (STATIC_DIR / rel).resolve()
        if candidate.suffix == "":
            candidate = candidate.with_suffix(".html")  # /login -> login.html
        if not candidate.is_relative_to(STATIC_DIR) or not candidate.is_file():
            return None
        return candidate

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        backend_url = self.server.backend_url
        if path == "/config.js":
            body = f"window.BACKEND_URL = {json.dumps(backend_url)};\n".encode()
            self.send_body(200, body, CONTENT_TYPES[".js"])
            return
        if path == "/health":
            self.send_body(200, b'{"status":"ok"}', CONTENT_TYPES[".json"])
            return
        file = self.resolve(path)
        if file is None:
            self.not_found()
            return
        body = file.read_bytes()
        if file.suffix in TEMPLATED_SUFFIXES:
            body = body.replace(PLACEHOLDER, backend_url.encode())
        content_type = CONTENT_TYPES.get(file.suffix) or (
            mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        )
        self.send_body(200, body, content_type)

    def do_HEAD(self) -> None:
        self.do_GET()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], backend_url: str, sock: socket.socket | None = None
    ) -> None:
        self.backend_url = backend_url
        super().__init__(address, Handler, bind_and_activate=sock is None)
        if sock is not None:  # an already-bound socket handed over by the parent
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()[:2]
            self.server_name = str(self.server_address[0])
            self.server_port = int(self.server_address[1])
            sock.listen(self.request_queue_size)


def inherited_socket(fd_arg: int | None) -> socket.socket | None:
    fd = fd_arg
    if fd is None and os.environ.get("LISTEN_FDS") == "1":
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            fd = 3
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if fd is None:
        return None
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    if sock.type != socket.SOCK_STREAM:
        raise SystemExit(f"demo-frontend: fd {fd} is not a stream socket")
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Demo MES frontend (static pages)")
    parser.add_argument("--port", type=int, help="port to listen on (default: $PORT)")
    parser.add_argument("--host", help="bind address (default: $HOST or 127.0.0.1)")
    parser.add_argument("--fd", type=int, help="use this already-bound listening socket")
    args = parser.parse_args(argv)

    raw_backend = os.environ.get("BACKEND_URL", "")
    if not raw_backend:
        print("demo-frontend: BACKEND_URL is required", file=sys.stderr)
        return 2
    try:
        backend_url = validate_backend_url(raw_backend)
    except ValueError as exc:
        print(f"demo-frontend: {exc}", file=sys.stderr)
        return 2
    sock = inherited_socket(args.fd)
    host = args.host or os.environ.get("HOST") or "127.0.0.1"
    port = args.port
    if port is None and os.environ.get("PORT"):
        try:
            port = int(os.environ["PORT"])
        except ValueError:
            print("demo-frontend: PORT must be an integer", file=sys.stderr)
            return 2
    if sock is None and port is None:
        print("demo-frontend: PORT (or --port, or --fd) is required", file=sys.stderr)
        return 2

    try:
        server = Server((host, port or 0), backend_url, sock)
    except OSError as exc:
        print(f"demo-frontend: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="http", daemon=True
    )
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    log(
        f"demo-frontend listening on http://{bound_host}:{bound_port}"
        f" (backend {backend_url}, pid {os.getpid()})"
    )
    while not stop.wait(0.5):
        if not thread.is_alive():
            log("demo-frontend: server loop died")
            return 1
    log("demo-frontend: shutting down")
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
