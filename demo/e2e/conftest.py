"""Shared fixtures for the demo end-to-end suites (one sub-folder per e2e-infra project).

Environment (set by e2e-infra for every project run):
  BACKEND_URL   base URL of the project's backend, e.g. http://127.0.0.1:4100
  FRONTEND_URL  base URL of the project's frontend
  DATABASE_URL  the project's own PostgreSQL database (absent for static_pages)
  E2E_PROJECT   the project name (optional here; used to tag rows and connections)

A suite that needs a variable which is not set fails (it never skips): each
suite's conftest.py lists the variables it needs in an autouse fixture.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HTTP_TIMEOUT = 10.0

# Facts about demo/seeds/default that the suites assert exactly. A fresh clone of
# the template has exactly these rows; a database shared with another project
# (or reused from an earlier run) does not.
DEFAULT_SEED = {
    "users": 23,
    "products": 60,
    "finished_products": 20,
    "inventory_items": 240,
    "stock_movements": 960,
    "quality_checks": 400,
    "quality_pass": 350,
    "quality_fail": 50,
    "defects": 50,
    "work_orders": 600,
    "work_orders_by_status": {
        "planned": 180,
        "released": 120,
        "in_progress": 120,
        "on_hold": 60,
        "completed": 60,
        "cancelled": 60,
    },
}

USERS = {
    "admin": "admin-pass",
    "operator": "operator-pass",
    "inspector": "inspector-pass",
}


def require_env(name: str, why: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(
            f"environment variable {name} is not set ({why}). The demo e2e suites are meant "
            f"to be run by e2e-infra, which starts the project's servers and database and "
            f"exports {name}; to run one by hand, export it yourself.",
            pytrace=False,
        )
    return value


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"response is not JSON ({exc}): {self.body[:200]!r}") from None

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Http:
    """A minimal HTTP client on urllib.request; HTTP error statuses are returned, not raised."""

    base_url: str
    token: str | None = None
    default_headers: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Response:
        all_headers = {"Accept": "application/json", **self.default_headers, **(headers or {})}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        bearer = token if token is not None else self.token
        if bearer:
            all_headers["Authorization"] = f"Bearer {bearer}"
        req = urllib.request.Request(
            self.base_url.rstrip("/") + path, data=data, method=method, headers=all_headers
        )
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
                return Response(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, dict(exc.headers.items()), exc.read())
        except OSError as exc:
            raise AssertionError(f"{method} {self.base_url}{path} failed: {exc}") from None

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, json_body, **kwargs)

    def get_json(self, path: str, expected: int = 200) -> Any:
        resp = self.get(path)
        assert resp.status == expected, f"GET {path}: {resp.status} {resp.body[:300]!r}"
        return resp.json()

    def post_json(self, path: str, json_body: Any, expected: int = 200) -> Any:
        resp = self.post(path, json_body)
        assert resp.status == expected, f"POST {path}: {resp.status} {resp.body[:300]!r}"
        return resp.json()


# --------------------------------------------------------------------------- environment


@pytest.fixture(scope="session")
def backend_url() -> str:
    return require_env("BACKEND_URL", "this suite calls the backend API").rstrip("/")


@pytest.fixture(scope="session")
def frontend_url() -> str:
    return require_env("FRONTEND_URL", "this suite loads the frontend pages").rstrip("/")


@pytest.fixture(scope="session")
def database_url() -> str:
    return require_env("DATABASE_URL", "this suite checks the project's database directly")


@pytest.fixture(scope="session")
def project_name(request: pytest.FixtureRequest) -> str:
    """E2E_PROJECT, or the suite folder name when run by hand."""
    return os.environ.get("E2E_PROJECT") or Path(str(request.config.args[0])).name


@pytest.fixture(scope="session")
def default_seed() -> dict[str, Any]:
    return DEFAULT_SEED


# --------------------------------------------------------------------------- clients


@pytest.fixture(scope="session")
def backend(backend_url: str) -> Http:
    return Http(backend_url)


@pytest.fixture(scope="session")
def frontend(frontend_url: str) -> Http:
    return Http(frontend_url, default_headers={"Accept": "*/*"})


@pytest.fixture(scope="session")
def login(backend: Http) -> Callable[[str, str | None], str]:
    """login(username, password=None) -> bearer token (the demo password by default)."""

    def do_login(username: str, password: str | None = None) -> str:
        resp = backend.post(
            "/api/login", {"username": username, "password": password or USERS[username]}
        )
        assert resp.status == 200, f"login as {username} failed: {resp.status} {resp.text}"
        token = resp.json()["token"]
        assert isinstance(token, str) and len(token) >= 32
        return token

    return do_login


@pytest.fixture(scope="session")
def admin(backend_url: str, login: Callable[[str], str]) -> Http:
    return Http(backend_url, token=login("admin"))


@pytest.fixture(scope="session")
def operator(backend_url: str, login: Callable[[str], str]) -> Http:
    return Http(backend_url, token=login("operator"))


@pytest.fixture(scope="session")
def inspector(backend_url: str, login: Callable[[str], str]) -> Http:
    return Http(backend_url, token=login("inspector"))


@pytest.fixture(scope="session")
def db(database_url: str, project_name: str) -> Iterator[Any]:
    """An autocommit psycopg connection to the project's own database."""
    import psycopg  # only the suites with a database need psycopg

    conn = psycopg.connect(
        database_url,
        autocommit=True,
        application_name=f"e2e-{project_name}"[:63],
        connect_timeout=10,
    )
    try:
        yield conn
    finally:
        conn.close()


def scalar(conn: Any, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture(scope="session")
def sql_scalar(db: Any) -> Callable[..., Any]:
    """sql_scalar("SELECT count(*) FROM t WHERE x = %s", (x,)) -> the single value."""
    return lambda sql, params=None: scalar(db, sql, params)
