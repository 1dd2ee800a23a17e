"""The console script and ``python -m e2e_infra``: the same task tree as ``invoke``, no tasks.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_environ, write_pyproject

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _tasks(argv: list[str], cwd: Path) -> list[str]:
    out = subprocess.run(
        argv, cwd=cwd, env=clean_environ(), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # The heading differs ("Available tasks:" / "Subcommands:"); the tasks must not.
    return [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.strip()]


def test_every_entry_point_lists_the_same_tasks() -> None:
    script = shutil.which("e2e-infra") or str(Path(sys.executable).parent / "e2e-infra")
    by_invoke = _tasks([sys.executable, "-m", "invoke", "--list"], ROOT)
    assert {"init", "e2e.init", "db.allocate", "ports.release", "e2e.all"} <= set(by_invoke)
    assert _tasks([script, "--list"], ROOT) == by_invoke
    assert _tasks([sys.executable, "-m", "e2e_infra", "--list"], ROOT) == by_invoke


def test_tasks_run_where_no_tasks_py_exists(tmp_path: Path) -> None:
    write_pyproject(tmp_path, port_range="15480-15489")
    assert not (tmp_path / "tasks.py").exists()
    env = clean_environ()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "e2e_infra", *args]
        return subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    got = run("ports.allocate", "--project", "auth_tests", "--json")
    assert got.returncode == 0, got.stderr
    ports = json.loads(got.stdout)["ports"]
    assert ports and all(15480 <= p <= 15489 for p in ports.values())
    assert run("ports.release", "--project", "auth_tests").returncode == 0
    bad = run("ports.allocate", "--project", "Bad-Name")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
