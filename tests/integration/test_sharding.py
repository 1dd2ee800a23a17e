"""CI sharding for real: ``invoke e2e.matrix`` plans, ``invoke e2e.all --shard i/N`` runs.

Each shard runs as a CI job would: from its own copy of the recorded ``run.json`` files (what the
workflow downloads before the shard jobs start), through the real invoke and nox, with suites that
only append their project's name to a shared file. Together the shards must run every project
exactly once, each shard exactly what the matrix said.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import clean_environ

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PORT_RANGE = "19100-19199"
DURATIONS = {"alpha": 50.0, "beta": 40.0, "gamma": 30.0, "delta": 20.0, "epsilon": 10.0}
UNKNOWN = "zeta"  # never ran: gets the median

RECORDER = """\
import sys
with open(sys.argv[2], "a") as out:
    out.write(sys.argv[1] + "\\n")
"""


def write_workspace(folder: Path, ran_file: Path, recorded: Path) -> Path:
    """A config whose results start as a copy of ``recorded`` (the CI artifact)."""
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
    shutil.copytree(recorded, folder / "results")
    return folder / "pyproject.toml"


def record_durations(results: Path) -> None:
    for name, seconds in DURATIONS.items():
        (results / name).mkdir(parents=True)
        (results / name / "run.json").write_text(
            json.dumps(
                {
                    "project": name,
                    "run_id": "earlier",
                    "result": "passed",
                    "duration": seconds,
                    "started_at": 1_700_000_000.0,
                    "phases": {"suite": seconds},
                }
            )
        )


def invoke(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), *args],
        cwd=config.parent,
        env=clean_environ({"E2E_CONFIG": str(config), "CI": "true"}),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_shards_cover_every_project_exactly_once_as_the_matrix_says(tmp_path: Path) -> None:
    recorded = tmp_path / "artifact"
    record_durations(recorded)
    ran_file = tmp_path / "ran.txt"

    plan_config = write_workspace(tmp_path / "plan", ran_file, recorded)
    proc = invoke(plan_config, "e2e.matrix", "--shards", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    matrix = json.loads(proc.stdout)
    assert [entry["shard"] for entry in matrix["include"]] == ["1/3", "2/3", "3/3"]
    planned = {e["shard"]: set(filter(None, e["projects"].split(","))) for e in matrix["include"]}
    # LPT over 50, 40, 30, 20, 10 and zeta at the median (30): 50+10, 40+20, 30+30 = 60 each.
    assert [e["estimate_seconds"] for e in matrix["include"]] == [60.0, 60.0, 60.0]

    for shard, projects in planned.items():
        before = ran_file.read_text().split() if ran_file.exists() else []
        job = write_workspace(tmp_path / f"job{shard[0]}", ran_file, recorded)
        proc = invoke(job, "e2e.all", "--shard", shard)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ran_now = ran_file.read_text().split()[len(before) :]
        assert sorted(ran_now) == sorted(projects), shard
        assert f"shard {shard}:" in proc.stderr

    ran = ran_file.read_text().split()
    assert sorted(ran) == sorted([*DURATIONS, UNKNOWN])  # every project, none twice


def test_the_matrix_table_and_a_bad_shard(tmp_path: Path) -> None:
    recorded = tmp_path / "artifact"
    record_durations(recorded)
    config = write_workspace(tmp_path / "w", tmp_path / "ran.txt", recorded)
    proc = invoke(config, "e2e.matrix", "--shards", "2")
    assert proc.returncode == 0, proc.stderr
    assert "e2e.all --shard i/2" in proc.stdout
    assert f"median assumed): {UNKNOWN}" in proc.stdout
    proc = invoke(config, "e2e.all", "--shard", "3/2")
    assert proc.returncode == 2
    assert "i/N" in proc.stderr
    assert not (tmp_path / "ran.txt").exists()
