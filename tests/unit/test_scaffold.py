"""``e2e-infra init``: writes what is missing, never overwrites, twice is a no-op."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import REPO_ROOT

from e2e_infra import scaffold
from e2e_infra.errors import UsageError


def _apply(root: Path) -> list[scaffold.Change]:
    changes = scaffold.plan(root)
    scaffold.apply(changes)
    return changes


def test_an_empty_repository_gets_every_file(tmp_path: Path) -> None:
    changes = _apply(tmp_path)
    assert {c.path.name: c.action for c in changes} == {
        "tasks.py": "create",
        "noxfile.py": "create",
        "pyproject.toml": "create",
        ".env.example": "create",
        ".gitignore": "create",
    }
    assert "from e2e_infra.cli import namespace" in (tmp_path / "tasks.py").read_text()
    assert "register_sessions()" in (tmp_path / "noxfile.py").read_text()
    assert (tmp_path / "pyproject.toml").read_text().startswith("# ----")
    ignored = (tmp_path / ".gitignore").read_text().splitlines()
    assert ".e2e-infra/" in ignored and "e2e-results/" in ignored


def test_the_skeleton_is_appended_and_loads_as_a_config(tmp_path: Path) -> None:
    import tomllib

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "shop"', encoding="utf-8")  # no final newline
    _apply(tmp_path)
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    assert data["project"]["name"] == "shop"
    assert data["tool"]["e2e_infra"] == {}  # every key commented: the defaults


def test_running_it_twice_writes_nothing_the_second_time(tmp_path: Path) -> None:
    _apply(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = _apply(tmp_path)
    assert [c.action for c in again] == ["skip"] * 5
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_existing_section_and_existing_files_are_left_alone(tmp_path: Path) -> None:
    mine = '[tool.e2e_infra]\nport_range = "4000-4100"\n'
    (tmp_path / "pyproject.toml").write_text(mine)
    (tmp_path / "noxfile.py").write_text("# mine\n")
    (tmp_path / ".gitignore").write_text("node_modules/\n.e2e-infra\n")
    changes = {c.path.name: c for c in _apply(tmp_path)}
    assert changes["pyproject.toml"].action == "skip"
    assert "already has [tool.e2e_infra]" in changes["pyproject.toml"].why
    assert (tmp_path / "pyproject.toml").read_text() == mine
    assert (tmp_path / "noxfile.py").read_text() == "# mine\n"
    assert (tmp_path / ".gitignore").read_text().splitlines() == [
        "node_modules/",
        ".e2e-infra",
        "# e2e-infra: state and results",
        "e2e-results/",
    ]


def test_the_plan_touches_nothing(tmp_path: Path) -> None:
    changes = scaffold.plan(tmp_path)
    assert all(c.writes for c in changes)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_root_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a folder"):
        scaffold.plan(tmp_path / "nope")


def _readme_defaults() -> dict[str, str]:
    """``E2E_*`` variable -> its default cell, from the README's configuration tables."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.finditer(r"^\| `[a-z_]+` \| `(E2E_[A-Z_]+)` \| (.*?) \|", text, re.M)
    return {row.group(1): row.group(2) for row in rows}


def test_the_env_example_documents_every_setting_the_readme_lists_with_its_default() -> None:
    example = (REPO_ROOT / "e2e_infra" / "templates" / "env.example").read_text(encoding="utf-8")
    values = {m.group(1): m.group(2) for m in re.finditer(r"^# (E2E_[A-Z_]+)=(.*)$", example, re.M)}
    defaults = _readme_defaults()
    assert sorted(set(defaults) - set(values)) == []
    words = {"`false`": "0", "`true`": "1", "`0` (off)": "0"}
    for name, default in defaults.items():
        plain = re.fullmatch(r"`([^`]*)`", default)
        if name == "E2E_PORT_NAMES":
            assert values[name] == "backend,frontend"
        elif default in words:
            assert values[name] == words[default], name
        elif plain is not None and not plain.group(1).startswith("["):
            assert values[name] == plain.group(1), name
    # The two the README describes in words: the comments say the same.
    assert "machine id" in example and "pid namespace" in example
    assert "/dev/shm/e2e-infra-pg-<hash> when tmpfs has room" in example
    assert (
        "<state_dir>/pg" in defaults["E2E_PG_DATA_DIR"]
        and "/dev/shm" in defaults["E2E_PG_DATA_DIR"]
    )
