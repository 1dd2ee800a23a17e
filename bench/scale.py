"""Benchmark: how the tool's overhead per project grows with the number of projects.

    python bench/scale.py                       # 17 and 100 projects, without and with a database
    python bench/scale.py --counts 17,100 --rounds 3 --database both
    python bench/scale.py --jobs 2              # nox -j 2 instead of -j auto
    python bench/scale.py --runner all,nox      # invoke e2e.all and nox -j, side by side
    python bench/scale.py --baseline REV        # and the same commands of revision REV, interleaved

Synthetic projects: no servers, the suite is ``true``, so everything measured is the tool (plus nox
and Python start-up). Each configuration runs ``python -m nox -j auto -t e2e`` exactly as a user
would, against a private copy of the config (state and results in a temporary folder, ports
23000-24999; 100 projects x 2 ports fit). With ``database = true`` all projects clone one shared
template (the demo schema and default seed), built by a warm-up run that is not counted.

Overhead per project = wall time / projects (the suites take ~1 ms). Also shown: the median of
each ``run.json`` phase and of the whole in-process session (``duration``), and the same for the
last tenth of the projects (do later projects pay more: registry size, lock contention?).

Target (issue #6): overhead per project grows by at most 1.5x from 17 to 100 projects.

The CPU per project has a fixed part (one interpreter importing nox or invoke, the warm server's
imports, the summary) spread over the projects, and a marginal part that every further project
adds. The marginal CPU per project is the slope between the smallest and the largest count:
(CPU(high) - CPU(low)) / (high - low), printed per runner (issue #14: <= 100 ms). With the nox
runner, the same slope of ``nox -j`` over sessions that do nothing (a generated noxfile) is nox's
own cost per session (a fresh ``python -m nox`` worker each): printed beside it, with the
difference, the tool's share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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

NOX = [sys.executable, "-m", "nox", "-f", str(REPO / "noxfile.py")]
TOOL_PHASES = ("ports", "database", "teardown")


def projects(count: int, database: bool) -> dict[str, Any]:
    return {
        f"p{i:03d}": {"command": "true", "servers": [], "database": database, "timeout": 120}
        for i in range(count)
    }


def configure(tmp: Path, count: int, database: bool, tmpfs: bool) -> Path:
    folder = tmp / f"{count}-{'db' if database else 'nodb'}"
    # One state folder for all: one cluster and one template, as in a real checkout.
    return write_config(
        folder,
        projects=projects(count, database),
        state_dir=str(tmp / "state"),
        **({"postgres": {"tmpfs": True}} if tmpfs else {}),
    )


def command(runner: str, jobs: str, checkout: Path = REPO) -> list[str]:
    if runner == "all":  # the projects on a pool of warm workers
        return [sys.executable, "-m", "invoke", "-r", str(checkout), "e2e.all", "--jobs", jobs]
    return [
        sys.executable,
        "-m",
        "nox",
        "-f",
        str(checkout / "noxfile.py"),
        "-j",
        jobs,
        "-t",
        "e2e",
    ]


def baseline_checkout(tmp: Path, rev: str) -> Path:
    """A checkout of ``rev`` (a detached git worktree under ``tmp``), to run beside this one."""
    where = tmp / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), rev],
        check=True,
        capture_output=True,
    )
    return where


def remove_checkout(where: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
        check=False,
        capture_output=True,
    )


FLOOR_NOXFILE = """\
import nox

nox.options.default_venv_backend = "none"
for number in range({count}):
    nox.session(name=f"e2e-p{{number:03d}}", python=False, tags=["e2e"], allow_parallel=True)(
        lambda session: None
    )
"""


def nox_floor(tmp: Path, count: int, jobs: str) -> float:
    """CPU seconds of ``nox -j`` running ``count`` sessions that do nothing: nox's own share."""
    folder = tmp / f"floor-{count}"
    folder.mkdir(exist_ok=True)
    (folder / "noxfile.py").write_text(FLOOR_NOXFILE.format(count=count))
    argv = [sys.executable, "-m", "nox", "-f", str(folder / "noxfile.py"), "-j", jobs, "-t", "e2e"]
    timed = run_timed(argv, env=dict(os.environ), cwd=folder)
    if timed.returncode != 0:
        raise SystemExit(f"the nox floor run failed: {timed.output[-2000:]}")
    return timed.cpu


def run_once(config: Path, jobs: str, runner: str = "nox", checkout: Path = REPO) -> dict[str, Any]:
    results = config.parent / "results"
    shutil.rmtree(results, ignore_errors=True)
    env = bench_env(config, E2E_SUMMARY="0")
    if checkout != REPO:  # that revision's package, not the installed one
        env["PYTHONPATH"] = str(checkout)
    timed = run_timed(command(runner, jobs, checkout), env=env, cwd=checkout)
    runs = []
    for path in sorted([*results.glob("*/run.json"), *results.glob("*/*/run.json")]):
        runs.append(json.loads(path.read_text()))
    failed = [r["project"] for r in runs if r["result"] != "passed"]
    if timed.returncode != 0 or failed:
        print(timed.output[-4000:], file=sys.stderr)
        raise SystemExit(f"{config} failed (exit {timed.returncode}; failed {failed[:5]})")
    registry = config.parent.parent / "state"
    size = (registry / "leases.json").stat().st_size if (registry / "leases.json").is_file() else 0
    return {
        "wall": timed.seconds,
        "cpu": timed.cpu,
        "load": timed.load,
        "runs": runs,
        "registry": size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="17,100")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--database", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--jobs", default="auto", help="nox -j / e2e.all --jobs (default auto)")
    parser.add_argument(
        "--runner", default="nox", help="nox (nox -j), all (invoke e2e.all), or both: all,nox"
    )
    parser.add_argument(
        "--tmpfs", action="store_true", help="postgres.tmpfs = true: the cluster on /dev/shm"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run each command of git revision REV, interleaved with this checkout's",
    )
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    runners = [r.strip() for r in args.runner.split(",") if r.strip()]
    if set(runners) - {"nox", "all"}:
        parser.error("--runner: nox, all, or both")
    variants = {"no": [False], "yes": [True], "both": [False, True]}[args.database]

    print(f"machine: {machine()}; load average at start {load_average():.2f}")
    where = "/dev/shm (tmpfs = true)" if args.tmpfs else "the default (tmpfs = auto)"
    print(f"cluster data folder on {where}")
    samples: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    floors: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="e2e-bench-scale-") as name:
        tmp = Path(name)
        configs = {(n, db): configure(tmp, n, db, args.tmpfs) for db in variants for n in counts}
        checkouts = {"": REPO}
        if args.baseline:
            checkouts[f"@{args.baseline}"] = baseline_checkout(tmp, args.baseline)
        try:
            if True in variants:
                warm = configure(tmp, 1, True, args.tmpfs)
                timed = run_once(warm, args.jobs, runners[0])
                print(f"warm-up (cluster start, template build): {timed['wall']:.2f}s")
            for round_no in range(args.rounds):
                for (count, database), config in configs.items():
                    for runner, (rev, checkout) in (
                        (r, c) for r in runners for c in checkouts.items()
                    ):  # interleaved: load falls on all alike
                        sample = run_once(config, args.jobs, runner, checkout)
                        samples.setdefault((runner + rev, count, database), []).append(sample)
                        print(
                            f"  round {round_no + 1}: {runner + rev:<3} {count:>3} projects, "
                            f"database={database!s:<5} {sample['wall']:6.2f}s "
                            f"load {sample['load']:.2f}",
                            file=sys.stderr,
                            flush=True,
                        )
                if "nox" in runners:  # nox's own cost per session, with sessions doing nothing
                    for count in counts:
                        floors.setdefault(count, []).append(nox_floor(tmp, count, args.jobs))
        finally:
            if True in variants:
                print(f"stopped and removed cluster {stop_cluster(configs[(counts[0], True)])}")
            for rev, checkout in checkouts.items():
                if rev:
                    remove_checkout(checkout)
    report(samples, args, {count: median(cpus) for count, cpus in floors.items()})
    return 0


def _phase_ms(runs: list[dict[str, Any]], phase: str) -> float:
    return median([r["phases"].get(phase, 0.0) for r in runs]) * 1000


def report(
    samples: dict[tuple[str, int, bool], list[dict[str, Any]]],
    args: argparse.Namespace,
    floors: dict[int, float],
) -> None:
    rows = []
    per_project: dict[tuple[str, int, bool], float] = {}
    cpu: dict[tuple[str, int, bool], float] = {}
    for (runner, count, database), items in samples.items():
        walls = [s["wall"] for s in items]
        per = median(walls) / count
        per_project[(runner, count, database)] = per
        cpu[(runner, count, database)] = median([s["cpu"] for s in items])
        runs = [r for s in items for r in s["runs"]]
        late = [
            r
            for s in items
            for r in sorted(s["runs"], key=lambda r: r["started_at"])[-max(1, count // 10) :]
        ]
        rows.append(
            (
                _runner_label(runner, args.jobs),
                count,
                "yes" if database else "no",
                spread(walls),
                f"{per * 1000:.0f}",
                f"{median([s['cpu'] for s in items]) / count * 1000:.0f}",
                *(f"{_phase_ms(runs, p):.0f}" for p in TOOL_PHASES),
                f"{_phase_ms(runs, 'suite'):.0f}",
                f"{median([r['duration'] for r in runs]) * 1000:.0f}",
                f"{median([r['duration'] for r in late]) * 1000:.0f}",
                f"{max(s['registry'] for s in items)}",
                f"{median([s['load'] for s in items]):.2f}",
            )
        )
    print(f"\nmedian of {args.rounds} rounds (min-max); ms per project")
    print(
        table(
            (
                "command",
                "projects",
                "database",
                "wall",
                "wall/project",
                "CPU/project",
                *TOOL_PHASES,
                "suite",
                "session",
                "session, last 10%",
                "registry bytes after",
                "load",
            ),
            rows,
        )
    )
    counts = sorted({c for _, c, _ in samples})
    verdicts = []
    for runner in sorted({r for r, _, _ in samples}):
        for database in sorted({d for _, _, d in samples}):
            low, high = (runner, counts[0], database), (runner, counts[-1], database)
            if low in per_project and high in per_project and low != high:
                growth = per_project[high] / per_project[low]
                marginal = (cpu[high] - cpu[low]) / (counts[-1] - counts[0])
                verdicts.append(
                    f"{_runner_label(runner, args.jobs)}, database={'yes' if database else 'no'}: "
                    f"overhead per project {counts[0]} -> {counts[-1]}: {growth:.2f}x "
                    f"(target <= 1.5x); marginal CPU per project {marginal * 1000:.0f} ms "
                    "(target <= 100 ms)"
                )
                if runner == "nox" and counts[0] in floors and counts[-1] in floors:
                    own = (floors[counts[-1]] - floors[counts[0]]) / (counts[-1] - counts[0])
                    verdicts.append(
                        f"  of which nox's own: {own * 1000:.0f} ms per session (nox -j "
                        f"{args.jobs} with sessions that do nothing); the tool's share "
                        f"{(marginal - own) * 1000:.0f} ms"
                    )
    for (runner, count, database), items in sorted(samples.items()):
        name, _, rev = runner.partition("@")
        base = samples.get((f"{name}@{args.baseline}", count, database)) if not rev else None
        if base:
            new_wall = median([s["wall"] for s in items])
            old_wall = median([s["wall"] for s in base])
            verdicts.append(
                f"{_runner_label(name, args.jobs)}, {count} projects, "
                f"database={'yes' if database else 'no'}: {new_wall:.2f}s against "
                f"{old_wall:.2f}s at {args.baseline}: {new_wall / old_wall:.2f}x wall time"
            )
    if verdicts:
        print("\ne2e-infra:\n  " + "\n  ".join(verdicts))


def _runner_label(runner: str, jobs: str) -> str:
    name, _, rev = runner.partition("@")
    label = f"invoke e2e.all --jobs {jobs}" if name == "all" else f"nox -j {jobs} -t e2e"
    return f"{label} ({rev})" if rev else label


if __name__ == "__main__":
    sys.exit(main())
