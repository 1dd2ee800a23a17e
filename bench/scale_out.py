"""Simulation: several hosts share one PostgreSQL server while its connections are cut.

    python bench/scale_out.py                    # 6 hosts, 150 s
    python bench/scale_out.py --hosts 8 --seconds 240 --no-namespaces

Each host is a process of its own, with its own state folder, its own ``host_id`` (or, with
``--same-id``, one id for all: CI containers sharing a hostname) and, as root with ``unshare``, its
own pid namespace. All hosts use one password-protected server through its TCP URL
(``admin_url``). Each host loops: allocate one of three projects, run a "suite" of 2-4 s (a query
on its database every 50 ms, reconnecting like a pool for up to 10 s when the server is away),
check the hold (``check_holds``), release; and every 1.5 s one host runs ``cleanup`` as
``invoke db.cleanup`` would. Meanwhile an injector, every ``--every`` seconds in turn: ends every
session holding an advisory lock (``pg_terminate_backend``: a failover or a proxy), sets
``idle_session_timeout = 2s`` for one period (a proxy cutting idle connections), restarts the
server (``pg_ctl stop -m fast`` + start: every connection ends).

A run *passes* when its suite saw its database on every query and its hold was never lost for
good. A *live drop* is a database dropped while its run was going (a query saw "database does not
exist"); the target is zero. Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e_infra.config import load_config  # noqa: E402
from e2e_infra.postgres import LocalCluster  # noqa: E402
from e2e_infra.resources.leases import Registry  # noqa: E402
from e2e_infra.resources.ports import PortAllocator  # noqa: E402

HOST = textwrap.dedent(
    """
    import json, os, random, sys, time
    from pathlib import Path
    import psycopg
    import e2e_infra
    config = e2e_infra.load_config(Path(sys.argv[1]), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    stop_at, sweeper = float(sys.argv[2]), sys.argv[3] == "1"
    out = open(sys.argv[4], "a")
    def emit(**data):
        out.write(json.dumps(data) + "\\n"); out.flush()
    def retry(fn, limit=15.0):
        end = time.monotonic() + limit
        while True:
            try:
                return fn()
            except e2e_infra.E2EInfraError as exc:
                if time.monotonic() > end: raise
                time.sleep(0.2)
    last_sweep = 0.0
    while time.time() < stop_at:
        project = random.choice(["alpha", "beta", "gamma"])
        owner = e2e_infra.Owner.current(host=config.host_id)
        t0 = time.monotonic()
        try:
            got = retry(lambda: allocator.allocate(project, owner))
        except e2e_infra.E2EInfraError as exc:
            emit(event="allocate_failed", error=exc.one_line()[:300]); continue
        alloc = time.monotonic() - t0
        ok = missing = outage = 0
        end = time.monotonic() + random.uniform(2, 4)
        while time.monotonic() < end:
            if sweeper and time.monotonic() - last_sweep > 1.5:
                last_sweep = time.monotonic()
                try:
                    for name, why in allocator.cleanup():
                        emit(event="dropped", name=name, why=why)
                except e2e_infra.E2EInfraError:
                    pass
            given_up = time.monotonic() + 10
            while True:
                try:
                    with psycopg.connect(got.url.conninfo(), connect_timeout=3) as conn:
                        conn.execute("SELECT count(*) FROM pg_class").fetchone()
                    ok += 1; break
                except psycopg.Error as exc:
                    if "does not exist" in str(exc): missing += 1; break
                    if time.monotonic() > given_up: outage += 1; break
                    time.sleep(0.1)
            time.sleep(0.05)
        lost = ""
        try:
            allocator.check_holds()
        except e2e_infra.E2EInfraError as exc:
            lost = exc.one_line()[:300]
        try:
            retry(lambda: allocator.release(name=got.name))
        except e2e_infra.E2EInfraError as exc:
            emit(event="release_failed", error=exc.one_line()[:300])
        allocator.holds.release_all()
        emit(event="run", host=sys.argv[1], name=got.name, alloc=alloc, ok=ok,
             missing=missing, outage=outage, lost=lost, retakes=allocator.holds.retakes)
    allocator.close()
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between injections")
    parser.add_argument("--same-id", action="store_true", help="one host_id for every host")
    parser.add_argument("--no-namespaces", action="store_true")
    args = parser.parse_args()
    namespaces = not args.no_namespaces and os.geteuid() == 0 and shutil.which("unshare")
    tmp = Path(tempfile.mkdtemp(prefix="e2e-scale-out-"))
    server_cfg = tmp / "server" / "pyproject.toml"
    server_cfg.parent.mkdir(parents=True)
    server_cfg.write_text(
        f'[tool.e2e_infra]\nstate_dir = "{tmp / "server" / "state"}"\nport_range = "23900-23949"\n',
        encoding="utf-8",
    )
    config = load_config(server_cfg, environ={})
    registry = Registry(config.state_dir, host=config.host_id)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    cluster.ensure_running()
    tcp = cluster.tcp_conninfo()
    events = tmp / "events.jsonl"
    stop_at = time.time() + args.seconds
    procs = []
    injected: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        for i in range(args.hosts):
            folder = tmp / f"host{i}"
            folder.mkdir()
            host_id = "ci-runner" if args.same_id else f"host-{i}"
            (folder / "pyproject.toml").write_text(
                textwrap.dedent(
                    f"""
                    [tool.e2e_infra]
                    state_dir = "{folder / "state"}"
                    results_dir = "{folder / "results"}"
                    host_id = "{host_id}"
                    [tool.e2e_infra.database]
                    admin_url = "{tcp.url}"
                    name_base = "scale"
                    migrations_dir = "{REPO / "demo" / "migrations"}"
                    seeds_dir = "{REPO / "demo" / "seeds"}"
                    """
                ),
                encoding="utf-8",
            )
            prefix = ["unshare", "--pid", "--fork", "--mount-proc"] if namespaces else []
            argv = [*prefix, sys.executable, "-c", HOST, str(folder / "pyproject.toml")]
            argv += [str(stop_at), "1" if i == 0 else "0", str(events)]
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("E2E_")}}
            env["PYTHONPATH"] = str(REPO)
            procs.append(subprocess.Popen(argv, env=env, cwd=REPO))
        kinds = ["terminate", "idle_timeout", "restart"]
        n = 0
        import psycopg

        while time.time() < stop_at - args.every / 2:
            time.sleep(args.every)
            kind = kinds[n % len(kinds)]
            n += 1
            admin = cluster.admin_conninfo()
            if kind == "restart":
                cluster.stop()
                cluster.ensure_running()
                if cluster.tcp_conninfo().port != tcp.port:
                    raise SystemExit("the restarted server moved to another port")
            else:
                with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
                    if kind == "terminate":
                        conn.execute(
                            "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT pid FROM "
                            "pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()) p"
                        )
                    else:
                        conn.execute("ALTER SYSTEM SET idle_session_timeout = '2s'")
                        conn.execute("SELECT pg_reload_conf()")
            injected.append((time.monotonic() - started, kind))
            if kind == "idle_timeout":
                time.sleep(args.every)  # one period with the idle killer on, then off
                with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
                    conn.execute("ALTER SYSTEM RESET idle_session_timeout")
                    conn.execute("SELECT pg_reload_conf()")
        for proc in procs:
            proc.wait(timeout=args.seconds + 120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        cluster.stop()
    report(events, args, bool(namespaces), injected, [p.returncode for p in procs])
    shutil.rmtree(tmp, ignore_errors=True)


def report(
    events: Path, args: Any, namespaces: bool, injected: list[tuple[float, str]], codes: list[int]
) -> None:
    rows = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    runs = [r for r in rows if r["event"] == "run"]
    passed = [r for r in runs if not r["missing"] and not r["outage"] and not r["lost"]]
    allocs = sorted(r["alloc"] for r in runs)
    summary = {
        "hosts": args.hosts,
        "seconds": args.seconds,
        "pid_namespaces": namespaces,
        "same_host_id": args.same_id,
        "injections": [kind for _, kind in injected],
        "runs": len(runs),
        "passed": len(passed),
        "live_drops": sum(1 for r in runs if r["missing"]),
        "holds_lost_for_good": sum(1 for r in runs if r["lost"]),
        "suite_outages": sum(1 for r in runs if r["outage"]),
        "queries": sum(r["ok"] for r in runs),
        "holds_retaken": sum(
            max(r["retakes"] for r in runs if r["host"] == host)
            for host in {r["host"] for r in runs}
        ),
        "allocate_failed": sum(1 for r in rows if r["event"] == "allocate_failed"),
        "release_failed": sum(1 for r in rows if r["event"] == "release_failed"),
        "dropped_by_cleanup": [r["name"] for r in rows if r["event"] == "dropped"],
        "allocate_p50_s": round(allocs[len(allocs) // 2], 3) if allocs else None,
        "allocate_max_s": round(allocs[-1], 3) if allocs else None,
        "exit_codes": codes,
    }
    print(json.dumps(summary))
    failures = [r for r in rows if r["event"] != "run" and r["event"] != "dropped"]
    for row in failures[:5]:
        print("  ", json.dumps(row))
    for row in [r for r in runs if r["lost"] or r["missing"] or r["outage"]][:5]:
        print("  ", json.dumps(row))


if __name__ == "__main__":
    main()
