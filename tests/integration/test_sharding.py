"""CI sharding for real: ``invoke e2e.matrix`` plans, ``invoke e2e.all`` runs each shard.

Shards run as the workflow's jobs do: each in a fresh copy of the config (its own results and
state), through the real invoke and nox, with suites that only append their project's name to a
shared file. The plan job plans once; each shard runs exactly its matrix entry's ``--projects``,
whether or not its copy of the durations arrived. Run one after another in one checkout,
``--shard i/N`` follows one plan, whatever the earlier shards recorded. Together the shards must run
every project exactly once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from support.cli import CLI, config_environ

from e2e_infra.config import Config, load_config
from e2e_infra.plan.matrix import plan_shards
from e2e_infra.results.durations import merge_durations, read_durations, record_duration
from e2e_infra.results.layout import DURATIONS as DURATIONS_FILE

pytestmark = pytest.mark.integration

PORT_RANGE = "19100-19199"
DURATIONS = {"alpha": 50.0, "beta": 40.0, "gamma": 30.0, "delta": 20.0, "epsilon": 10.0}
UNKNOWN = "zeta"  # never ran: gets the median
ALL = sorted([*DURATIONS, UNKNOWN])

RECORDER = """\
import sys
with open(sys.argv[2], "a") as out:
    out.write(sys.argv[1] + "\\n")
"""


def write_workspace(folder: Path, ran_file: Path, durations: Path | None) -> Path:
    """A checkout's config; its results start with a copy of ``durations`` (the CI cache)."""
    folder.mkdir(parents=True)
    (folder / "record.py").write_text(RECORDER)
    body = textwrap.dedent(
        f"""
        [tool.e2e_infra]
        state_dir = "{folder / "state"}"
        results_dir = "{folder / "results"}"
        port_range = "{PORT_RANGE}"
        """
    )
    for name in [*DURATIONS, UNKNOWN]:
        body += textwrap.dedent(
            f"""
            [tool.e2e_infra.projects.{name}]
            command = "{{python}} record.py {name} {ran_file}"
            cwd = "{folder}"
            servers = []
            database = false
            """
        )
    (folder / "pyproject.toml").write_text(body)
    if durations is not None:
        (folder / "results").mkdir()
        shutil.copy(durations, folder / "results" / DURATIONS_FILE)
    return folder / "pyproject.toml"


def config_of(path: Path) -> Config:
    return load_config(path, environ={})


def recorded_durations(tmp_path: Path) -> Path:
    """A durations file as an earlier run's report job cached it."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(f'[tool.e2e_infra]\nresults_dir = "{folder}"\n')
    cache = config_of(folder / "pyproject.toml")
    for name, seconds in DURATIONS.items():
        record_duration(cache, name, seconds, at=1_700_000_000.0)
    return folder / DURATIONS_FILE


def invoke(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = config_environ(config, CI="true")
    return CLI.invoke(*args, env=env, cwd=config.parent, timeout=180)


def ran_since(ran_file: Path, before: int) -> list[str]:
    return ran_file.read_text().split()[before:] if ran_file.exists() else []


def count(ran_file: Path) -> int:
    return len(ran_file.read_text().split()) if ran_file.exists() else 0


def test_the_ci_recipe_runs_each_project_once_even_without_durations(tmp_path: Path) -> None:
    durations = recorded_durations(tmp_path)
    ran_file = tmp_path / "ran.txt"

    # The plan job: restores the durations, plans once.
    plan_config = write_workspace(tmp_path / "plan", ran_file, durations)
    proc = invoke(plan_config, "e2e.matrix", "--shards", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    matrix = json.loads(proc.stdout)["include"]
    assert [entry["shard"] for entry in matrix] == ["1/3", "2/3", "3/3"]
    # LPT over 50, 40, 30, 20, 10 and zeta at the median (30): 50+10, 40+20, 30+30 = 60 each.
    assert [e["estimate_seconds"] for e in matrix] == [60.0, 60.0, 60.0]

    # The shard jobs, each in a fresh checkout; shard 2's durations download "failed": it has
    # none and would plan differently, but it is told its projects and never plans.
    shard_results = []
    for entry in matrix:
        index = entry["index"]
        job = write_workspace(tmp_path / f"job{index}", ran_file, None if index == 2 else durations)
        before = count(ran_file)
        proc = invoke(job, "e2e.all", "--projects", entry["projects"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(ran_since(ran_file, before)) == sorted(entry["projects"].split(","))
        shard_results.append(job.parent / "results")
        # What the shard's sessions recorded: its own projects, each once more.
        recorded = read_durations(config_of(job))
        assert set(entry["projects"].split(",")) <= set(recorded)
    assert sorted(ran_file.read_text().split()) == ALL  # every project, none twice

    # The report job: the cached durations plus every shard's, merged into one file.
    report = config_of(write_workspace(tmp_path / "report", ran_file, durations))
    merge_durations(report, [results / DURATIONS_FILE for results in shard_results])
    data = json.loads((report.results_dir / DURATIONS_FILE).read_text())["projects"]
    assert {p: len(entries) for p, entries in data.items()} == {
        **{p: 2 for p in DURATIONS},
        UNKNOWN: 1,
    }


def test_shards_one_after_another_in_one_checkout_run_each_project_once(tmp_path: Path) -> None:
    durations = recorded_durations(tmp_path)
    ran_file = tmp_path / "ran.txt"
    config_path = write_workspace(tmp_path / "w", ran_file, durations)
    config = config_of(config_path)
    first_plan = plan_shards(ALL, read_durations(config), 3)

    for index in (1, 2, 3):
        before = count(ran_file)
        proc = invoke(config_path, "e2e.all", "--shard", f"{index}/3")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert tuple(sorted(ran_since(ran_file, before))) == tuple(
            sorted(first_plan[index - 1].projects)
        )
        assert f"shard {index}/3:" in proc.stderr
    assert sorted(ran_file.read_text().split()) == ALL
    # Re-planning from what the shards recorded meanwhile would have moved projects around.
    assert plan_shards(ALL, read_durations(config), 3) != first_plan

    # The same with the matrix's explicit lists, one after another in this checkout.
    ran_file.unlink()
    proc = invoke(config_path, "e2e.matrix", "--shards", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    for entry in json.loads(proc.stdout)["include"]:
        proc = invoke(config_path, "e2e.all", "--projects", entry["projects"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(ran_file.read_text().split()) == ALL


def test_an_explicit_empty_project_list_is_refused(tmp_path: Path) -> None:
    ran_file = tmp_path / "ran.txt"
    config = write_workspace(tmp_path / "w", ran_file, None)
    for value in ("", " , "):
        proc = invoke(config, "e2e.all", "--projects", value)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "names no project" in proc.stderr
        assert "leave --projects out to run every project" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not ran_file.exists()


def test_the_matrix_table_json_and_a_bad_shard(tmp_path: Path) -> None:
    config = write_workspace(tmp_path / "w", tmp_path / "ran.txt", recorded_durations(tmp_path))
    proc = invoke(config, "e2e.matrix", "--shards", "2")
    assert proc.returncode == 0, proc.stderr
    assert "e2e.all --projects <its projects>, or --shard i/2" in proc.stdout
    assert f"median assumed): {UNKNOWN}" in proc.stdout
    # More shards than projects: the empty ones are no jobs (they would get an empty list).
    proc = invoke(config, "e2e.matrix", "--shards", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(proc.stdout)["include"]
    assert len(entries) == len(ALL) and all(entry["projects"] for entry in entries)
    proc = invoke(config, "e2e.all", "--shard", "3/2")
    assert proc.returncode == 2
    assert "i/N" in proc.stderr
    assert not (tmp_path / "ran.txt").exists()
