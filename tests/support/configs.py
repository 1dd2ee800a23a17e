"""Configs in a test's tmp folder: a generated ``pyproject.toml``, read by the real loader.

* :func:`write_pyproject` writes ``<folder>/pyproject.toml`` with a [tool.e2e_infra] section whose
  state and results live under that folder (never the repository's own state folder).
* :func:`make_config` is the :class:`~e2e_infra.config.Config` read from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from e2e_infra.config import Config, load_config
from e2e_infra.testing import toml_value
from support import REPO_ROOT
from support.cli import clean_environ

PG_PORT_RANGE = "15400-15409"  # the session cluster; other tests of this team use 15410-15499

_PG_KEYS = {"bin_dir", "data_dir", "user", "tmpfs", "startup_timeout"}
_DB_KEYS = {
    "admin_url",
    "name_base",
    "migrations_dir",
    "migrate_command",
    "migrate_inputs",
    "seeds_dir",
    "seed_commands",
    "default_seed",
    "keep_templates",
    "template_keep_hours",
    "server_max_databases",
    "max_databases",
    "keep_hours",
    "clone_strategy",
    "clone_timeout",
    "spares",
    "build_timeout",
}
_TABLES = {"servers", "projects"}


def _table(name: str, values: Mapping[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
    return [*lines, ""]


def write_pyproject(tmp_path: Path, **overrides: Any) -> Path:
    """Write ``tmp_path/pyproject.toml`` with a [tool.e2e_infra] section; return its path.

    Keys go where they belong: postgres keys (bin_dir, data_dir, user, tmpfs, startup_timeout) to
    ``[tool.e2e_infra.postgres]``, database keys (admin_url, migrations_dir, seeds_dir, ...) to
    ``[tool.e2e_infra.database]``, ``servers`` / ``projects`` as tables of tables, the rest to the
    top. A value of None leaves the key out (e.g. ``migrations_dir=None``).
    """
    migrations = REPO_ROOT / "demo" / "migrations"
    seeds = REPO_ROOT / "demo" / "seeds"
    top: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "results_dir": tmp_path / "results",
        "port_range": PG_PORT_RANGE,
    }
    database: dict[str, Any] = {
        "migrations_dir": migrations if migrations.is_dir() else None,
        "seeds_dir": seeds if seeds.is_dir() else None,
    }
    postgres: dict[str, Any] = {}
    tables: dict[str, Mapping[str, Mapping[str, Any]]] = {}
    for key, value in overrides.items():
        if key in _PG_KEYS:
            postgres[key] = value
        elif key in _DB_KEYS:
            database[key] = value
        elif key in _TABLES:
            tables[key] = value
        else:
            top[key] = value
    lines = _table("tool.e2e_infra", top)
    lines += _table("tool.e2e_infra.database", database)
    if postgres:
        lines += _table("tool.e2e_infra.postgres", postgres)
    for kind, entries in tables.items():
        for name, values in entries.items():
            lines += _table(f"tool.e2e_infra.{kind}.{name}", values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pyproject.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_config(
    tmp_path: Path, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Config:
    """A Config read by the real loader from a generated ``tmp_path/pyproject.toml``.

    State and results live under ``tmp_path``; the port range defaults to the session cluster's
    (15400-15409): pass ``port_range="..."`` from your own range for anything that binds ports.
    Database settings point at the demo's migrations and seeds when present. ``environ`` adds
    variables to an environment stripped of every outer E2E_* variable.
    """
    path = write_pyproject(tmp_path, **overrides)
    return load_config(path, environ=clean_environ(environ))
