"""Demo MES (manufacturing execution system) backend: a small JSON API over HTTP.

Standard library plus psycopg 3 only.

Configuration (environment):
  PORT          port to listen on (required unless a socket is handed over; `--port N` wins)
  DATABASE_URL  libpq URL or conninfo of the PostgreSQL database (required)
  HOST          bind address (default 127.0.0.1)

Socket hand-over (race-free port allocation): `--fd N`, or LISTEN_FDS=1 with
LISTEN_PID equal to this process id (systemd convention, fd 3), makes the server
use that already-bound listening socket instead of binding PORT itself.

Endpoints (all JSON):
  GET  /health                        200 {"status": "ok"} once `SELECT 1` works, else 503
  POST /api/login                     {username, password} -> {token, user}
  POST /api/logout                    revokes the bearer token
  GET  /api/me                        the authenticated user
  GET  /api/products
  GET  /api/work-orders               ?status=&product_id=&limit=&offset=
  POST /api/work-orders               {product_id | sku, quantity, priority?, due_date?, notes?}
  GET  /api/work-orders/<id>
  POST /api/work-orders/<id>/status   {status}
  GET  /api/inventory                 ?sku=&location=&low_stock=true&limit=&offset=
  GET  /api/inventory/<id>
  GET  /api/inventory/<id>/movements
  POST /api/inventory/<id>/adjust     {delta, reason?, note?}  (409 if stock would go negative)
  GET  /api/quality-checks            ?work_order_id=&result=&limit=&offset=
  POST /api/quality-checks            {work_order_id, result, measured_value?, notes?, defects?}
  GET  /api/stats

Every /api route except /api/login needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import hashlib
import json
import os
import re
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg.rows import dict_row

APPLICATION_NAME = "demo-backend"
MAX_BODY_BYTES = 1 << 20
SESSION_TTL = dt.timedelta(hours=8)
WORK_ORDER_STATUSES = ("planned", "released", "in_progress", "on_hold", "completed", "cancelled")
# Allowed work order status transitions.
TRANSITIONS: dict[str, frozenset[str]] = {
    "planned": frozenset({"released", "cancelled"}),
    "released": frozenset({"in_progress", "on_hold", "cancelled"}),
    "in_progress": frozenset({"on_hold", "completed"}),
    "on_hold": frozenset({"released", "in_progress", "cancelled"}),
    "completed": frozenset(),
    "cancelled": frozenset(),
}
ADJUST_REASONS = ("adjustment", "receipt", "issue", "scrap")
QUALITY_ROLES = frozenset({"inspector", "admin"})

_log_lock = threading.Lock()


def log(line: str) -> None:
    """One line to stdout, never interleaved between threads."""
    with _log_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(404, "not_found", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


# --------------------------------------------------------------------------- database


class ConnectionPool:
    """A tiny thread-safe pool: idle connections are reused, broken ones dropped.

    An idle connection the server ended meanwhile (a restart, ``pg_terminate_backend``: what
    ``invoke e2e.reset`` does before it swaps the database) is dropped when it is taken, not
    handed out: the next request gets a new connection instead of an error.
    """

    def __init__(self, conninfo: str, max_idle: int = 4) -> None:
        self._conninfo = conninfo
        self._max_idle = max_idle
        self._idle: list[psycopg.Connection[dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            row_factory=dict_row,
            application_name=APPLICATION_NAME,
            connect_timeout=3,
        )

    def _take_idle(self) -> psycopg.Connection[dict[str, Any]] | None:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or _still_open(conn):
                return conn
            conn.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        conn = self._take_idle()
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            conn.close()  # state unknown: never reuse
            raise
        reusable = (
            not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )
        with self._lock:
            if reusable and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _still_open(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection is still usable: the server has said nothing on it. One it
    ended has something to read (the termination notice, then end of file); a zero-timeout
    poll sees that without a round trip."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


def describe_database(url: str) -> str:
    """host:port/dbname of a conninfo, without user or password (safe to log)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable DATABASE_URL>"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or '?'}"


# --------------------------------------------------------------------------- JSON helpers


def to_json(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, default=to_json, separators=(",", ":")).encode()


def require_str(body: dict[str, Any], key: str, *, max_len: int = 200) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"'{key}' must be a non-empty string")
    if len(value) > max_len:
        raise bad_request(f"'{key}' is too long")
    return value


def optional_str(body: dict[str, Any], key: str, default: str = "", max_len: int = 2000) -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > max_len:
        raise bad_request(f"'{key}' must be a string of at most {max_len} characters")
    return value


def require_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer")
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise bad_request(f"'{name}' must be <= {maximum}")
    return value


def query_int(query: dict[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"query parameter '{name}' must be an integer") from None
    if not minimum <= value <= maximum:
        raise bad_request(f"query parameter '{name}' must be between {minimum} and {maximum}")
    return value


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------- request handling

Conn = psycopg.Connection[dict[str, Any]]


class Request:
    def __init__(self, handler: Handler, method: str, path: str, query: dict[str, str]) -> None:
        self.handler = handler
        self.method = method
        self.path = path
        self.query = query
        self._body: dict[str, Any] | None = None
        self.user: dict[str, Any] | None = None
        self.token_hash: str | None = None

    def json(self) -> dict[str, Any]:
        if self._body is None:
            self._body = self.handler.read_json()
        return self._body

    @property
    def bearer(self) -> str | None:
        header = self.handler.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()


Route = tuple[str, re.Pattern[str], Callable[..., tuple[int, Any]], bool]
ROUTES: list[Route] = []


def route(method: str, pattern: str, *, auth: bool = True) -> Callable[..., Any]:
    def register(func: Callable[..., tuple[int, Any]]) -> Callable[..., tuple[int, Any]]:
        ROUTES.append((method, re.compile(f"^{pattern}$"), func, auth))
        return func

    return register


def authenticate(conn: Conn, req: Request) -> None:
    token = req.bearer
    if token is None:
        raise ApiError(401, "unauthorized", "missing bearer token")
    token_hash = hash_token(token)
    row = conn.execute(
        """
        SELECT u.id, u.username, u.full_name, u.email,
               coalesce(array_agg(r.code ORDER BY r.code) FILTER (WHERE r.code IS NOT NULL),
                        '{}') AS roles
        FROM sessions s
        JOIN users u ON u.id = s.user_id
        LEFT JOIN user_roles ur ON ur.user_id = u.id
        LEFT JOIN roles r ON r.id = ur.role_id
        WHERE s.token_hash = %s AND s.revoked_at IS NULL AND s.expires_at > now() AND u.active
        GROUP BY u.id
        """,
        (token_hash,),
    ).fetchone()
    if row is None:
        raise ApiError(401, "unauthorized", "invalid or expired token")
    req.user = row
    req.token_hash = token_hash


def audit(conn: Conn, req: Request, action: str, entity: str, entity_id: int, details: Any) -> None:
    conn.execute(
        "INSERT INTO audit_log (user_id, action, entity, entity_id, details)"
        " VALUES (%s, %s, %s, %s, %s::jsonb)",
        (req.user["id"] if req.user else None, action, entity, entity_id, dumps(details).decode()),
    )


# --------------------------------------------------------------------------- routes: auth


@route("GET", "/health", auth=False)
def health(conn: Conn, req: Request) -> tuple[int, Any]:
    conn.execute("SELECT 1").fetchone()
    return 200, {"status": "ok"}


@route("POST", "/api/login", auth=False)
def login(conn: Conn, req: Request) -> tuple[int, Any]:
    body = req.json()
    username = require_str(body, "username")
    password = require_str(body, "password", max_len=1000)
    with conn.transaction():
        user = conn.execute(
            """
            SELECT id, username, full_name FROM users
            WHERE username = %s AND active
              AND password_hash = encode(sha256(convert_to(password_salt || %s, 'UTF8')), 'hex')
            """,
            (username, password),
        ).fetchone()
        if user is None:
            raise ApiError(401, "invalid_credentials", "invalid username or password")
        token = secrets.token_urlsafe(32)
        conn.execute(
            "INSERT INTO sessions (user_id, token_hash, expires_at, user_agent)"
            " VALUES (%s, %s, now() + %s, %s)",
            (
                user["id"],
                hash_token(token),
                SESSION_TTL,
                (req.handler.headers.get("User-Agent") or "")[:200],
            ),
        )
        conn.execute("UPDATE users SET last_login_at = now() WHERE id = %s", (user["id"],))
    return 200, {"token": token, "token_type": "Bearer", "user": user}


@route("POST", "/api/logout")
def logout(conn: Conn, req: Request) -> tuple[int, Any]:
    conn.execute(
        "UPDATE sessions SET revoked_at = now() WHERE token_hash = %s AND revoked_at IS NULL",
        (req.token_hash,),
    )
    return 200, {"status": "logged_out"}


@route("GET", "/api/me")
def me(conn: Conn, req: Request) -> tuple[int, Any]:
    return 200, req.user


# --------------------------------------------------------------------------- routes: products


@route("GET", "/api/products")
def list_products(conn: Conn, req: Request) -> tuple[int, Any]:
    rows = conn.execute(
        "SELECT id, sku, name, kind, uom, active FROM products ORDER BY sku"
    ).fetchall()
    return 200, {"items": rows, "total": len(rows)}


# --------------------------------------------------------------------------- routes: work orders

WORK_ORDER_SELECT = """
    SELECT w.id, w.number, w.product_id, p.sku, p.name AS product_name, w.quantity,
           w.quantity_done, w.status, w.priority, w.due_date, w.notes, w.work_center_id,
           w.created_at, w.updated_at
    FROM work_orders w JOIN products p ON p.id = w.product_id
"""


def get_work_order(conn: Conn, work_order_id: int) -> dict[str, Any]:
    row = conn.execute(WORK_ORDER_SELECT + " WHERE w.id = %s", (work_order_id,)).fetchone()
    if row is None:
        raise not_found(f"work order {work_order_id} not found")
    return row


def page(query: dict[str, str]) -> tuple[int, int]:
    return query_int(query, "limit", 50, 1, 500), query_int(query, "offset", 0, 0, 10**9)


@route("GET", "/api/work-orders")
def list_work_orders(conn: Conn, req: Request) -> tuple[int, Any]:
    limit, offset = page(req.query)
    where, params = [], []
    status = req.query.get("status")
    if status is not None:
        if status not in WORK_ORDER_STATUSES:
            raise bad_request(f"unknown status {status!r}")
        where.append("w.status = %s")
        params.append(status)
    if "product_id" in req.query:
        where.append("w.product_id = %s")
        params.append(query_int(req.query, "product_id", 0, 1, 2**62))
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute("SELECT count(*) AS n FROM work_orders w" + clause, params).fetchone()
    rows = conn.execute(
        WORK_ORDER_SELECT + clause + " ORDER BY w.id LIMIT %s OFFSET %s", [*params, limit, offset]
    ).fetchall()
    return 200, {
        "items": rows,
        "total": total["n"] if total else 0,
        "limit": limit,
        "offset": offset,
    }


@route("GET", r"/api/work-orders/(\d+)")
def show_work_order(conn: Conn, req: Request, work_order_id: str) -> tuple[int, Any]:
    wo = get_work_order(conn, int(work_order_id))
    wo["steps"] = conn.execute(
        "SELECT step_no, status, machine_id, started_at, finished_at FROM work_order_steps"
        " WHERE work_order_id = %s ORDER BY step_no",
        (wo["id"],),
    ).fetchall()
    return 200, wo


@route("POST", "/api/work-orders")
def create_work_order(conn: Conn, req: Request) -> tuple[int, Any]:
    body = req.json()
    quantity = require_int(body.get("quantity"), "quantity", minimum=1, maximum=1_000_000)
    priority = require_int(body.get("priority", 3), "priority", minimum=1, maximum=5)
    notes = optional_str(body, "notes")
    due_date = None
    if body.get("due_date") is not None:
        try:
            due_date = dt.date.fromisoformat(require_str(body, "due_date", max_len=10))
        except ValueError:
            raise bad_request("'due_date' must be an ISO date (YYYY-MM-DD)") from None
    if body.get("product_id") is not None:
        product = conn.execute(
            "SELECT id FROM products WHERE id = %s",
            (require_int(body["product_id"], "product_id", minimum=1),),
        ).fetchone()
    elif body.get("sku") is not None:
        product = conn.execute(
            "SELECT id FROM products WHERE sku = %s", (require_str(body, "sku"),)
        ).fetchone()
    else:
        raise bad_request("'product_id' or 'sku' is required")
    if product is None:
        raise not_found("product not found")
    with conn.transaction():
        routing = conn.execute(
            "SELECT id FROM routings WHERE product_id = %s AND active"
            " ORDER BY version DESC LIMIT 1",
            (product["id"],),
        ).fetchone()
        routing_id = routing["id"] if routing else None
        first_step = conn.execute(
            "SELECT work_center_id FROM routing_steps WHERE routing_id = %s"
            " ORDER BY step_no LIMIT 1",
            (routing_id,),
        ).fetchone()
        row = conn.execute(
            """
            INSERT INTO work_orders (product_id, routing_id, work_center_id, quantity, priority,
                                     due_date, notes, created_by)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (
                product["id"],
                routing_id,
                first_step["work_center_id"] if first_step else None,
                quantity,
                priority,
                due_date,
                notes,
                req.user["id"] if req.user else None,
            ),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO work_order_steps (work_order_id, step_no, routing_step_id)"
            " SELECT %s, step_no, id FROM routing_steps WHERE routing_id = %s",
            (row["id"], routing_id),
        )
        conn.execute(
            "INSERT INTO work_order_status_history (work_order_id, from_status, to_status,"
            " changed_by) VALUES (%s, NULL, 'planned', %s)",
            (row["id"], req.user["id"] if req.user else None),
        )
        audit(conn, req, "create", "work_order", row["id"], {"quantity": quantity})
        wo = get_work_order(conn, row["id"])
    return 201, wo


@route("POST", r"/api/work-orders/(\d+)/status")
def change_work_order_status(conn: Conn, req: Request, work_order_id: str) -> tuple[int, Any]:
    body = req.json()
    new_status = require_str(body, "status")
    if new_status not in WORK_ORDER_STATUSES:
        raise bad_request(f"unknown status {new_status!r}; expected one of {WORK_ORDER_STATUSES}")
    with conn.transaction():
        current = conn.execute(
            "SELECT status FROM work_orders WHERE id = %s FOR UPDATE", (int(work_order_id),)
        ).fetchone()
        if current is None:
            raise not_found(f"work order {work_order_id} not found")
        old_status = current["status"]
        if new_status not in TRANSITIONS[old_status]:
            allowed = sorted(TRANSITIONS[old_status])
            raise conflict(
                f"cannot change status from {old_status} to {new_status}"
                f" (allowed: {', '.join(allowed) or 'none'})"
            )
        conn.execute(
            """
            UPDATE work_orders
            SET status = %s, updated_at = now(),
                quantity_done = CASE WHEN %s = 'completed' THEN quantity ELSE quantity_done END
            WHERE id = %s
            """,
            (new_status, new_status, int(work_order_id)),
        )
        conn.execute(
            "INSERT INTO work_order_status_history (work_order_id, from_status, to_status,"
            " changed_by) VALUES (%s, %s, %s, %s)",
            (int(work_order_id), old_status, new_status, req.user["id"] if req.user else None),
        )
        audit(
            conn,
            req,
            "status_change",
            "work_order",
            int(work_order_id),
            {"from": old_status, "to": new_status},
        )
        wo = get_work_order(conn, int(work_order_id))
    return 200, wo


# --------------------------------------------------------------------------- routes: inventory

INVENTORY_SELECT = """
    SELECT i.id, i.product_id, p.sku, p.name AS product_name, p.uom, l.code AS location,
           i.quantity, i.reorder_point, (i.quantity < i.reorder_point) AS low_stock, i.updated_at
    FROM inventory_items i
    JOIN products p ON p.id = i.product_id
    JOIN inventory_locations l ON l.id = i.location_id
"""


def get_inventory_item(conn: Conn, item_id: int) -> dict[str, Any]:
    row = conn.execute(INVENTORY_SELECT + " WHERE i.id = %s", (item_id,)).fetchone()
    if row is None:
        raise not_found(f"inventory item {item_id} not found")
    return row


@route("GET", "/api/inventory")
def list_inventory(conn: Conn, req: Request) -> tuple[int, Any]:
    limit, offset = page(req.query)
    where, params = [], []
    if "sku" in req.query:
        where.append("p.sku = %s")
        params.append(req.query["sku"])
    if "location" in req.query:
        where.append("l.code = %s")
        params.append(req.query["location"])
    low = req.query.get("low_stock")
    if low is not None:
        if low not in ("true", "false"):
            raise bad_request("query parameter 'low_stock' must be true or false")
        where.append("(i.quantity < i.reorder_point) = %s")
        params.append(low == "true")
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute(
        "SELECT count(*) AS n FROM inventory_items i JOIN products p ON p.id = i.product_id"
        " JOIN inventory_locations l ON l.id = i.location_id" + clause,
        params,
    ).fetchone()
    rows = conn.execute(
        INVENTORY_SELECT + clause + " ORDER BY i.id LIMIT %s OFFSET %s", [*params, limit, offset]
    ).fetchall()
    return 200, {
        "items": rows,
        "total": total["n"] if total else 0,
        "limit": limit,
        "offset": offset,
    }


@route("GET", r"/api/inventory/(\d+)")
def show_inventory_item(conn: Conn, req: Request, item_id: str) -> tuple[int, Any]:
    return 200, get_inventory_item(conn, int(item_id))


@route("GET", r"/api/inventory/(\d+)/movements")
def list_movements(conn: Conn, req: Request, item_id: str) -> tuple[int, Any]:
    get_inventory_item(conn, int(item_id))
    rows = conn.execute(
        "SELECT id, delta, reason, note, lot_id, work_order_id, user_id, created_at"
        " FROM stock_movements WHERE inventory_item_id = %s ORDER BY id",
        (int(item_id),),
    ).fetchall()
    return 200, {"items": rows, "total": len(rows)}


@route("POST", r"/api/inventory/(\d+)/adjust")
def adjust_stock(conn: Conn, req: Request, item_id: str) -> tuple[int, Any]:
    body = req.json()
    raw = body.get("delta")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise bad_request("'delta' must be a number")
    delta = decimal.Decimal(str(raw))
    if delta == 0 or abs(delta) >= 10**9 or delta != round(delta, 3):
        raise bad_request("'delta' must be non-zero, below 1e9, with at most 3 decimals")
    reason = optional_str(body, "reason", "adjustment")
    if reason not in ADJUST_REASONS:
        raise bad_request(f"'reason' must be one of {ADJUST_REASONS}")
    note = optional_str(body, "note")
    with conn.transaction():
        # The row lock taken by UPDATE serialises concurrent adjustments of one item.
        updated = conn.execute(
            "UPDATE inventory_items SET quantity = quantity + %s, updated_at = now()"
            " WHERE id = %s AND quantity + %s >= 0 RETURNING id",
            (delta, int(item_id), delta),
        ).fetchone()
        if updated is None:
            item = get_inventory_item(conn, int(item_id))  # 404 if it does not exist
            raise conflict(
                f"insufficient stock: {to_json(item['quantity'])} on hand,"
                f" adjustment {to_json(delta)} would go negative"
            )
        movement = conn.execute(
            "INSERT INTO stock_movements (inventory_item_id, delta, reason, note, user_id)"
            " VALUES (%s, %s, %s, %s, %s)"
            " RETURNING id, delta, reason, note, created_at",
            (int(item_id), delta, reason, note, req.user["id"] if req.user else None),
        ).fetchone()
        item = get_inventory_item(conn, int(item_id))
    return 200, {"item": item, "movement": movement}


# --------------------------------------------------------------------------- routes: quality


@route("GET", "/api/quality-checks")
def list_quality_checks(conn: Conn, req: Request) -> tuple[int, Any]:
    limit, offset = page(req.query)
    where, params = [], []
    if "work_order_id" in req.query:
        where.append("q.work_order_id = %s")
        params.append(query_int(req.query, "work_order_id", 0, 1, 2**62))
    result = req.query.get("result")
    if result is not None:
        if result not in ("pass", "fail"):
            raise bad_request("query parameter 'result' must be pass or fail")
        where.append("q.result = %s")
        params.append(result)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute("SELECT count(*) AS n FROM quality_checks q" + clause, params).fetchone()
    rows = conn.execute(
        """
        SELECT q.id, q.work_order_id, w.number AS work_order_number, q.result, q.measured_value,
               q.notes, u.username AS inspector, q.checked_at,
               coalesce((SELECT json_agg(json_build_object('code', d.defect_code,
                                                           'quantity', d.quantity) ORDER BY d.id)
                         FROM defects d WHERE d.quality_check_id = q.id), '[]') AS defects
        FROM quality_checks q
        JOIN work_orders w ON w.id = q.work_order_id
        LEFT JOIN users u ON u.id = q.inspector_id
        """
        + clause
        + " ORDER BY q.id LIMIT %s OFFSET %s",
        [*params, limit, offset],
    ).fetchall()
    return 200, {
        "items": rows,
        "total": total["n"] if total else 0,
        "limit": limit,
        "offset": offset,
    }


@route("POST", "/api/quality-checks")
def record_quality_check(conn: Conn, req: Request) -> tuple[int, Any]:
    roles = set(req.user["roles"]) if req.user else set()
    if not roles & QUALITY_ROLES:
        raise ApiError(403, "forbidden", "recording quality checks needs the inspector role")
    body = req.json()
    work_order_id = require_int(body.get("work_order_id"), "work_order_id", minimum=1)
    result = require_str(body, "result")
    if result not in ("pass", "fail"):
        raise bad_request("'result' must be 'pass' or 'fail'")
    measured = body.get("measured_value")
    if isinstance(measured, bool) or not isinstance(measured, int | float | None):
        raise bad_request("'measured_value' must be a number")
    notes = optional_str(body, "notes")
    defects = body.get("defects", [])
    if not isinstance(defects, list) or len(defects) > 50:
        raise bad_request("'defects' must be a list")
    parsed_defects = []
    for d in defects:
        if not isinstance(d, dict):
            raise bad_request("each defect must be an object {code, quantity}")
        parsed_defects.append(
            (
                require_str(d, "code", max_len=50),
                require_int(d.get("quantity", 1), "quantity", minimum=1),
            )
        )
    if parsed_defects and result == "pass":
        raise bad_request("a passed check cannot have defects")
    with conn.transaction():
        wo = conn.execute(
            "SELECT id, status, product_id FROM work_orders WHERE id = %s FOR SHARE",
            (work_order_id,),
        ).fetchone()
        if wo is None:
            raise not_found(f"work order {work_order_id} not found")
        if wo["status"] in ("planned", "cancelled"):
            raise conflict(f"work order {work_order_id} is {wo['status']}: nothing to inspect")
        if parsed_defects:
            codes = sorted({c for c, _ in parsed_defects})
            known = {
                r["code"]
                for r in conn.execute(
                    "SELECT code FROM defect_codes WHERE code = ANY(%s)", (codes,)
                ).fetchall()
            }
            unknown = [c for c in codes if c not in known]
            if unknown:
                raise bad_request(f"unknown defect code(s): {', '.join(unknown)}")
        check = conn.execute(
            """
            INSERT INTO quality_checks (work_order_id, plan_id, inspector_id, result,
                                        measured_value, notes)
            VALUES (%s, (SELECT id FROM quality_plans WHERE product_id = %s ORDER BY id LIMIT 1),
                    %s, %s, %s, %s)
            RETURNING id, work_order_id, result, measured_value, notes, checked_at
            """,
            (
                work_order_id,
                wo["product_id"],
                req.user["id"] if req.user else None,
                result,
                None if measured is None else decimal.Decimal(str(measured)),
                notes,
            ),
        ).fetchone()
        assert check is not None
        for code, quantity in parsed_defects:
            conn.execute(
                "INSERT INTO defects (quality_check_id, defect_code, quantity) VALUES (%s, %s, %s)",
                (check["id"], code, quantity),
            )
        audit(conn, req, "quality_check", "work_order", work_order_id, {"result": result})
    check["defects"] = [{"code": c, "quantity": q} for c, q in parsed_defects]
    check["inspector"] = req.user["username"] if req.user else None
    return 201, check


# --------------------------------------------------------------------------- routes: stats


@route("GET", "/api/stats")
def stats(conn: Conn, req: Request) -> tuple[int, Any]:
    by_status = {
        r["status"]: r["count"]
        for r in conn.execute("SELECT status, count FROM work_order_status_counts").fetchall()
    }
    row = conn.execute(
        """
        SELECT (SELECT count(*) FROM inventory_items) AS inventory_items,
               (SELECT count(*) FROM low_stock_items) AS low_stock_items,
               (SELECT count(*) FROM stock_movements) AS stock_movements,
               (SELECT count(*) FROM quality_checks) AS quality_checks,
               (SELECT count(*) FROM quality_checks WHERE result = 'pass') AS quality_pass,
               (SELECT count(*) FROM quality_checks WHERE result = 'fail') AS quality_fail,
               (SELECT count(*) FROM defects) AS defects,
               (SELECT count(*) FROM machines) AS machines,
               (SELECT count(*) FROM machines WHERE status = 'down') AS machines_down,
               (SELECT count(*) FROM downtime_events WHERE ended_at IS NULL) AS open_downtime,
               (SELECT count(*) FROM products) AS products,
               (SELECT count(*) FROM users WHERE active) AS users
        """
    ).fetchone()
    assert row is not None
    return 200, {
        "work_orders": {"total": sum(by_status.values()), "by_status": by_status},
        "inventory": {
            "items": row["inventory_items"],
            "low_stock": row["low_stock_items"],
            "movements": row["stock_movements"],
        },
        "quality": {
            "checks": row["quality_checks"],
            "pass": row["quality_pass"],
            "fail": row["quality_fail"],
            "defects": row["defects"],
        },
        "machines": {
            "total": row["machines"],
            "down": row["machines_down"],
            "open_downtime_events": row["open_downtime"],
        },
        "products": row["products"],
        "users": row["users"],
    }


# --------------------------------------------------------------------------- HTTP plumbing


class Handler(BaseHTTPRequestHandler):
    server_version = "demo-backend/1.0"
    server: Server

    def handle_one_request(self) -> None:
        self._started = time.monotonic()
        super().handle_one_request()

    # One log line per request, on stdout (the default goes to stderr).
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        elapsed = (time.monotonic() - getattr(self, "_started", time.monotonic())) * 1000
        code_value = code.value if isinstance(code, HTTPStatus) else code
        log(f'{self.address_string()} "{self.command} {self.path}" {code_value} {elapsed:.1f}ms')

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.address_string()} {format % args}")

    def read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise bad_request("invalid Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", "request body too large")
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            raise bad_request("a JSON object body is required")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("the JSON body must be an object")
        return body

    def send_json(self, status: int, payload: Any) -> None:
        data = dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_cors_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_cors_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")

    def dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        req = Request(self, method, parts.path, query)
        path_matched = False
        for route_method, pattern, func, needs_auth in ROUTES:
            match = pattern.match(parts.path)
            if match is None:
                continue
            path_matched = True
            if route_method != method:
                continue
            try:
                status, payload = self.run(func, req, needs_auth, match.groups())
            except ApiError as exc:
                status, payload = exc.status, {"error": exc.code, "message": exc.message}
            self.send_json(status, payload)
            return
        if path_matched:
            self.send_json(
                405,
                {
                    "error": "method_not_allowed",
                    "message": f"{method} is not allowed on {parts.path}",
                },
            )
        else:
            self.send_json(404, {"error": "not_found", "message": f"no route for {parts.path}"})

    def run(
        self,
        func: Callable[..., tuple[int, Any]],
        req: Request,
        needs_auth: bool,
        args: tuple[str | Any, ...],
    ) -> tuple[int, Any]:
        try:
            with self.server.pool.connection() as conn:
                # ApiError is handled inside the block: the connection stays reusable.
                try:
                    if needs_auth:
                        authenticate(conn, req)
                    return func(conn, req, *args)
                except ApiError as exc:
                    return exc.status, {"error": exc.code, "message": exc.message}
        except ApiError:
            raise
        except psycopg.OperationalError as exc:
            log(f"database unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
            raise ApiError(503, "database_unavailable", "database unavailable") from None
        except Exception:
            traceback.print_exc(file=sys.stderr)
            raise ApiError(500, "internal_error", "internal server error") from None

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_OPTIONS(self) -> None:  # CORS pre-flight from the frontend's origin
        self.send_response(204)
        self.send_cors_headers()
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], pool: ConnectionPool, sock: socket.socket | None = None
    ) -> None:
        self.pool = pool
        super().__init__(address, Handler, bind_and_activate=sock is None)
        if sock is not None:  # an already-bound socket handed over by the parent
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()[:2]
            self.server_name = str(self.server_address[0])
            self.server_port = int(self.server_address[1])
            sock.listen(self.request_queue_size)


# --------------------------------------------------------------------------- main


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
        raise SystemExit(f"demo-backend: fd {fd} is not a stream socket")
    return sock


_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s']+", re.I)
_PASSWORD = re.compile(r"\bpassword\s*=\s*(?:'[^']*'|[^\s'\"]+)", re.I)


class Parser(argparse.ArgumentParser):
    """argparse whose errors never echo a connection string: a command that passes the database
    URL as an argument (it belongs in DATABASE_URL) would otherwise write it into the log."""

    def error(self, message: str) -> NoReturn:
        message = _PASSWORD.sub("password=<hidden>", _URL.sub("<url hidden>", message))
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description="Demo MES backend (JSON API)")
    parser.add_argument("--port", type=int, help="port to listen on (default: $PORT)")
    parser.add_argument("--host", help="bind address (default: $HOST or 127.0.0.1)")
    parser.add_argument("--fd", type=int, help="use this already-bound listening socket")
    args = parser.parse_args(argv)

    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url:
        print("demo-backend: DATABASE_URL is required", file=sys.stderr)
        return 2
    sock = inherited_socket(args.fd)
    host = args.host or os.environ.get("HOST") or "127.0.0.1"
    port = args.port
    if port is None and os.environ.get("PORT"):
        try:
            port = int(os.environ["PORT"])
        except ValueError:
            print("demo-backend: PORT must be an integer", file=sys.stderr)
            return 2
    if sock is None and port is None:
        print("demo-backend: PORT (or --port, or --fd) is required", file=sys.stderr)
        return 2

    pool = ConnectionPool(database_url)
    try:
        server = Server((host, port or 0), pool, sock)
    except OSError as exc:
        print(f"demo-backend: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
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
        f"demo-backend listening on http://{bound_host}:{bound_port}"
        f" (database {describe_database(database_url)}, pid {os.getpid()})"
    )
    while not stop.wait(0.5):
        if not thread.is_alive():
            log("demo-backend: server loop died")
            return 1
    log("demo-backend: shutting down")
    server.shutdown()
    server.server_close()
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
