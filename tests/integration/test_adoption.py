"""Adopting the tool as a team would: the built wheel, installed (not editable) in a fresh virtual
environment outside this checkout, `e2e-infra init` in a new git repository, then its own E2E
projects through `nox -j auto -t e2e` and `invoke db.allocate --json`; nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import uv
from support import FIXTURES_DIR, REPO_ROOT
from support.cli import CLI, clean_environ
from support.clusters import running_cluster

import e2e_infra

pytestmark = pytest.mark.integration

FIXTURE = FIXTURES_DIR / "adopter"


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = CLI.run(argv, env=env, cwd=cwd, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel of this checkout (not editable) and its
    dependencies at the versions of the committed lock, as a team's CI would install it, with
    pytest (the team's own test runner).

    Nothing comes from the interpreter running the tests: no system site-packages, so a
    dependency the wheel fails to declare fails here. uv installs them (from its cache when warm).
    """
    base = tmp_path_factory.mktemp("adoption")
    wheels = base / "wheels"
    env = clean_environ()
    env.pop("PYTHONPATH", None)  # the package must come from the wheel, not a checkout
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    _run([*pip_wheel, str(REPO_ROOT)], base, env)
    shutil.rmtree(REPO_ROOT / "build", ignore_errors=True)  # setuptools' build folder
    (wheel,) = wheels.glob("e2e_infra-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], base, env)
    python = str(venv / "bin" / "python")
    lock = REPO_ROOT / "requirements-dev.txt"
    # The wheel, and pytest: the team's own test runner (its suites are pytest files).
    install = ["pip", "install", "-q", "--python", python, "-c", str(lock), str(wheel), "pytest"]
    _run([uv.find_uv_bin(), *install], base, env, timeout=600)
    where = _run([python, "-c", "import e2e_infra; print(e2e_infra.__file__)"], base, env)
    assert Path(where.strip()).is_relative_to(venv), where
    outside = _run([python, "-c", "import sys; print(sys.base_prefix != sys.prefix)"], base, env)
    assert outside.strip() == "True"
    return venv


@pytest.fixture
def adopter(tmp_path: Path, venv: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A new git repository with a tiny server, a migration and two suites; no tool files."""
    repo = tmp_path / "shop"
    shutil.copytree(FIXTURE, repo)
    (repo / "pyproject.toml").write_text('[project]\nname = "shop"\nversion = "1.0"\n')
    env = clean_environ({"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    env.pop("PYTHONPATH", None)
    _run(["git", "init", "-q"], repo, env)
    yield repo, env
    config = e2e_infra.load_config(repo / "pyproject.toml")
    with running_cluster(config, start=False):
        pass  # stop the repository's embedded cluster and remove its folders


def test_init_then_the_projects_run_from_the_installed_wheel(
    adopter: tuple[Path, dict[str, str]], venv: Path
) -> None:
    repo, env = adopter
    python = str(venv / "bin" / "python")
    dry = _run([str(venv / "bin" / "e2e-infra"), "init", "--dry-run"], repo, env)
    assert "would create tasks.py" in dry and not (repo / "tasks.py").exists()

    out = _run([str(venv / "bin" / "e2e-infra"), "init"], repo, env)
    assert "append to pyproject.toml" in out
    for name in ("tasks.py", "noxfile.py", ".env.example", ".gitignore"):
        assert (repo / name).is_file(), name
    assert len((repo / "tasks.py").read_text().splitlines()) <= 10
    assert len((repo / "noxfile.py").read_text().splitlines()) <= 10
    again = _run([python, "-m", "e2e_infra", "init"], repo, env)
    assert "nothing to do" in again

    # The team fills in the skeleton: its server, migrations and projects.
    pyproject = repo / "pyproject.toml"
    text = pyproject.read_text()
    start = text.index("[tool.e2e_infra]")
    pyproject.write_text(text[:start] + (repo / "e2e-config.toml").read_text())

    listed = _run([python, "-m", "nox", "-l", "--json"], repo, env)
    assert {s["session"] for s in json.loads(listed)} >= {"e2e-smoke", "e2e-notes"}
    argv = [python, "-m", "nox", "-j", "auto", "-t", "e2e"]
    run = CLI.run(argv, env=env, cwd=repo, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "e2e-smoke" in run.stderr and "e2e-notes" in run.stderr

    got = json.loads(
        _run([python, "-m", "invoke", "db.allocate", "--project", "smoke", "--json"], repo, env)
    )
    assert got["project"] == "smoke" and got["database_url"].startswith("postgresql://")
    _run([python, "-m", "invoke", "db.release", "--project", "smoke"], repo, env)

    # Nothing left behind: no lease, no project database, no process of the repository's.
    leases = json.loads(_run([python, "-m", "invoke", "ports.list", "--json"], repo, env))
    assert [x for x in leases["leases"] if x["project"] != "postgres"] == []
    databases = json.loads(_run([python, "-m", "invoke", "db.list", "--json"], repo, env))
    assert [d["name"] for d in databases["databases"] if d["kind"] != "template"] == []
    left = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(repo) in cmdline and not (proc.info["name"] or "").startswith("postgres"):
            left.append(cmdline)
    assert left == []
