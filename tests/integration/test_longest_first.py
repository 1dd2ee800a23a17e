"""Longest first (issue 25): projects start in decreasing recorded duration, and the wall time
shows it. Real runs of sleeping suites (no database, no server): the order is the only variable.

Config order a, b, c (1 s each), d (3 s) is the worst case on two lanes: d starts last and runs
alone at the end (4 s). Once their durations are recorded, d starts first and the lanes end
together (3 s).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.cli import CLI, config_environ
from support.configs import write_pyproject

pytestmark = pytest.mark.integration

SECONDS = {"lf_a": 1.0, "lf_b": 1.0, "lf_c": 1.0, "lf_d": 3.0}


def _config(tmp_path: Path) -> Path:
    projects = {
        name: {"command": f"{{python}} -c 'import time; time.sleep({s})'", "database": False}
        for name, s in SECONDS.items()
    }
    return write_pyproject(tmp_path, port_range="16330-16339", projects=projects)


def _all(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.invoke("e2e.all", *args, env=config_environ(config, **env), timeout=180)


def _spans(results: Path, run: str) -> dict[str, tuple[float, float]]:
    spans = {}
    for name in SECONDS:
        record = json.loads((results / run / name / "run.json").read_text())
        spans[name] = (record["started_at"], record["started_at"] + record["duration"])
    return spans


def test_recorded_durations_start_the_longest_first_and_shorten_the_wall_time(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    results = tmp_path / "results"
    first = _all(config, "--jobs", "2", E2E_RUN_ID="first")
    assert first.returncode == 0, first.stdout + first.stderr
    worst = _spans(results, "first")
    # Nothing recorded yet: the given (config) order, d last.
    assert sorted(worst, key=lambda n: worst[n][0])[-1] == "lf_d"

    planned = _all(config, "--jobs", "2", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "start order, the longest recorded first" in planned.stdout
    order = planned.stdout.split("before them): ")[1].split("\n")[0].split(", ")
    assert order[0] == "lf_d" and sorted(order) == sorted(SECONDS), planned.stdout

    second = _all(config, "--jobs", "2", E2E_RUN_ID="second")
    assert second.returncode == 0, second.stdout + second.stderr
    best = _spans(results, "second")
    assert min(best, key=lambda n: best[n][0]) == "lf_d"
    wall_worst = max(e for _, e in worst.values()) - min(s for s, _ in worst.values())
    wall_best = max(e for _, e in best.values()) - min(s for s, _ in best.values())
    assert wall_best < wall_worst - 0.6, (wall_worst, wall_best)

    # The summary says where the wall time went: the tail shrank with the order.
    text = second.stdout + second.stderr
    assert "where the wall time went" in text and "idle lanes at the end (the tail)" in text
    tail = float(text.split("(the tail) ")[1].split("s;")[0])
    first_tail = float((first.stdout + first.stderr).split("(the tail) ")[1].split("s;")[0])
    assert tail < first_tail, (first_tail, tail)
    report = (results / "second" / "report.html").read_text()
    assert "where the wall time went" in report and "critical path" in report


def test_nox_registers_its_sessions_longest_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "results").mkdir()
    durations = {"lf_a": 1.0, "lf_b": 5.0, "lf_c": 2.0}  # lf_d never timed: it goes first
    (tmp_path / "results" / "durations.json").write_text(
        json.dumps(
            {
                "version": 1,
                "projects": {p: [{"at": 1.0, "seconds": s}] for p, s in durations.items()},
            }
        )
    )
    listed = CLI.nox("-l", "--json", env=config_environ(config), timeout=120)
    assert listed.returncode == 0, listed.stderr
    order = [s["session"] for s in json.loads(listed.stdout) if s["session"].startswith("e2e-")]
    assert order == ["e2e-lf_d", "e2e-lf_b", "e2e-lf_c", "e2e-lf_a"]
