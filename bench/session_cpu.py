"""Benchmark: the tool's own CPU per project in a warm interpreter (no nox, no fresh imports).

    python bench/session_cpu.py                 # 3 warm rounds over the six non-browser projects
    python bench/session_cpu.py --rounds 5 --projects auth_tests,quality
    python bench/session_cpu.py --profile       # also cProfile the warm runs (main thread's CPU)

What a project costs once the interpreter is warm (psycopg, servers, health... imported; the
embedded cluster started; the templates built): in one process, one cold run of every project,
then each project ``--rounds`` times through ``e2e_infra.run_project``, measuring around each call:

* ``self``: ``getrusage(RUSAGE_SELF)`` user + system, every thread of this process (the session,
  the watcher thread, psycopg's);
* ``main``: ``time.thread_time()`` of the calling thread alone (``self - main`` is the threads);
* ``children``: ``getrusage(RUSAGE_CHILDREN)``, what this process reaped: the suite, the servers,
  the guardian fork; ``suite+servers`` is the run's own ``resources.cpu_seconds`` (run.json), so
  ``children - suite+servers`` is what the tool's children cost (the guardian fork);
* ``tool`` = ``self`` + the tool's children: the figure the target (<= 60 ms) is about.

Prints one line per run, then per project the median, and the median over all warm runs. Uses a
private config (state and results in a temporary folder, ports 23500-23999) and stops its cluster
at the end. The load average is shown: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, load_average, machine, median, stop_cluster, table, write_config

PORT_RANGE = "23500-23999"
BROWSER_PROJECTS = ("browser_ui", "browser_node")


def _projects(spec: str) -> dict[str, Any]:
    import tomllib

    section = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["e2e_infra"]
    projects: dict[str, Any] = section["projects"]
    if spec:
        wanted = [p.strip() for p in spec.split(",") if p.strip()]
        return {p: projects[p] for p in wanted}
    return {p: v for p, v in projects.items() if p not in BROWSER_PROJECTS}


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(config: Any, project: str) -> dict[str, Any]:
    import e2e_infra

    self_before = _cpu(resource.RUSAGE_SELF)
    children_before = _cpu(resource.RUSAGE_CHILDREN)
    main_before = time.thread_time()
    wall_before = time.perf_counter()
    result = e2e_infra.run_project(config, project, [])
    wall = time.perf_counter() - wall_before
    main = time.thread_time() - main_before
    own = _cpu(resource.RUSAGE_SELF) - self_before
    children = _cpu(resource.RUSAGE_CHILDREN) - children_before
    resources = result.resources or {}
    suite = float(resources.get("cpu_seconds", 0.0))
    return {
        "project": project,
        "result": result.result,
        "wall": wall,
        "self": own,
        "main": main,
        "threads": own - main,
        "watch": float(resources.get("watch_cpu_seconds", 0.0)),
        "children": children,
        "suite": suite,
        "tool_children": max(children - suite, 0.0),
        "tool": own + max(children - suite, 0.0),
        "error": result.error,
    }


def _ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--projects", default="", help="comma-separated (default: non-browser)")
    parser.add_argument("--profile", action="store_true", help="cProfile the warm runs")
    parser.add_argument("--top", type=int, default=30, help="profile lines to print")
    parser.add_argument("--profile-out", type=Path, help="also save the profile (pstats) here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import logging

    import e2e_infra

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    projects = list(_projects(args.projects))
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="e2e-bench-cpu-"))
    path = write_config(tmp, projects=_projects(args.projects), port_range=PORT_RANGE)
    # CPU, not wall: most of a run's wall time is waiting for servers and the suite.
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    runs: list[dict[str, Any]] = []
    try:
        config = e2e_infra.load_config(path).for_run(e2e_infra.new_run_id())
        started = time.perf_counter()
        for project in projects:  # cold: imports, the cluster, the templates
            cold = measure(config, project)
            if cold["result"] != "passed":
                print(f"cold run of {project}: {cold['result']}: {cold['error']}")
                return 1
        print(
            f"cold runs of {len(projects)} projects: {time.perf_counter() - started:.1f}s wall, "
            f"load {load_average():.2f}"
        )
        rows = []
        for round_no in range(args.rounds):
            for project in projects:
                if profiler is not None:
                    profiler.enable()
                sample = measure(config, project)
                if profiler is not None:
                    profiler.disable()
                runs.append(sample)
                if sample["result"] != "passed":
                    print(f"  {project}: {sample['result']}: {sample['error']}", file=sys.stderr)
                print(
                    f"  round {round_no + 1} {project:<13} tool {_ms(sample['tool']):>4} ms "
                    f"(self {_ms(sample['self'])}, threads {_ms(sample['threads'])}, "
                    f"guardian {_ms(sample['tool_children'])}) wall {sample['wall']:.2f}s "
                    f"load {load_average():.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        keys = ("tool", "self", "main", "threads", "watch", "tool_children", "suite")
        for project in projects:
            mine = [r for r in runs if r["project"] == project]
            rows.append((project, *(_ms(median([r[k] for r in mine])) for k in keys)))
        rows.append(("median, all", *(_ms(median([r[k] for r in runs])) for k in keys)))
        headers = ("project", "tool", "self", "main thread", "threads", "watcher", "guardian")
        print(f"\n=== warm CPU per project, ms (median of {args.rounds} rounds) ===")
        print(table((*headers, "suite+servers"), rows))
        print(f"load {load_average():.2f}; target: tool <= 60 ms per warm project")
        if profiler is not None and args.profile_out is not None:
            profiler.dump_stats(args.profile_out)
        if profiler is not None:
            for order in ("tottime", "cumulative"):
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order)
                stats.print_stats(args.top)
                print(f"\n=== profile of the warm runs (main thread), by {order} ===")
                print(out.getvalue().split("\n", 4)[-1] if out.getvalue() else "")
    finally:
        try:
            stop_cluster(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
