"""Benchmark: the demo's E2E projects through nox, one after another and in parallel.

    python bench/e2e.py                 # 3 rounds of nox -t e2e, -j 2, -j auto, invoke e2e.all
    python bench/e2e.py --rounds 5 --modes seq,auto
    python bench/e2e.py --startup-only  # only the start-up times (invoke --list, nox -l, import)
    python bench/e2e.py --baseline /tmp/base   # A/B: also run a baseline checkout, interleaved

    # a baseline checkout without touching the repository's git state:
    mkdir /tmp/base && git archive HEAD | tar -x -C /tmp/base

Runs ``python -m nox -f noxfile.py -t e2e`` (and ``invoke e2e.all``, which runs the projects
without nox workers) exactly as a user would, with ``E2E_CONFIG`` pointing
at a private copy of the config (state and results in a temporary folder, ports 23000-24999). A
first, cold run starts the embedded cluster and builds the templates; it is shown apart. Then each
round runs every mode once, interleaved so that load from other users of the machine spreads
over all modes. Prints, side by side: wall time and speedup per mode, the share of the tool's own
phases (everything but the suite) and, per project, the median of each phase from ``run.json``.
The load average is shown next to every figure: the machine is shared.

With ``--baseline DIR`` every run of this checkout is paired with the same run of the checkout in
DIR (each with its own state folder and cluster; the order alternates each round), so that load
from other users falls on both alike; the ratios baseline/current are printed side by side.

The tool's CPU per project: the run's total CPU (nox and everything it started, as the kernel
counts it; PostgreSQL not included) minus what the suites and servers used (each session reaps
them and records their CPU in run.json ``resources.cpu_seconds``), divided by the number of
projects. Every Python process of a run also records its own CPU at exit (a ``sitecustomize`` in
``bench/_cpu_hook``, only on the bench's ``PYTHONPATH``): that gives the share of nox's ``-j``
workers (``--parallel-worker``: nox's start-up in each, the same with any noxfile), printed apart.

That figure spreads a run's fixed cost over the demo's six projects: one interpreter importing nox
or invoke, the warm server's imports, the summary and report (~0.8 s, whatever the number of
projects). Each round also runs every mode with 1 and 3 no-op projects (suite ``true``, no
database, no server): the intercept is the fixed CPU per run, and what is left of the demo's tool
CPU, divided by its projects, is the tool's CPU per project (what every further project costs,
the issue's target; at 17-100 projects the fixed part is 8-50 ms a project). That difference of
two ~20 s figures moves by +-40 ms a project between rounds on a shared 2-core machine; each
session also records its own CPU in run.json (``resources.tool_cpu_seconds``: the kernel's count
in the session's process, and what it reaped besides the suite and servers), a precise figure
that leaves out only the fork and exit of the session's process (~10 ms, bench/scale.py).

The readiness section starts a
test server on a socket the tool bound, many times, and prints the median delay between the
server sending its answer and the tool noticing, with the blocking request and with polling.

By default the six projects without a browser run (``--projects all`` adds the two browser
projects, whose suites take ~30 s each and drown every other figure).

Targets (issue #6): tool phases < 20% of the demo's run time; parallel speedup >= 1.7x on 2 cores.
Targets (issue #14): the tool's CPU per project <= 100 ms; tool phases under -j within 1.3x of
sequential; readiness noticed < 5 ms after the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    bench_env,
    load_average,
    machine,
    median,
    run_timed,
    spread,
    stop_cluster,
    table,
    write_config,
)

PHASES = ("ports", "database", "servers", "health", "suite", "teardown")
TOOL_PHASES = ("ports", "database", "servers", "health", "teardown")
BROWSER_PROJECTS = ("browser_ui", "browser_node")
CPU_HOOK = Path(__file__).resolve().parent / "_cpu_hook"
MODES = {"seq": [], "2": ["-j", "2"], "auto": ["-j", "auto"], "all": []}
PARALLEL = ("2", "auto", "all")


def nox(repo: Path) -> list[str]:
    return [sys.executable, "-m", "nox", "-f", str(repo / "noxfile.py")]


def _label(mode: str) -> str:
    if mode == "all":
        return "invoke e2e.all --jobs 2"
    return "nox -t e2e" if mode == "seq" else f"nox -j {mode} -t e2e"


def _argv(mode: str, repo: Path) -> list[str]:
    if mode == "all":  # no nox: each project in a fork of the invoke process's warm server
        return [sys.executable, "-m", "invoke", "-r", str(repo), "e2e.all", "--jobs", "2"]
    return [*nox(repo), *MODES[mode], "-t", "e2e"]


def _runs(results: Path) -> dict[str, dict[str, Any]]:
    found = {}
    # <results>/<run id>/<project>/run.json (one folder per run), or <results>/<project>/run.json
    for path in sorted([*results.glob("*/run.json"), *results.glob("*/*/run.json")]):
        data = json.loads(path.read_text())
        found[data["project"]] = data
    return found


def _cpu_records(folder: Path) -> dict[str, float]:
    """CPU seconds by role (``tool``, ``other``, ``worker``) that the processes of a run recorded.

    ``worker``: the ``nox -j`` workers (``--parallel-worker``), also counted in ``tool``.
    """
    totals = {"tool": 0.0, "other": 0.0, "worker": 0.0}
    for path in folder.glob("*.cpu"):
        for line in path.read_text().splitlines():
            role, cpu, *rest = line.split(" ", 2)
            totals[role] = totals.get(role, 0.0) + float(cpu)
            if role == "tool" and rest and "--parallel-worker" in rest[0]:
                totals["worker"] += float(cpu)
    return totals


def _suites_cpu(runs: dict[str, dict[str, Any]]) -> float | None:
    """CPU of the suites and servers as the kernel counted it (run.json ``resources``)."""
    seconds = [run.get("resources", {}).get("cpu_seconds") for run in runs.values()]
    if any(value is None for value in seconds):
        return None  # a checkout from before run.json had it (a --baseline)
    return float(sum(seconds))


def run_once(config: Path, mode: str, repo: Path = REPO) -> dict[str, Any]:
    results = config.parent / "results"
    shutil.rmtree(results, ignore_errors=True)
    cpu_dir = config.parent / "cpu"
    shutil.rmtree(cpu_dir, ignore_errors=True)
    cpu_dir.mkdir()
    env = bench_env(config, E2E_BENCH_CPU_DIR=str(cpu_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(CPU_HOOK), str(repo)])  # that checkout's e2e_infra
    timed = run_timed(_argv(mode, repo), env=env, cwd=repo)
    runs = _runs(results)
    failed = [name for name, run in runs.items() if run["result"] != "passed"]
    if timed.returncode != 0 or failed or not runs:
        print(timed.output[-4000:], file=sys.stderr)
        raise SystemExit(f"{_label(mode)} failed (exit {timed.returncode}; failed: {failed})")
    records = _cpu_records(cpu_dir)
    # The suites and servers: the kernel's count (each session reaps them and records what they
    # used); else what each recorded at its exit, which misses its interpreter's finalization.
    kernel = _suites_cpu(runs)
    other = kernel if kernel is not None else records["other"]
    tool = (timed.cpu - other) / len(runs)
    sessions = [run.get("resources", {}).get("tool_cpu_seconds") for run in runs.values()]
    return {
        # The sessions' own CPU as each counted it (run.json): None from an older checkout.
        "session_cpu": None if None in sessions else sum(sessions) / len(sessions),
        "mode": mode,
        "wall": timed.seconds,
        "load": timed.load,
        "cpu": timed.cpu,
        "suites_cpu": other,
        "suites_cpu_source": "kernel" if kernel is not None else "atexit",
        "tool_cpu": tool,
        "worker_cpu": records["worker"] / len(runs),
        "runs": runs,
    }


NOOP_COUNTS = (1, 3)  # no-op projects (suite `true`, no database, no server) for the fixed part


def noop_projects(count: int) -> dict[str, Any]:
    return {
        f"noop{i}": {"command": "true", "servers": [], "database": False, "timeout": 60}
        for i in range(count)
    }


def fixed_cpu(noops: dict[int, Path], mode: str, repo: Path) -> float:
    """The CPU a run of ``mode`` costs however few its projects (the interpreter, nox or invoke,
    the warm server's imports, the summary and report): the intercept of the tool's CPU over 1
    and 3 no-op projects, CPU(n) = fixed + n * per no-op project."""
    low, high = NOOP_COUNTS
    tool = {}
    for count in NOOP_COUNTS:
        sample = run_once(noops[count], mode, repo)
        tool[count] = float(sample["tool_cpu"]) * len(sample["runs"])
    per_noop = (tool[high] - tool[low]) / (high - low)
    return max(tool[low] - low * per_noop, 0.0)


def readiness(rounds: int) -> list[tuple[str, ...]]:
    """Median delay between a server's answer and the tool noticing: blocking request vs polling.

    The test server (tests/fixtures/servers/http_server.py) gets a socket the tool bound, sleeps
    50-250 ms, then answers and records time.monotonic() (one clock for every process here)."""
    import random

    sys.path.insert(0, str(REPO))
    from e2e_infra.run.health import HttpCheck, wait_healthy
    from e2e_infra.run.servers import ServerProcess, bind_listen_socket

    fixture = REPO / "tests" / "fixtures" / "servers" / "http_server.py"
    delays: dict[bool, list[float]] = {True: [], False: []}
    loads = []
    with tempfile.TemporaryDirectory(prefix="e2e-bench-ready-") as tmp:
        for number in range(rounds):
            for listening in (True, False):
                port = 24900 + number % 90
                sock = bind_listen_socket(port)
                answered = Path(tmp) / f"answered-{number}-{listening}"
                fd = sock.fileno()
                server = ServerProcess(
                    "ready",
                    [
                        sys.executable,
                        str(fixture),
                        "--fd",
                        str(fd),
                        "--answered",
                        str(answered),
                        "--delay",
                        f"{random.uniform(0.05, 0.25):.3f}",
                    ],
                    cwd=Path(tmp),
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    log_path=Path(tmp) / "ready.log",
                    health=HttpCheck(f"http://127.0.0.1:{port}/health"),
                    pass_fds=(fd,),
                    port=port,
                )
                try:
                    server.start()
                    sock.close()
                    wait_healthy(
                        server.health,
                        timeout=20,
                        alive=lambda s=server: s.running,
                        listening=listening,
                    )
                    noticed = time.monotonic()
                    for _ in range(200):
                        if answered.exists() and answered.read_text().endswith("\n"):
                            break
                        time.sleep(0.005)
                    first = float(answered.read_text().splitlines()[0])
                    delays[listening].append(noticed - first)
                    loads.append(load_average())
                finally:
                    sock.close()
                    server.stop()
    rows = []
    for listening, label in ((True, "one blocking request"), (False, "polling (10-50 ms)")):
        values = delays[listening]
        rows.append((label, spread(values, " ms", 1000), f"{median(loads):.2f}"))
    return rows


def startup(rounds: int, repos: dict[str, Path]) -> list[tuple[str, ...]]:
    """Median wall time of the commands whose start-up every user and every nox worker pays."""
    commands = {
        "python -c pass": lambda repo: [sys.executable, "-c", "pass"],
        "python -c 'import e2e_infra'": lambda repo: [sys.executable, "-c", "import e2e_infra"],
        "python -m nox -l": lambda repo: [*nox(repo), "-l"],
        "invoke --list": lambda repo: [sys.executable, "-m", "invoke", "--list"],
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="e2e-bench-startup-") as tmp:
        env = bench_env(write_config(Path(tmp)))
        for label, make in commands.items():
            samples: dict[str, list[float]] = {name: [] for name in repos}
            loads = []
            for _ in range(rounds):
                for name, repo in repos.items():  # interleaved: load falls on all alike
                    timed = run_timed(make(repo), env=env, cwd=repo)
                    if timed.returncode != 0:
                        print(timed.output[-2000:], file=sys.stderr)
                        raise SystemExit(f"{label} failed in {repo}")
                    samples[name].append(timed.seconds)
                    loads.append(timed.load)
            cells = [spread(samples[name], " ms", 1000) for name in repos]
            if len(repos) == 2:
                first, second = (median(samples[name]) for name in repos)
                cells.append(f"{second / first:.2f}x")
            rows.append((label, *cells, f"{median(loads):.2f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all modes (default 3)")
    parser.add_argument(
        "--modes",
        default="seq,2,auto,all",
        help="of seq, 2, auto (nox -j), all (invoke e2e.all --jobs 2), comma-separated",
    )
    parser.add_argument("--startup-rounds", type=int, default=7)
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument(
        "--tmpfs", action="store_true", help="postgres.tmpfs = true: the cluster on /dev/shm"
    )
    parser.add_argument("--baseline", type=Path, help="a checkout to compare with, interleaved")
    parser.add_argument("--spares", type=int, default=0, help="database.spares (warm spares)")
    parser.add_argument(
        "--projects",
        default="",
        help="comma-separated projects, or all (default: all but the two browser projects)",
    )
    parser.add_argument("--ready-rounds", type=int, default=15, help="readiness starts per mode")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; use seq, 2, auto, all")

    repos = {"current": REPO}
    if args.baseline:
        repos = {"baseline": args.baseline.resolve(), "current": REPO}
    print(f"machine: {machine()}; load average at start {load_average():.2f}")
    for name, repo in repos.items():
        print(f"{name}: {repo}")
    print(
        f"\nstart-up (median of {args.startup_rounds}, min-max; "
        "load is the median 1-min load average)"
    )
    ratio = ("current/baseline",) if len(repos) == 2 else ()
    print(table(("command", *repos, *ratio, "load"), startup(args.startup_rounds, repos)))
    if args.startup_only:
        return 0

    print(f"\nreadiness: a server answers, the tool notices (median of {args.ready_rounds})")
    print(table(("how", "delay", "load"), readiness(args.ready_rounds)))

    extra: dict[str, Any] = {"postgres": {"tmpfs": True}} if args.tmpfs else {}
    extra["projects"] = _projects(args.projects)
    if args.spares:
        extra["database"] = {"spares": args.spares}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {mode: [] for mode in modes} for name in repos
    }
    with tempfile.TemporaryDirectory(prefix="e2e-bench-e2e-") as tmp:
        configs = {name: write_config(Path(tmp) / name, **extra) for name in repos}
        noops = {
            name: {
                count: write_config(
                    Path(tmp) / f"{name}-noop{count}",
                    projects=noop_projects(count),
                    **({"postgres": extra["postgres"]} if "postgres" in extra else {}),
                )
                for count in NOOP_COUNTS
            }
            for name in repos
        }
        where = "/dev/shm (tmpfs = true)" if args.tmpfs else "the default (tmpfs = auto)"
        print(f"\ncluster data folder on {where}; database.spares = {args.spares}")
        try:
            for name, repo in repos.items():
                cold = run_once(configs[name], "seq", repo)
                print(
                    f"cold run of {name} (starts its cluster, builds the templates): "
                    f"{_label('seq')} {cold['wall']:.2f}s, load {cold['load']:.2f}"
                )
            order = list(repos)
            for round_no in range(args.rounds):
                for mode in modes:
                    for name in order:
                        sample = run_once(configs[name], mode, repos[name])
                        sample["fixed_cpu"] = fixed_cpu(noops[name], mode, repos[name])
                        samples[name][mode].append(sample)
                        print(
                            f"  round {round_no + 1}: {name:<8} {_label(mode):<22} "
                            f"{sample['wall']:6.2f}s load {sample['load']:.2f}",
                            file=sys.stderr,
                            flush=True,
                        )
                    order.reverse()
        finally:
            for config in configs.values():
                print(f"stopped and removed cluster {stop_cluster(config)}", file=sys.stderr)
    for name in repos:
        print(f"\n=== {name} ({repos[name]}) ===")
        report(samples[name], args.rounds)
    if len(repos) == 2:
        compare(samples, modes)
    return 0


def _projects(spec: str) -> dict[str, Any]:
    import tomllib

    section = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["e2e_infra"]
    projects: dict[str, Any] = section["projects"]
    if spec == "all":
        return projects
    if spec:
        wanted = [p.strip() for p in spec.split(",") if p.strip()]
        return {p: projects[p] for p in wanted}
    return {p: v for p, v in projects.items() if p not in BROWSER_PROJECTS}


def compare(samples: dict[str, dict[str, list[dict[str, Any]]]], modes: list[str]) -> None:
    base, current = samples["baseline"], samples["current"]
    rows = []
    for mode in modes:
        b = median([s["wall"] for s in base[mode]])
        c = median([s["wall"] for s in current[mode]])
        rows.append((_label(mode), f"{b:.2f}s", f"{c:.2f}s", f"{b / c:.2f}x"))
    print("\n=== baseline vs current, median wall ===")
    print(table(("command", "baseline", "current", "baseline/current"), rows))


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _per_project(sample: dict[str, Any]) -> float:
    """The tool's CPU per project beyond the run's fixed part."""
    runs = len(sample["runs"])
    return (float(sample["tool_cpu"]) * runs - float(sample["fixed_cpu"])) / runs


def report(samples: dict[str, list[dict[str, Any]]], rounds: int) -> None:
    def walls(mode: str) -> list[float]:
        return [s["wall"] for s in samples[mode]]

    def suite_sum(sample: dict[str, Any]) -> float:
        return sum(run["phases"].get("suite", 0.0) for run in sample["runs"].values())

    def tool_share(sample: dict[str, Any]) -> float:
        total = sum(run["duration"] for run in sample["runs"].values())
        return (total - suite_sum(sample)) / total

    base = median(walls("seq")) if "seq" in samples else None
    rows = []
    for mode, items in samples.items():
        wall = median(walls(mode))
        share = median([tool_share(s) for s in items])
        # Sequential only: everything in the wall time that is not a suite (nox, imports, summary).
        outside = median([(s["wall"] - suite_sum(s)) / s["wall"] for s in items])
        rows.append(
            (
                _label(mode),
                spread(walls(mode)),
                f"{base / wall:.2f}x" if base else "-",
                f"{share * 100:.1f}%",
                f"{outside * 100:.1f}%" if mode == "seq" else "-",
                f"{median([s['cpu'] for s in items]):.1f}s",
                f"{median([s['suites_cpu'] for s in items]):.1f}s",
                f"{median([s['tool_cpu'] for s in items]) * 1000:.0f} ms",
                f"{median([s['worker_cpu'] for s in items]) * 1000:.0f} ms",
                f"{median([(s['tool_cpu'] - s['worker_cpu']) for s in items]) * 1000:.0f} ms",
                f"{median([s['fixed_cpu'] for s in items]):.2f}s",
                f"{median([_per_project(s) for s in items]) * 1000:.0f} ms",
                _ms(median_or_none([s["session_cpu"] for s in items])),
                f"{median([s['load'] for s in items]):.2f}",
            )
        )
    print(f"\nwall time, median of {rounds} rounds (min-max)")
    print(
        table(
            (
                "command",
                "wall",
                "speedup",
                "tool phases / run time",
                "non-suite / wall",
                "CPU (no PostgreSQL)",
                "suites+servers CPU",
                "tool CPU / project",
                "of which nox workers",
                "tool CPU / project w/o nox workers",
                "fixed tool CPU / run",
                "tool CPU / project beyond the fixed",
                "session's own CPU / project (run.json)",
                "load",
            ),
            rows,
        )
    )
    for mode, items in samples.items():
        projects = sorted(items[0]["runs"])
        body = []
        for project in projects:
            runs = [s["runs"][project] for s in items if project in s["runs"]]
            cells = [
                f"{median([r['phases'].get(p, 0.0) for r in runs]) * 1000:.0f}" for p in PHASES
            ]
            total = median([r["duration"] for r in runs])
            tool = median([r["duration"] - r["phases"].get("suite", 0.0) for r in runs])
            body.append((project, *cells, f"{total * 1000:.0f}", f"{tool / total * 100:.0f}%"))
        print(f"\nper project, {_label(mode)}: median ms of each phase (run.json)")
        print(table(("project", *PHASES, "total", "tool %"), body))
    if "seq" in samples and len(samples) > 1:
        print("\ntool phases, sequential vs parallel: median ms over projects and rounds")
        rows = []
        for phase in TOOL_PHASES:
            cells = []
            for items in samples.values():
                cells.append(
                    median([r["phases"].get(phase, 0.0) for s in items for r in s["runs"].values()])
                )
            ratios = [f"{c / cells[0]:.2f}x" if cells[0] else "-" for c in cells[1:]]
            rows.append((phase, *(f"{c * 1000:.0f}" for c in cells), *ratios))
        others = [_label(m) for m in samples if m != "seq"]
        heads = ("phase", *(_label(m) for m in samples), *(f"{o} / seq" for o in others))
        print(table(heads, rows))
    verdicts = []
    for mode, items in samples.items():
        cpu = median([s["tool_cpu"] for s in items]) * 1000
        own = median([s["tool_cpu"] - s["worker_cpu"] for s in items]) * 1000
        per = median([_per_project(s) for s in items]) * 1000
        fixed = median([s["fixed_cpu"] for s in items])
        session = _ms(median_or_none([s["session_cpu"] for s in items]))
        verdicts.append(
            f"tool CPU/project {_label(mode)}: {per:.0f} ms per project (target <= 100 ms; "
            f"the session's own {session}) + {fixed:.2f}s per run; all of it over "
            f"{len(items[0]['runs'])} projects {cpu:.0f} ms, {own:.0f} ms without nox's own -j "
            "workers"
        )
    if "seq" in samples:
        seq_tool = median(
            [
                sum(r["duration"] - r["phases"].get("suite", 0.0) for r in s["runs"].values())
                for s in samples["seq"]
            ]
        )
        for mode in PARALLEL:
            if mode in samples:
                par_tool = median(
                    [
                        sum(
                            r["duration"] - r["phases"].get("suite", 0.0)
                            for r in s["runs"].values()
                        )
                        for s in samples[mode]
                    ]
                )
                verdicts.append(
                    f"tool phases {_label(mode)} {par_tool / seq_tool:.2f}x sequential "
                    "(target <= 1.3x)"
                )
        cores = os.cpu_count() or 1
        suites = median([s["suites_cpu"] for items in samples.values() for s in items])
        seq_cpu = median([s["cpu"] for s in samples["seq"]])
        verdicts.append(
            f"floor: suites+servers alone {suites:.1f}s CPU / {cores} cores = {suites / cores:.2f}s"
        )
        for mode in PARALLEL:
            if mode in samples:
                par_cpu = median([s["cpu"] for s in samples[mode]])
                # A CPU-bound sequential run takes its CPU time; the parallel one at least its CPU
                # spread over the cores: the best speedup this run's CPU allows.
                verdicts.append(
                    f"ceiling {_label(mode)}: {seq_cpu:.1f}s CPU sequential / ({par_cpu:.1f}s / "
                    f"{cores} cores) = {seq_cpu / (par_cpu / cores):.2f}x"
                )
    if "seq" in samples:
        share = median([tool_share(s) for s in samples["seq"]])
        verdicts.append(f"tool phases {share * 100:.1f}% of run time (target < 20%)")
        for mode in PARALLEL:
            if mode in samples:
                speedup = median(walls("seq")) / median(walls(mode))
                verdicts.append(f"speedup {_label(mode)} {speedup:.2f}x (target >= 1.7x)")
    if verdicts:
        print("\ne2e-infra:\n  " + "\n  ".join(verdicts))


if __name__ == "__main__":
    sys.exit(main())
