"""The pre-push hook end to end, in a tiny monorepo pushed to a bare remote with real git.

The monorepo has its own ``pyproject.toml`` with three projects whose suites only append their
name to a file (servers none, no database), so these tests need no PostgreSQL. The hook is
installed with ``invoke -r <this checkout> hooks.install`` run inside the monorepo: it records this
Python and the monorepo's config, and ``git push`` runs the real ``python -m e2e_infra
e2e.affected --pre-push`` (the monorepo has no noxfile: the package's own runs the projects).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.cli import CLI, clean_environ
from support.runs import project_folder, run_folder

pytestmark = pytest.mark.integration

PORT_RANGE = "19000-19099"

RECORDER = """\
import pathlib, sys
name = sys.argv[1]
with open(sys.argv[2], "a") as out:
    out.write(name + "\\n")
sys.exit(1 if pathlib.Path("apps", name, "FAIL").exists() else 0)
"""


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=repo,
        env=env or clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"git {args}: {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def push(repo: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "push", *args],
        cwd=repo,
        env=clean_environ(extra),
        capture_output=True,
        text=True,
        timeout=180,
    )


def invoke(repo: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(*args, env=clean_environ(extra), cwd=repo, timeout=180)


def commit(repo: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


class Monorepo:
    def __init__(self, tmp_path: Path) -> None:
        self.remote = tmp_path / "remote.git"
        self.repo = tmp_path / "repo"
        self.ran_file = tmp_path / "ran.txt"
        git(tmp_path, "init", "-q", "--bare", "-b", "main", str(self.remote))
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "config", "user.email", "dev@example.com")
        git(self.repo, "config", "user.name", "Dev")
        projects = ""
        for name, database in (("alpha", False), ("beta", False), ("gamma", True)):
            projects += textwrap.dedent(
                f"""
                [tool.e2e_infra.projects.{name}]
                command = "{{python}} tools/record.py {name} {self.ran_file}"
                servers = []
                database = {"true" if database else "false"}
                paths = ["apps/{name}/**"]
                """
            )
        pyproject = textwrap.dedent(
            f"""
            [tool.e2e_infra]
            state_dir = "test-results/.e2e"
            results_dir = "test-results"
            port_range = "{PORT_RANGE}"

            [tool.e2e_infra.database]
            migrations_dir = "db/migrations"
            seeds_dir = "db/seeds"
            """
        )
        commit(
            self.repo,
            {
                "pyproject.toml": pyproject + projects,
                ".gitignore": "test-results/\n",
                "tools/record.py": RECORDER,
                "apps/alpha/a.txt": "a\n",
                "apps/beta/b.txt": "b\n",
                "apps/gamma/g.txt": "g\n",
                "db/migrations/0001.sql": "CREATE TABLE t (id int);\n",
                "docs/readme.md": "hello\n",
            },
            "initial",
        )
        git(self.repo, "remote", "add", "origin", str(self.remote))
        git(self.repo, "push", "-q", "-u", "origin", "main")

    def ran(self) -> list[str]:
        if not self.ran_file.exists():
            return []
        return sorted(self.ran_file.read_text().split())

    def reset_ran(self) -> None:
        self.ran_file.unlink(missing_ok=True)

    @property
    def hook(self) -> Path:
        return self.repo / ".git" / "hooks" / "pre-push"

    def remote_sha(self, branch: str) -> str:
        return git(self.remote, "rev-parse", branch).strip()

    def local_sha(self, rev: str = "HEAD") -> str:
        return git(self.repo, "rev-parse", rev).strip()


@pytest.fixture
def mono(tmp_path: Path) -> Monorepo:
    return Monorepo(tmp_path)


@pytest.fixture
def hooked(mono: Monorepo) -> Monorepo:
    proc = invoke(mono.repo, "hooks.install")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return mono


def test_install_writes_an_executable_hook_that_records_python_and_config(
    hooked: Monorepo,
) -> None:
    text = hooked.hook.read_text()
    assert os.access(hooked.hook, os.X_OK)
    assert sys.executable in text
    assert f"{sys.executable} -m e2e_infra e2e.affected" in text  # the package, no tasks.py
    assert '"$PWD"/pyproject.toml' in text  # relative to the repo: a moved checkout still works
    assert "e2e.affected --pre-push" in text
    # Installing again (ours) is fine and idempotent.
    assert invoke(hooked.repo, "hooks.install").returncode == 0
    assert hooked.hook.read_text() == text


def test_a_push_touching_one_project_runs_only_that_project(hooked: Monorepo) -> None:
    commit(hooked.repo, {"apps/alpha/a.txt": "changed\n"}, "alpha only")
    proc = push(hooked.repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hooked.ran() == ["alpha"]
    assert hooked.remote_sha("main") == hooked.local_sha()
    record = json.loads(
        (project_folder(hooked.repo / "test-results", "alpha") / "run.json").read_text()
    )
    assert record["result"] == "passed"
    assert (run_folder(hooked.repo / "test-results") / "report.html").is_file()


def test_a_push_touching_nothing_of_a_project_runs_nothing(hooked: Monorepo) -> None:
    commit(hooked.repo, {"docs/readme.md": "changed\n"}, "docs")
    proc = push(hooked.repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hooked.ran() == []
    assert "no project affected" in proc.stderr


def test_a_failing_affected_project_stops_the_push_and_e2e_skip_lets_it_through(
    hooked: Monorepo,
) -> None:
    before = hooked.remote_sha("main")
    commit(hooked.repo, {"apps/beta/FAIL": "x\n"}, "break beta")
    proc = push(hooked.repo)
    assert proc.returncode != 0
    assert hooked.ran() == ["beta"]
    assert hooked.remote_sha("main") == before  # the push was refused
    assert "E2E_SKIP=1" in proc.stderr

    hooked.reset_ran()
    proc = push(hooked.repo, E2E_SKIP="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hooked.ran() == []
    assert "E2E_SKIP" in proc.stderr
    assert hooked.remote_sha("main") == hooked.local_sha()


def test_a_new_branch_is_compared_with_the_default_branch_and_a_deleted_one_runs_nothing(
    hooked: Monorepo,
) -> None:
    git(hooked.repo, "checkout", "-q", "-b", "feature")
    commit(hooked.repo, {"apps/beta/b.txt": "feature\n"}, "beta on a branch")
    proc = push(hooked.repo, "-u", "origin", "feature")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hooked.ran() == ["beta"]

    hooked.reset_ran()
    proc = push(hooked.repo, "origin", "--delete", "feature")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hooked.ran() == []


def test_affected_by_hand_explains_migrations_and_tool_changes(mono: Monorepo) -> None:
    commit(mono.repo, {"db/migrations/0002.sql": "CREATE TABLE u (id int);\n"}, "migration")
    proc = invoke(mono.repo, "e2e.affected", "--base", "HEAD~1", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["projects"] == ["gamma"]  # the only project that uses the database
    assert found["changed"] == ["db/migrations/0002.sql"]
    assert "migrations or seeds changed" in found["reasons"]["gamma"][0]

    text = (mono.repo / "pyproject.toml").read_text()
    commit(mono.repo, {"pyproject.toml": text + "\n# touched\n"}, "tool config")
    proc = invoke(mono.repo, "e2e.affected", "--base", "HEAD~1", "--json")
    assert json.loads(proc.stdout)["projects"] == ["alpha", "beta", "gamma"]

    # Default base: the merge-base with origin's default branch (both commits are unpushed).
    proc = invoke(mono.repo, "e2e.affected", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "3 project(s) affected" in proc.stdout
    assert mono.ran() == []  # --dry-run runs nothing


def test_install_refuses_a_foreign_hook_unless_forced_and_uninstall_restores_it(
    mono: Monorepo,
) -> None:
    foreign = "#!/bin/sh\necho mine\n"
    mono.hook.parent.mkdir(parents=True, exist_ok=True)
    mono.hook.write_text(foreign)
    proc = invoke(mono.repo, "hooks.install")
    assert proc.returncode != 0
    assert "--force" in proc.stderr
    assert mono.hook.read_text() == foreign

    proc = invoke(mono.repo, "hooks.install", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "e2e-infra-hook" in mono.hook.read_text()

    proc = invoke(mono.repo, "hooks.uninstall")
    assert proc.returncode == 0, proc.stderr
    assert mono.hook.read_text() == foreign  # the replaced hook is back

    proc = invoke(mono.repo, "hooks.uninstall")  # not ours: left alone
    assert proc.returncode != 0
    assert mono.hook.read_text() == foreign
