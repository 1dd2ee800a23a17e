"""Hand-out against a peer: e2e-infra's allocate/release vs pytest-postgresql's janitor, each as
shipped and each like-for-like (the same clone strategy and the same connection reuse).

    python bench/db_peer.py [--rounds 15]

Starts its own embedded cluster in a temporary state folder (stopped and removed at the end), or
uses the server of E2E_ADMIN_DATABASE_URL; the template is the demo's, built once by the tool.

What each side does per hand-out (a clone of the template, then its drop), as shipped:

* **pytest-postgresql's ``DatabaseJanitor``** (10.0.0, ``janitor.py``; replayed here statement for
  statement, not imported: it is a pytest plugin this project does not install). ``init()``: a
  new TCP connection with the password, ``pg_terminate_backend`` of the template's sessions,
  ``CREATE DATABASE x TEMPLATE t`` with no ``STRATEGY``, which on PostgreSQL 15+ means
  ``WAL_LOG``; close. ``drop()``: a new connection, an existence check, ``ALLOW_CONNECTIONS
  false``, ``pg_terminate_backend``, ``DROP DATABASE IF EXISTS``; close. Two connections per
  hand-out. No warm spare: every hand-out is a copy.
* **e2e-infra** (``DatabaseAllocator``): one admin connection kept by the allocator (the unix
  socket of the embedded cluster), ``STRATEGY FILE_COPY`` when the server runs with ``fsync =
  off`` (``clone_strategy = "auto"``; ``WAL_LOG`` otherwise), plus a lease in its registry, a
  marker comment, a login role per database and its grants; release drops it ``WITH (FORCE)`` and
  its role. With ``spares = 1`` a warm spare is cloned in a background thread *after each
  release*, and the next allocation takes it by ``ALTER DATABASE ... RENAME``.

Like-for-like rows change one side to the other's choices: the janitor's statements with
FILE_COPY over one reused unix-socket connection (the tool's choices), and the tool with
``clone_strategy = "wal_log"`` and its admin connection closed after each hand-out (so a new TCP
connection with the password per hand-out, used for the clone and the drop; the janitor opens
one for each). Connections
opened per hand-out are counted by the server (``pg_stat_database.sessions``). Medians and p99
(nearest rank) in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import database_server, load_averages  # noqa: E402

from e2e_infra.config import Config, load_config  # noqa: E402
from e2e_infra.conninfo import ConnInfo  # noqa: E402
from e2e_infra.databases import DatabaseAllocator  # noqa: E402
from e2e_infra.resources.leases import Owner, Registry  # noqa: E402

SEED = "default"


class Janitor:
    """pytest-postgresql 10.0.0's ``DatabaseJanitor.init()`` / ``drop()``, statement for
    statement. ``strategy`` and ``reuse`` turn it into the like-for-like variant."""

    def __init__(self, info: ConnInfo, template: str, *, strategy: str | None, reuse: bool):
        self.info = info
        self.template = template
        self.strategy = strategy
        self.conn = psycopg.connect(info.conninfo(), autocommit=True) if reuse else None

    @contextlib.contextmanager
    def cursor(self) -> Iterator[psycopg.Connection[object]]:
        if self.conn is not None:
            yield self.conn
            return
        conn = psycopg.connect(self.info.conninfo(), autocommit=True)
        try:
            yield conn
        finally:
            conn.close()

    def init(self, name: str) -> None:
        with self.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.template,),
            )
            statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
            if self.strategy:
                statement += sql.SQL(f" STRATEGY {self.strategy}")
            cur.execute(statement)

    def drop(self, name: str) -> None:
        ident = sql.Identifier(name)
        with self.cursor() as cur:
            if cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                cur.execute(sql.SQL("ALTER DATABASE {} WITH allow_connections false").format(ident))
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclasses.dataclass
class Row:
    side: str
    variant: str
    strategy: str
    connections: str
    spare: str
    handout: list[float]
    release: list[float]
    sessions: float  # connections the server saw opened per hand-out (clone + drop)


def spares_on(conn: psycopg.Connection[object]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_database WHERE starts_with(datname, 'peer_spare_')"
    ).fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def sessions(conn: psycopg.Connection[object]) -> int:
    row = conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
    return int(row[0] or 0) if row else 0  # type: ignore[call-overload]


def measure(
    rounds: int,
    conn: psycopg.Connection[object],
    handout: Callable[[int], str],
    release: Callable[[str], None],
) -> tuple[list[float], list[float], float]:
    name = handout(-1)  # warm-up: the first clone pays for cold caches
    release(name)
    before = sessions(conn)
    got, gone = [], []
    for i in range(rounds):
        started = time.perf_counter()
        name = handout(i)
        got.append(time.perf_counter() - started)
        started = time.perf_counter()
        release(name)
        gone.append(time.perf_counter() - started)
    time.sleep(0.6)  # pg_stat_database is updated by backends as they exit, every ~0.5 s
    return got, gone, (sessions(conn) - before) / rounds


def ms(samples: list[float], q: float) -> float:
    if q == 0.5:
        return statistics.median(samples) * 1000
    ordered = sorted(samples)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)] * 1000


def run(config: Config, admin: ConnInfo, client: ConnInfo, where: str, rounds: int) -> int:
    registry = Registry(config.state_dir, host=config.host_id)
    owner = Owner.current()
    base = DatabaseAllocator(config, registry, admin, client=client)
    template = base.ensure_template(SEED)
    conn = psycopg.connect(admin.conninfo(application_name="e2e-infra bench"), autocommit=True)
    fsync = str(conn.execute("SHOW fsync").fetchone()[0])  # type: ignore[index]
    major = conn.info.server_version // 10000
    shipped = base.catalog.strategy(fsync, major) or "default"
    rows: list[Row] = []

    def janitor(variant: str, strategy: str | None, reuse: bool, info: ConnInfo) -> None:
        jan = Janitor(info, template, strategy=strategy, reuse=reuse)

        def handout(i: int) -> str:
            jan.init(f"peer_jan_{i + 1}")
            return f"peer_jan_{i + 1}"

        try:
            got, gone, opened = measure(rounds, conn, handout, jan.drop)
        finally:
            jan.close()
        via = "one reused" if reuse else "a new one per call"
        where = "unix socket" if info.host.startswith("/") else "TCP + password"
        rows.append(
            Row(
                "janitor",
                variant,
                strategy or "WAL_LOG (server default)",
                f"{via} ({where})",
                "none",
                got,
                gone,
                opened,
            )
        )

    def tool(variant: str, strategy: str, fresh: bool, spares: int, via: ConnInfo) -> None:
        cfg = dataclasses.replace(
            config,
            database=dataclasses.replace(config.database, clone_strategy=strategy, spares=spares),
        )
        kept = DatabaseAllocator(cfg, registry, via, client=client)
        hits: list[int] = []

        def handout(_i: int) -> str:
            before = spares_on(conn)
            name = kept.allocate("peer", owner, seed=SEED).name
            hits.append(before - spares_on(conn))
            return name

        def timed_release(name: str) -> None:
            started = time.perf_counter()
            kept.release(name=name)
            spent = time.perf_counter() - started
            if spares:  # the spare is made after the release: joined outside the timing
                kept.spares.join(cfg.database.clone_timeout)
            if fresh:  # the next hand-out connects again, as the janitor does
                kept.connections.close(cfg.database.clone_timeout)
            releases.append(spent)

        releases: list[float] = []
        if spares:
            kept.prepare_spares(template)
            kept.spares.join(cfg.database.clone_timeout)
        got, _gone, opened = measure(rounds, conn, handout, timed_release)
        kept.release_all()
        kept.close()
        spare = (
            f"after each release, in a background thread ({sum(hits[1:])} of {rounds} took one)"
            if spares
            else "none (spares = 0)"
        )
        conns = "a new one per hand-out" if fresh else "one reused (allocator's)"
        where = "unix socket" if via.host.startswith("/") else "TCP + password"
        rows.append(
            Row(
                "e2e-infra",
                variant,
                (shipped if strategy == "auto" else strategy.upper()),
                f"{conns} ({where})",
                spare,
                got,
                releases[1:],  # the warm-up's release is not a round
                opened,
            )
        )

    janitor("as shipped", None, False, client)
    janitor("like-for-like: FILE_COPY, reused", "FILE_COPY", True, admin)
    tool("as shipped (spares = 0)", "auto", False, 0, admin)
    tool("as shipped (spares = 1)", "auto", False, 1, admin)
    tool("like-for-like: WAL_LOG, new connection", "wal_log", True, 0, client)
    base.cleanup()
    base.close()
    conn.close()

    print(f"hand-out vs pytest-postgresql's janitor -- {where}; load {load_averages()}")
    print(f"PostgreSQL {major}, fsync={fsync}; template {template}; {rounds} rounds each\n")
    header = (
        f"{'side':<10} {'variant':<40} {'strategy':<26} {'conn/hand-out':>13} "
        f"{'clone p50':>9} {'p99':>7} {'drop p50':>8}  connections; warm spare"
    )
    print(header)
    for row in rows:
        print(
            f"{row.side:<10} {row.variant:<40} {row.strategy:<26} {row.sessions:>13.1f} "
            f"{ms(row.handout, 0.5):>9.1f} {ms(row.handout, 0.99):>7.1f} "
            f"{ms(row.release, 0.5):>8.1f}  {row.connections}; {row.spare}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        base_config = load_config(REPO / "pyproject.toml")
        config = dataclasses.replace(
            base_config,
            state_dir=Path(tmp) / "state",
            results_dir=Path(tmp) / "results",
            database=dataclasses.replace(
                base_config.database, name_base="peer", keep_templates=1, spares=0
            ),
        )
        with database_server(config) as (admin, client, where):
            return run(config, admin, client, where, args.rounds)


if __name__ == "__main__":
    os.environ.setdefault("E2E_PORT_RANGE", "15520-15529")
    sys.exit(main())
