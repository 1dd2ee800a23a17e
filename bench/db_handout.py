"""How fast is handing out a database? Raw clone vs the tool's allocate (cold clone and warm
spare) vs migrate-and-seed.

    python bench/db_handout.py [--rounds 15] [--concurrent 8]

Starts its own embedded cluster in a temporary state folder (stopped and removed at the end), or
uses the server of E2E_ADMIN_DATABASE_URL. The schema and seed are the demo's (the repository's
``[tool.e2e_infra.database]``). Prints medians side by side, with the ratios the issue targets:
allocate at most 1.5x the raw clone, and at least 6x faster than migrate-and-seed; and, side by
side, allocation by cold clone vs from a warm spare (p50 and p99), the spare's p50 under 5 ms;
and the reset of a database in use (``invoke e2e.reset``: two pooled connections open on it,
ended, the database swapped under the same name) with a warm spare and with a new clone, the
spare's p50 under 50 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import database_server, load_averages  # noqa: E402

from e2e_infra.config import Config, load_config  # noqa: E402
from e2e_infra.conninfo import ConnInfo  # noqa: E402
from e2e_infra.databases import DatabaseAllocator  # noqa: E402
from e2e_infra.databases.migrations import migration_runner, seed_runner  # noqa: E402
from e2e_infra.resources.leases import Owner, Registry  # noqa: E402

SEED = "default"


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p99_ms(samples: list[float]) -> float:
    """Nearest-rank 99th percentile (the maximum below 100 samples)."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(0.99 * len(ordered)) - 1, 0)] * 1000


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        base_config = load_config(REPO / "pyproject.toml")
        config = dataclasses.replace(
            base_config,
            state_dir=Path(tmp) / "state",
            results_dir=Path(tmp) / "results",
            database=dataclasses.replace(
                base_config.database, name_base="bench", keep_templates=1, spares=0
            ),
        )
        with database_server(config) as (admin, client, where):
            return run(config, admin, client, where, args.rounds, args.concurrent)


def run(
    config: Config, admin: ConnInfo, client: ConnInfo, where: str, rounds: int, concurrent: int
) -> int:
    registry = Registry(config.state_dir, host=config.host_id)
    allocator = DatabaseAllocator(config, registry, admin, client=client)
    owner = Owner.current()
    started = time.perf_counter()
    template = allocator.ensure_template(SEED)
    build = time.perf_counter() - started
    conn = psycopg.connect(admin.conninfo(application_name="e2e-infra bench"), autocommit=True)
    fsync = str(conn.execute("SHOW fsync").fetchone()[0])  # type: ignore[index]
    strategy = allocator.catalog.strategy(fsync, conn.info.server_version // 10000) or "default"
    major = conn.info.server_version // 10000
    stats = conn.execute(
        sql.SQL("SELECT pg_database_size({})").format(sql.Literal(template))
    ).fetchone()
    size_mb = (stats[0] if stats else 0) / 1e6

    def drop(name: str) -> None:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    # Warm-up: the first clone pays for cold caches.
    conn.execute(
        sql.SQL("CREATE DATABASE bench_warm TEMPLATE {} STRATEGY {}").format(
            sql.Identifier(template), sql.SQL(strategy)
        )
    )
    drop("bench_warm")
    raw, alloc, release, fresh = [], [], [], []
    migrations, seeds = migration_runner(config), seed_runner(config, SEED)
    for i in range(rounds):
        name = f"bench_raw_{i}"
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY {}").format(
            sql.Identifier(name), sql.Identifier(template), sql.SQL(strategy)
        )
        raw.append(timed(lambda statement=statement: conn.execute(statement)))
        drop(name)

        holder: list[str] = []
        alloc.append(
            timed(lambda h=holder: h.append(allocator.allocate("bench", owner, seed=SEED).name))
        )
        release.append(timed(lambda h=holder: allocator.release(name=h[0])))

        scratch = f"bench_fresh_{i}"

        def migrate_and_seed(scratch: str = scratch) -> None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
            target = client.with_dbname(scratch)
            migrations.apply(target)
            seeds.apply(target)

        fresh.append(timed(migrate_and_seed))
        drop(scratch)

    # N at once (threads, each with its own allocator and registry handle) vs N one after another.
    def one(index: int, out: list[float], barrier: threading.Barrier) -> None:
        mine = DatabaseAllocator(
            config, Registry(config.state_dir, host=config.host_id), admin, client=client
        )
        barrier.wait(timeout=60)
        mine.allocate(f"conc{index}", owner, seed=SEED)
        out.append(time.perf_counter())

    barrier = threading.Barrier(concurrent + 1)
    ends: list[float] = []
    threads = [threading.Thread(target=one, args=(i, ends, barrier)) for i in range(concurrent)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=60)
    begin = time.perf_counter()
    for thread in threads:
        thread.join(timeout=120)
    parallel = max(ends) - begin if len(ends) == concurrent else float("nan")
    allocator.release_all()
    sequential = 0.0
    for i in range(concurrent):
        sequential += timed(lambda i=i: allocator.allocate(f"seq{i}", owner, seed=SEED))
    allocator.release_all()

    # Warm spares: after each release a spare is prepared in the background (joined here, outside
    # the timing); the next allocation is a rename of it.
    warm_config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, spares=1)
    )
    warm_allocator = DatabaseAllocator(warm_config, registry, admin, client=client)
    warm_allocator.prepare_spares(template)
    warm: list[float] = []
    spare_hits = 0
    # One long-lived allocator (its admin connection is reused): the per-call cost. Between
    # rounds only the spare thread is joined (close() would also close the connection).
    for _ in range(rounds):
        spares_before = _count_spares(conn)
        got: list[str] = []
        warm.append(timed(lambda g=got: g.append(warm_allocator.allocate("warm", owner).name)))
        spare_hits += spares_before - _count_spares(conn)
        warm_allocator.release(name=got[0])
        warm_allocator.spares.join(config.database.clone_timeout)
    warm_allocator.release_all()
    warm_allocator.close()
    # A new allocator per allocation, as a session makes one: the first call connects.
    fresh_warm: list[float] = []
    fresh_hits = 0
    for _ in range(rounds):
        spares_before = _count_spares(conn)
        session_allocator = DatabaseAllocator(warm_config, registry, admin, client=client)
        got = []
        fresh_warm.append(
            timed(lambda g=got, a=session_allocator: g.append(a.allocate("warm", owner).name))
        )
        fresh_hits += spares_before - _count_spares(conn)
        session_allocator.release(name=got[0])
        session_allocator.close()
    resets = reset_rounds(config, registry, admin, client, template, rounds)
    allocator.cleanup()  # spares = 0 here: the warm spare left over is dropped too
    conn.close()

    raw_ms, alloc_ms, rel_ms, fresh_ms = map(median_ms, (raw, alloc, release, fresh))
    print(f"e2e-infra database handout -- {where} (admin via {admin.host}); load {load_averages()}")
    print(
        f"PostgreSQL {major}, fsync={fsync}, clone strategy {strategy}; template {template} "
        f"({size_mb:.1f} MB, built once in {build * 1000:.0f} ms); medians of {rounds} rounds\n"
    )
    rows = [
        ("raw CREATE DATABASE ... TEMPLATE", raw_ms, "1.00x raw"),
        ("e2e-infra allocate", alloc_ms, f"{alloc_ms / raw_ms:.2f}x raw (target <= 1.5x)"),
        ("e2e-infra release", rel_ms, ""),
        (
            "create + migrate + seed",
            fresh_ms,
            f"{fresh_ms / alloc_ms:.1f}x allocate (target >= 6x)",
        ),
        (f"{concurrent} allocations at once (wall)", parallel * 1000, ""),
        (
            f"{concurrent} allocations one by one",
            sequential * 1000,
            f"{sequential / parallel:.1f}x the concurrent wall time",
        ),
    ]
    width = max(len(label) for label, _, _ in rows)
    print(f"{'operation'.ljust(width)}  {'ms':>8}  ratio")
    for label, ms, ratio in rows:
        print(f"{label.ljust(width)}  {ms:8.1f}  {ratio}")
    warm_ms, warm99, cold99 = median_ms(warm), p99_ms(warm), p99_ms(alloc)
    print(
        f"\nallocation, side by side ({rounds} rounds each; {spare_hits} of the warm ones "
        "took a spare)"
    )
    print(f"{'allocate by'.ljust(width)}  {'p50 ms':>8}  {'p99 ms':>8}")
    print(f"{'cold clone'.ljust(width)}  {alloc_ms:8.1f}  {cold99:8.1f}")
    print(f"{'warm spare (rename)'.ljust(width)}  {warm_ms:8.1f}  {warm99:8.1f}")
    print(
        f"{'warm spare, new allocator each'.ljust(width)}  {median_ms(fresh_warm):8.1f}  "
        f"{p99_ms(fresh_warm):8.1f}  ({fresh_hits} of {rounds} took a spare; as a session: "
        "one connect included)"
    )
    print(
        f"{'ratio cold / warm'.ljust(width)}  {alloc_ms / warm_ms:7.1f}x  {cold99 / warm99:7.1f}x"
        "  (target: warm p50 < 5 ms)"
    )
    warm_reset, cold_reset, swap_warm, swap_cold = resets
    print(
        f"\nreset of a database in use (2 pooled connections ended each time; {rounds} rounds "
        "each; whole call, and in brackets the swap: from ending the sessions to handing back)"
    )
    print(f"{'reset by'.ljust(width)}  {'p50 ms':>8}  {'p99 ms':>8}  {'swap p50':>9}")
    for label, samples, swap in (
        ("warm spare", warm_reset, swap_warm),
        ("new clone", cold_reset, swap_cold),
    ):
        print(
            f"{label.ljust(width)}  {median_ms(samples):8.1f}  {p99_ms(samples):8.1f}  "
            f"({median_ms(swap):6.1f})"
        )
    print(
        f"{'ratio clone / spare'.ljust(width)}  "
        f"{median_ms(cold_reset) / median_ms(warm_reset):7.1f}x  (target: spare p50 < 50 ms; "
        f"cold clone allocate p50 here {alloc_ms:.1f} ms)"
    )
    ok = (
        alloc_ms <= 1.5 * raw_ms
        and fresh_ms >= 6 * alloc_ms
        and warm_ms < 5.0
        and spare_hits == rounds
        and median_ms(warm_reset) < 50.0
    )
    print(f"\ntargets {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


def reset_rounds(
    config: Config,
    registry: Registry,
    admin: ConnInfo,
    client: ConnInfo,
    template: str,
    rounds: int,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """``rounds`` resets with a warm spare and as many with a new clone, alternating, of one
    database on which a server's pool holds two connections; wall times of the whole call, then
    of the swap alone (each list in the order warm, clone)."""
    allocator = DatabaseAllocator(config, registry, admin, client=client)
    held = allocator.allocate("reset", Owner.current(), seed=SEED)
    warm: list[float] = []
    cold: list[float] = []
    swap_warm: list[float] = []
    swap_cold: list[float] = []
    try:
        for _ in range(rounds):
            for with_spare, out, swap in ((True, warm, swap_warm), (False, cold, swap_cold)):
                if with_spare:  # config spares = 0: one made here, off the clock
                    allocator.spares.prepare(template, cap=1)
                pool = [psycopg.connect(held.url.conninfo(), autocommit=True) for _ in range(2)]
                for member in pool:
                    member.execute("SELECT count(*) FROM pg_class")
                reports = []
                out.append(timed(lambda r=reports: r.append(allocator.reset(held.lease, spares=0))))
                if reports[0].spare != with_spare or reports[0].ended != len(pool):
                    raise SystemExit(f"reset did not go as planned: {reports[0]}")
                swap.append(reports[0].seconds)
                for member in pool:
                    member.close()
    finally:
        allocator.release(name=held.name)
        allocator.close()
    return warm, cold, swap_warm, swap_cold


def _count_spares(conn: psycopg.Connection[object]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_database WHERE starts_with(datname, 'bench_spare_')"
    ).fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    os.environ.setdefault("E2E_PORT_RANGE", "15510-15519")
    sys.exit(main())
