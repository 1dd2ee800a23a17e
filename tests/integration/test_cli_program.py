"""The console script and ``python -m e2e_infra``: the same task tree as ``invoke``, no tasks.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import CLI, Cli, clean_environ
from support.configs import write_pyproject

pytestmark = pytest.mark.integration


def _tasks(argv: list[str], cwd: Path) -> list[str]:
    out = CLI.run(argv, env=clean_environ(), cwd=cwd, timeout=60, check=True).stdout
    # The heading differs ("Available tasks:" / "Subcommands:"); the tasks must not.
    return [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.strip()]


def test_every_entry_point_lists_the_same_tasks(cli: Cli, repo_root: Path) -> None:
    script = shutil.which("e2e-infra") or str(Path(sys.executable).parent / "e2e-infra")
    by_invoke = _tasks(cli.invoke_argv("--list", search_root=False), repo_root)
    assert {"init", "e2e.init", "db.allocate", "ports.release", "e2e.all"} <= set(by_invoke)
    assert _tasks([script, "--list"], repo_root) == by_invoke
    assert _tasks(cli.console_argv("--list"), repo_root) == by_invoke


def test_tasks_run_where_no_tasks_py_exists(tmp_path: Path, cli: Cli) -> None:
    write_pyproject(tmp_path, port_range="15480-15489")
    assert not (tmp_path / "tasks.py").exists()
    env = clean_environ()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli.console(*args, env=env, cwd=tmp_path, timeout=60, check=False)

    got = run("ports.allocate", "--project", "auth_tests", "--json")
    assert got.returncode == 0, got.stderr
    ports = json.loads(got.stdout)["ports"]
    assert ports and all(15480 <= p <= 15489 for p in ports.values())
    assert run("ports.release", "--project", "auth_tests").returncode == 0
    bad = run("ports.allocate", "--project", "Bad-Name")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
