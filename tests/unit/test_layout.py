"""The package's shape: thin root adapters, invoke and nox only in e2e_infra/cli, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import REPO_ROOT

PACKAGE = REPO_ROOT / "e2e_infra"
MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _shown(path: Path) -> Path:
    """A module's path as an offender's message names it: from the repository's root."""
    return path.relative_to(REPO_ROOT)


@pytest.mark.parametrize("name", ["tasks.py.tmpl", "noxfile.py.tmpl"])
def test_what_init_writes_for_an_adopter_is_a_few_lines_over_the_package(name: str) -> None:
    lines = (PACKAGE / "templates" / name).read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 10, f"{name} has {len(lines)} lines"
    assert "from e2e_infra.cli import" in "\n".join(lines)


def test_the_root_tasks_file_is_the_one_init_writes(repo_root: Path) -> None:
    template = PACKAGE / "templates" / "tasks.py.tmpl"
    assert (repo_root / "tasks.py").read_text() == template.read_text()


def test_the_root_noxfile_is_the_one_init_writes(repo_root: Path) -> None:
    template = PACKAGE / "templates" / "noxfile.py.tmpl"
    assert (repo_root / "noxfile.py").read_text() == template.read_text()
    # This repository's own sessions (tests, lock, deps-*) live apart, without the tool's.
    assert "register_sessions" not in (repo_root / "dev" / "noxfile.py").read_text()


def test_the_env_example_is_the_one_init_writes(repo_root: Path) -> None:
    template = PACKAGE / "templates" / "env.example"
    assert (repo_root / ".env.example").read_text() == template.read_text()


def test_only_the_cli_subpackage_imports_invoke_or_nox() -> None:
    offenders = []
    for path in _modules():
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{_shown(path)}:{node.lineno} imports {n}"
                for n in names
                if n.split(".")[0] in ("invoke", "nox")
            ]
    assert offenders == []


def test_no_module_or_class_is_too_large() -> None:
    too_large = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_large.append(f"{_shown(path)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_large.append(f"{_shown(path)}: class {node.name} {size} lines")
    assert too_large == []


def test_the_version_lives_in_one_place(repo_root: Path) -> None:
    import e2e_infra

    pyproject = (repo_root / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "e2e_infra.__version__" }' in pyproject
    assert e2e_infra.__version__.count(".") == 2


RESULT_VALUES = {"running", "passed", "flaky", "failed", "error", "interrupted", "skipped"}


def _compared_strings(node: ast.Compare) -> list[str]:
    found = []
    for side in (node.left, *node.comparators):
        items = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
        found += [
            i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)
        ]
    return found


def test_no_result_string_is_compared_outside_the_record_module() -> None:
    offenders = []
    for path in _modules():
        if path == PACKAGE / "record.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                offenders += [
                    f"{_shown(path)}:{node.lineno} compares {value!r}"
                    for value in _compared_strings(node)
                    if value in RESULT_VALUES
                ]
    assert offenders == [], "use e2e_infra.results.record.Result"


# What nox documents for a noxfile; anything else of nox's is its internals.
NOX_PUBLIC = {"session", "Session", "options", "param", "parametrize", "needs_version"}


def test_no_module_reads_nox_internals() -> None:
    offenders = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        if "--parallel-worker" in text:
            offenders.append(f"{_shown(path)} reads nox's hidden --parallel-worker")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nox."):
                offenders.append(f"{_shown(path)}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Import) and any(
                a.name.startswith("nox.") for a in node.names
            ):
                offenders.append(f"{_shown(path)}:{node.lineno} imports nox internals")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "nox"
                and node.attr not in NOX_PUBLIC
            ):
                offenders.append(f"{_shown(path)}:{node.lineno} uses nox.{node.attr}")
    assert offenders == []


def test_the_architecture_document_lists_every_module(repo_root: Path) -> None:
    text = (repo_root / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        path.relative_to(PACKAGE).as_posix()
        for path in _modules()
        if f"`{path.relative_to(PACKAGE).as_posix()}`" not in text
        and f"`{path.relative_to(PACKAGE).as_posix()}`," not in text
    ]
    assert missing == [], "add them to docs/architecture.md's module map"
