"""Which projects a change affects: glob matching, pre-push input, the rules. No git needed here
except in the last tests, which build a throwaway repository under tmp_path."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from e2e_infra.config import Config, load_config
from e2e_infra.errors import UsageError
from e2e_infra.plan.affected import (
    ZERO_SHA,
    affected_projects,
    glob_regex,
    hook_script,
    match_path,
    parse_pre_push,
    push_ranges,
)

# Each row was checked against Python 3.13's PurePosixPath(path).full_match(glob), whose rules we
# follow on 3.11 (476 combinations agreed; these are the instructive ones).
FULL_MATCH_CASES = [
    ("a/b/c", "a/**", True),
    ("a", "a/**", False),  # "a/**" is what is under a, not a itself
    ("ab/c", "a/**", False),
    ("a/b", "a/**/b", True),  # "**" matches zero segments too
    ("a/x/y/b", "a/**/b", True),
    ("b", "**/b", True),
    ("x/y/b", "**/b", True),
    ("xb", "**/b", False),
    ("anything/at/all", "**", True),
    ("a/b.py", "a/*.py", True),
    ("a/c/b.py", "a/*.py", False),  # "*" never crosses a "/"
    ("b.py", "*.py", True),
    ("a/b.py", "*.py", False),
    ("a/c.py", "a/?.py", True),
    ("a/bc.py", "a/?.py", False),
    ("a/c.py", "a/[bc].py", True),
    ("a/d.py", "a/[bc].py", False),
    ("a/d.py", "a/[!b].py", True),
    ("a/b.py", "a/[!b].py", False),
    ("a/m/0001.sql", "a/**/*.sql", True),
    ("a/0001.sql", "a/**/*.sql", True),
    ("aa/b", "a*/b", True),
    ("a/b", "a/**/b/**", False),
    ("a/q/b/x/y", "a/**/b/**", True),
    ("p/x/q", "**/x/**", True),
    ("x", "**/x/**", False),
    (".hidden/x/y", "**/x/**", True),  # "*" and "**" match dot files too
    ("demo/e2e/auth_tests/test_x.py", "demo/e2e/auth_tests/**", True),
    ("demo/e2e/auth_testsx/y", "demo/e2e/auth_tests/**", False),
]


@pytest.mark.parametrize(("path", "glob", "expected"), FULL_MATCH_CASES)
def test_globs_match_like_pathlib_full_match(path: str, glob: str, expected: bool) -> None:
    assert match_path(path, glob) is expected


def test_glob_spellings_leading_dot_slash_and_trailing_slash() -> None:
    assert match_path("apps/web/x.ts", "./apps/web/**")
    assert match_path("apps/web/x.ts", "/apps/web/**")
    assert match_path("apps/web/deep/x.ts", "apps/web/")  # a trailing "/" means the whole folder
    assert match_path(Path("apps/web/x.ts"), "apps/*/x.ts")
    assert not match_path("Apps/web/x.ts", "apps/**")  # case-sensitive, as git paths are


def test_regex_metacharacters_in_globs_are_literal() -> None:
    assert match_path("a+b/(x).txt", "a+b/(x).txt")
    assert not match_path("aab/x.txt", "a+b/x.txt")
    assert match_path("a/[b]", "a/[[]b]")


def test_an_empty_glob_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        glob_regex("  ")


def write_config(tmp_path: Path) -> Config:
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.e2e_infra]
            [tool.e2e_infra.database]
            migrations_dir = "db/migrations"
            seeds_dir = "db/seeds"
            migrate_inputs = ["schema/*.prisma"]
            [tool.e2e_infra.projects.web]
            command = "true"
            paths = ["apps/web/**", "libs/ui/**"]
            [tool.e2e_infra.projects.api]
            command = "true"
            paths = ["apps/api/**"]
            [tool.e2e_infra.projects.docs]
            command = "true"
            database = false
            paths = ["docs/**"]
            """
        )
    )
    return load_config(tmp_path / "pyproject.toml", environ={})


def affected(config: Config, *files: str) -> tuple[str, ...]:
    return affected_projects(config, [config.root / f for f in files]).projects


def test_projects_follow_their_paths(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert affected(config, "apps/web/src/app.ts") == ("web",)
    assert affected(config, "libs/ui/button.ts", "apps/api/main.py") == ("web", "api")
    assert affected(config, "README.md") == ()


def test_migrations_seeds_and_migrate_inputs_affect_every_database_project(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for changed in ("db/migrations/0002.sql", "db/seeds/default/1.sql", "schema/app.prisma"):
        assert affected(config, changed) == ("web", "api"), changed  # docs has no database
    found = affected_projects(config, [tmp_path / "db/migrations/0002.sql", tmp_path / "docs/x"])
    assert found.projects == ("web", "api", "docs")
    assert found.reasons["web"][0].startswith("migrations or seeds changed")


def test_the_tool_itself_affects_every_project(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for changed in ("pyproject.toml", "tasks.py", "noxfile.py", ".env.e2e"):
        found = affected_projects(config, [tmp_path / changed])
        assert found.projects == ("web", "api", "docs"), changed
        assert found.everything and changed in found.everything


def test_the_package_counts_where_it_is_not_in_the_repository(tmp_path: Path) -> None:
    """An adopting repository has no e2e_infra/ of its own: a folder of that name is just code,
    and the package counts as the tool wherever it is installed (here: this checkout)."""
    import e2e_infra

    config = write_config(tmp_path)
    assert affected_projects(config, [tmp_path / "e2e_infra/session.py"]).projects == ()
    package_file = Path(e2e_infra.__file__).resolve().parent / "session.py"
    found = affected_projects(config, [package_file])
    assert found.projects == ("web", "api", "docs")


def test_files_outside_the_config_root_match_no_project(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    config = write_config(tmp_path / "sub")
    found = affected_projects(config, [tmp_path / "apps/web/x.ts", tmp_path / "tasks.py"])
    assert found.projects == ()


def test_pre_push_lines_are_parsed_and_garbage_is_refused() -> None:
    sha = "a" * 40
    refs = parse_pre_push(
        f"refs/heads/main {sha} refs/heads/main {'b' * 40}\n"
        f"refs/heads/new {sha} refs/heads/new {ZERO_SHA}\n"
        f"(delete) {ZERO_SHA} refs/heads/old {'c' * 40}\n\n"
    )
    assert [r.local_ref for r in refs] == ["refs/heads/main", "refs/heads/new", "(delete)"]
    assert [r.new_branch for r in refs] == [False, True, False]
    assert [r.deleted for r in refs] == [False, False, True]
    with pytest.raises(UsageError, match="pre-push input line 1"):
        parse_pre_push("not what git sends\n")


def run_git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_new_branch_without_shared_history_affects_everything(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "main")
    run_git(
        repo,
        "-c",
        "user.name=a",
        "-c",
        "user.email=a@b",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "x",
    )
    head = run_git(repo, "rev-parse", "HEAD")
    refs = parse_pre_push(f"refs/heads/main {head} refs/heads/main {ZERO_SHA}\n")
    ranges, everything = push_ranges(repo, refs, "origin")  # no remote at all
    assert ranges == [(None, head)]
    assert everything is not None and "shares no history" in everything
    deleted = parse_pre_push(f"(delete) {ZERO_SHA} refs/heads/main {head}\n")
    assert push_ranges(repo, deleted, "origin") == ([], None)


def test_the_hook_script_skips_on_e2e_skip_and_runs_from_the_repo_root(tmp_path: Path) -> None:
    script = hook_script(python="/opt/py 3/python", config='"$PWD"/p.toml')
    assert script.startswith("#!/bin/sh\n")
    # the installed package's own entry point, quoted for the shell: no tasks.py needed
    assert "exec '/opt/py 3/python' -m e2e_infra e2e.affected --pre-push" in script
    assert 'cd "$(git rev-parse --show-toplevel)"' in script
    assert "E2E_SKIP" in script and "--no-verify" in script


@pytest.mark.parametrize("rev", ["--output=/tmp/e2e-infra-pwned", "-p", "", "a b", "x\ny"])
def test_a_revision_that_looks_like_an_option_is_refused(tmp_path: Path, rev: str) -> None:
    from e2e_infra.errors import UsageError
    from e2e_infra.plan.affected import changed_files

    with pytest.raises(UsageError, match="not a git revision"):
        changed_files(tmp_path, rev, "HEAD")
    assert not Path("/tmp/e2e-infra-pwned").exists()
