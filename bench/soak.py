"""Soak: N consecutive parallel runs of every demo project; nothing may accumulate.

    python bench/soak.py --rounds 30 [--port-range 18500-18999] [--jobs auto] [--keep]

Each round runs ``nox -j auto -t e2e`` against a copy of the repository's configuration whose state
and results live in a temp folder (its own embedded PostgreSQL cluster, its own port range), plus
one project run in this process (so the tool's own file descriptors can be counted). After each
round it counts what could leak:

* leases in the registry (the cluster's own port lease aside),
* project databases (every non-template database of the name base),
* live processes of the runs (servers and suites carry E2E_RESULTS_DIR) and guardians,
* PostgreSQL backends (leaked connections) and the postmaster's open file descriptors,
* this process's open file descriptors (after an in-process run through the library).

It prints one row per round and exits 1 if any count grows beyond the first round's (leases,
databases and processes must be 0 every round), or if a run fails. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import e2e_infra  # noqa: E402
from e2e_infra.testing import copy_config  # noqa: E402

COUNTS = ("leases", "databases", "processes", "guardians", "backends", "pg_fds", "tool_fds")
MUST_BE_ZERO = ("leases", "databases", "processes", "guardians")


def write_config(folder: Path, port_range: str) -> Path:
    """The repository's [tool.e2e_infra] with state, results and ports of our own."""
    return copy_config(ROOT / "pyproject.toml", folder, port_range=port_range)


def count(config: e2e_infra.Config, cluster: e2e_infra.LocalCluster) -> dict[str, int]:
    registry = e2e_infra.make_registry(config)
    leases = [lease for lease in registry.snapshot() if lease.project != "postgres"]
    marker = str(config.results_dir)
    processes = guardians = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "e2e_infra.run.guardian" in cmdline and proc.environ().get("E2E_CONFIG") == str(
                config.source
            ):
                guardians += 1
            elif proc.environ().get("E2E_RESULTS_DIR", "").startswith(marker):
                processes += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    status = cluster.status()
    assert status.pid is not None, "the cluster is not running"
    postmaster = psutil.Process(status.pid)
    with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname LIKE %s",
            (config.database.name_base + "\\_%",),
        ).fetchall()
        backends = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    return {
        "leases": len(leases),
        "databases": len(rows),
        "processes": processes,
        "guardians": guardians,
        "backends": int(backends[0]) if backends else 0,
        "pg_fds": postmaster.num_fds(),
        "tool_fds": psutil.Process().num_fds(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--port-range", default="18500-18999")
    parser.add_argument("--jobs", default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="e2e-soak-"))
    config_path = write_config(folder, args.port_range)
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2E_")}
    env.update({"E2E_CONFIG": str(config_path), "E2E_SUMMARY": "0"})
    config = e2e_infra.load_config(config_path, environ=env)
    registry = e2e_infra.make_registry(config)
    cluster = e2e_infra.LocalCluster(
        config, registry, e2e_infra.PortAllocator.from_config(config, registry)
    )
    cluster.ensure_running()
    projects = list(config.projects)
    inproc = "static_pages" if "static_pages" in projects else projects[0]
    print(f"soak: {args.rounds} rounds of {len(projects)} projects (-j {args.jobs}) in {folder}")
    print(f"{'round':>5} {'seconds':>8} " + " ".join(f"{name:>9}" for name in COUNTS))
    nox_argv = [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py")]
    baseline: dict[str, int] | None = None
    failures: list[str] = []
    try:
        for round_ in range(1, args.rounds + 1):
            started = time.monotonic()
            proc = subprocess.run(
                [*nox_argv, "-j", args.jobs, "-t", "e2e"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                failures.append(f"round {round_}: nox exited {proc.returncode}")
                print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            with open(os.devnull, "w") as devnull:
                # The in-process run's suite writes to our stdout: silence it for the table.
                saved = os.dup(1)
                os.dup2(devnull.fileno(), 1)
                try:
                    result = e2e_infra.run_project(config, inproc)
                finally:
                    os.dup2(saved, 1)
                    os.close(saved)
            if not result.passed:
                failures.append(f"round {round_}: in-process {inproc} {result.result}")
            counts = count(config, cluster)
            seconds = time.monotonic() - started
            print(
                f"{round_:>5} {seconds:>8.1f} " + " ".join(f"{counts[k]:>9}" for k in COUNTS),
                flush=True,
            )
            for key in MUST_BE_ZERO:
                if counts[key]:
                    failures.append(f"round {round_}: {counts[key]} {key} left")
            if baseline is None:
                baseline = counts
            else:
                for key in COUNTS:
                    if counts[key] > baseline[key]:
                        failures.append(
                            f"round {round_}: {key} grew from {baseline[key]} to {counts[key]}"
                        )
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(cluster.cluster_dir, ignore_errors=True)
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print(f"OK: {args.rounds} rounds, no count grew")
    return 0


if __name__ == "__main__":
    sys.exit(main())
