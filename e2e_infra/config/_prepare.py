"""``[tool.e2e_infra.prepare.<name>]``: the run-level steps run once before any project.

Private to :mod:`e2e_infra.config` (what runs them is :mod:`e2e_infra.run.prepare`). A step is a
command (``npm run e2e:prepare``: build a reporter plugin, a dashboard), run in the order of the
file, skipped when the files its ``inputs`` globs match, its command, folder and ``env`` are
those of its last successful run and every path of ``outputs`` exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._parse import (
    NAME_PATTERN,
    _as_env_table,
    _as_list,
    _as_number,
    _as_str,
    _Reader,
    check_placeholders,
)

__all__ = ["PREPARE_PLACEHOLDERS", "PrepareConfig", "read_prepare"]

_KEYS = {"command", "cwd", "env", "inputs", "outputs", "timeout"}
#: What a prepare command may name: nothing of a project exists yet.
PREPARE_PLACEHOLDERS = ("python", "root", "run_id")


@dataclass(frozen=True)
class PrepareConfig:
    name: str
    command: str
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()  # globs relative to cwd; none: the step runs every time
    outputs: tuple[str, ...] = ()  # globs relative to cwd; a missing one makes it run
    timeout: float = 900.0


def read_prepare(tables: Mapping[str, Any], root: Path, path: str) -> dict[str, PrepareConfig]:
    """The prepare steps of ``[tool.e2e_infra.prepare]``, in the order of the file."""
    steps: dict[str, PrepareConfig] = {}
    for name, table in tables.items():
        prefix = f"prepare.{name}."
        if NAME_PATTERN.fullmatch(name) is None:
            shown = name if name.isidentifier() else "..."
            raise ConfigError(
                f"invalid prepare step name {name!r} (prepare.{shown}) in {path}: use "
                "[a-z][a-z0-9_]{0,39}",
                key=f"prepare.{name}",
                path=path,
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"[tool.e2e_infra.prepare.{name}] in {path} must be a table", key=prefix, path=path
            )
        for key in table:
            if key not in _KEYS:
                raise ConfigError(
                    f"unknown key {prefix}{key} in {path} (known keys: {', '.join(sorted(_KEYS))})",
                    key=f"{prefix}{key}",
                    path=path,
                )
        r = _Reader(table, prefix, path, {}, {}, {})
        command = r.get("command", "", _as_str).strip()
        if not command:
            raise r.error("command", 'is required (e.g. command = "npm run e2e:prepare")')
        cwd_text = r.get("cwd", ".", _as_str)
        cwd = Path(cwd_text).expanduser()
        step = PrepareConfig(
            name=name,
            command=command,
            cwd=cwd if cwd.is_absolute() else root / cwd,
            env=r.get("env", {}, _as_env_table),
            inputs=r.get("inputs", (), _as_list),
            outputs=r.get("outputs", (), _as_list),
            timeout=r.get("timeout", 900.0, _as_number(1)),
        )
        templates = {"command": step.command, **{f"env.{k}": v for k, v in step.env.items()}}
        for key, text in templates.items():
            try:
                check_placeholders(text, PREPARE_PLACEHOLDERS)
            except ValueError as exc:
                raise r.error(key, str(exc)) from None
        steps[name] = step
    return steps
