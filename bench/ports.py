"""Benchmark: the port allocator next to what people reach for instead.

Each worker process repeats: get a port (timed), wait a moment as a server's start-up would, bind
and listen on it as the server would (SO_REUSEADDR, 0.0.0.0), hold it a moment, close it, release.
A bind that fails with "address in use" is a collision: another worker was handed the same port.

    python bench/ports.py            # 1, 8 and 32 processes x 100 allocations each
    python bench/ports.py --quick    # x 20 allocations each

Methods:
  e2e-infra   PortAllocator.allocate + release (file-locked registry + probe-bind), range below
  bind(0)     bind port 0, read the port the kernel chose, close, hand it over
  portpicker  portpicker.pick_unused_port() without its port server

bind(0) and portpicker draw from the kernel's ephemeral range; a port they return outside it and
outside --range is counted but never bound (other people's test ranges live there).
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_infra.config import PortRange
from e2e_infra.resources.leases import Owner, Registry
from e2e_infra.resources.ports import PortAllocator, ephemeral_port_range

METHODS = ("e2e-infra", "bind(0)", "portpicker")
WAIT = 300.0  # seconds any barrier or join may take before the bench gives up


def _bind0() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve_briefly(port: int, delay: float, hold: float, rng: random.Random) -> bool:
    """Bind and listen like a server after ``delay``; False on a collision."""
    time.sleep(rng.uniform(0, delay))
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen()
        time.sleep(rng.uniform(0, hold))
        return True
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    finally:
        sock.close()


def _worker(
    method: str,
    index: int,
    args: dict[str, Any],
    barrier: Barrier,
    results: Queue[dict[str, Any]],
) -> None:
    rng = random.Random(index)
    port_range = PortRange(*args["range"])
    ephemeral = args["ephemeral"]
    release: Callable[[], object] = lambda: None  # noqa: E731
    if method == "e2e-infra":
        ports = PortAllocator(Registry(Path(args["state"]), lock_timeout=WAIT), port_range)
        owner = Owner.current(run_id=f"bench-{index}")
        project = f"bench_{index}"

        def get() -> int:
            return ports.allocate(project, ["server"], owner)["server"]

        release = lambda: ports.release(project)  # noqa: E731
    elif method == "bind(0)":
        get = _bind0
    else:
        import portpicker

        get = portpicker.pick_unused_port  # no portserver: the environment has none
    latencies: list[float] = []
    collisions = skipped = 0
    barrier.wait(WAIT)
    start = time.monotonic()
    for _ in range(args["count"]):
        t0 = time.perf_counter()
        port = get()
        latencies.append(time.perf_counter() - t0)
        ours = port in port_range or (ephemeral and ephemeral[0] <= port <= ephemeral[1])
        if not ours:
            skipped += 1
        elif not _serve_briefly(port, args["delay"], args["hold"], rng):
            collisions += 1
        release()
    results.put(
        {
            "latencies": latencies,
            "collisions": collisions,
            "skipped": skipped,
            "start": start,
            "end": time.monotonic(),
        }
    )


def run(method: str, procs: int, args: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(procs)
    results: Queue[dict[str, Any]] = context.Queue()
    workers = [
        context.Process(target=_worker, args=(method, i, args, barrier, results))
        for i in range(procs)
    ]
    for proc in workers:
        proc.start()
    try:
        reports = [results.get(timeout=WAIT) for _ in workers]
    finally:
        for proc in workers:
            proc.join(timeout=WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    latencies = sorted(x for report in reports for x in report["latencies"])
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {
        "method": method,
        "procs": procs,
        "allocations": len(latencies),
        "per_second": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "collisions": sum(r["collisions"] for r in reports),
        "skipped": sum(r["skipped"] for r in reports),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 allocations per process")
    parser.add_argument("--count", type=int, help="allocations per process (default 100)")
    parser.add_argument("--range", default="21000-22999", help="the tool's port range")
    parser.add_argument("--procs", default="1,8,32", help="process counts, comma-separated")
    parser.add_argument("--delay", type=float, default=0.005, help="max s before the bind")
    parser.add_argument("--hold", type=float, default=0.005, help="max s the port is held")
    options = parser.parse_args(argv)
    port_range = PortRange.parse(options.range)
    with tempfile.TemporaryDirectory(prefix="e2e-bench-ports-") as state:
        args = {
            "count": options.count or (20 if options.quick else 100),
            "range": (port_range.low, port_range.high),
            "ephemeral": ephemeral_port_range(),
            "state": state,
            "delay": options.delay,
            "hold": options.hold,
        }
        rows = []
        for procs in (int(p) for p in options.procs.split(",")):
            for method in METHODS:
                rows.append(run(method, procs, args))
                print(f"  ran {method} x {procs}", file=sys.stderr, flush=True)
    print(
        f"\n{args['count']} allocations per process; bind after <= {options.delay * 1000:g} ms, "
        f"held <= {options.hold * 1000:g} ms; e2e-infra range {port_range}\n"
    )
    header = (
        f"{'method':<11} {'procs':>5} {'alloc/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'collisions':>15} {'p50 vs tool':>11} {'rate vs tool':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        tool = next(r for r in rows if r["procs"] == row["procs"] and r["method"] == METHODS[0])
        collided = f"{row['collisions']}/{row['allocations']}"
        if row["skipped"]:
            collided += f" ({row['skipped']} unbound)"
        print(
            f"{row['method']:<11} {row['procs']:>5} {row['per_second']:>9.0f} "
            f"{row['p50']:>8.2f} {row['p99']:>8.2f} {collided:>15} "
            f"{row['p50'] / tool['p50']:>10.2f}x {row['per_second'] / tool['per_second']:>11.2f}x"
        )
    tool_rows = {r["procs"]: r for r in rows if r["method"] == METHODS[0]}
    verdicts = []
    if 32 in tool_rows:
        verdicts.append(f"collisions at 32 processes: {tool_rows[32]['collisions']} (target 0)")
    if 8 in tool_rows:
        verdicts.append(f"p99 at 8 processes: {tool_rows[8]['p99']:.1f} ms (target < 50 ms)")
    if verdicts:
        print("\ne2e-infra: " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
