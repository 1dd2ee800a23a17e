"""Where the configuration comes from: the config file (found, read as TOML) and the ``.env``
files beside it. Every read error is one :class:`ConfigError` naming the file and the fix."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from ..errors import ConfigError

__all__ = ["ENV_FILES", "find_config_file", "not_utf8", "read_env_files", "read_toml"]

ENV_FILES = (".env", ".env.e2e")


def find_config_file(start: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """``E2E_CONFIG`` if set, else the nearest ``pyproject.toml`` with ``[tool.e2e_infra]``."""
    environ = os.environ if environ is None else environ
    if environ.get("E2E_CONFIG"):
        path = Path(environ["E2E_CONFIG"]).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"E2E_CONFIG points at {path}, which is not a file; fix or unset E2E_CONFIG",
                key="E2E_CONFIG",
            )
        return path.resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                raw = candidate.read_bytes()  # bytes: a file that is not UTF-8 is judged later
            except OSError:
                continue
            if b"[tool.e2e_infra" in raw:
                return candidate
    raise ConfigError(
        f"no pyproject.toml with a [tool.e2e_infra] section in {here} or above; "
        "run from the monorepo root or set E2E_CONFIG",
        key="E2E_CONFIG",
    )


def not_utf8(path: Path, exc: UnicodeDecodeError) -> ConfigError:
    return ConfigError(
        f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
        "save it as UTF-8",
        path=str(path),
    )


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict) or "e2e_infra" not in tool:
        raise ConfigError(
            f"{path} has no [tool.e2e_infra] section; add one (`e2e-infra e2e.init` writes it) "
            "or point E2E_CONFIG at the pyproject.toml that has it",
            key="E2E_CONFIG",
            path=str(path),
        )
    section = tool["e2e_infra"]
    if not isinstance(section, dict):
        raise ConfigError(f"[tool.e2e_infra] in {path} must be a table", path=str(path))
    return section


def read_env_files(
    root: Path, environ: Mapping[str, str], known: frozenset[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Merge .env, .env.e2e and the environment; return (values, where each came from)."""
    merged: dict[str, str] = {}
    source: dict[str, str] = {}
    for name in ENV_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            values = dotenv_values(path)
        except UnicodeDecodeError as exc:
            raise not_utf8(path, exc) from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
        for key, value in values.items():
            if not key.startswith("E2E_"):
                continue  # the application's own variables are not ours to judge
            if key not in known:
                raise ConfigError(
                    f"unknown setting {key} in {path} (see .env.example for the known ones)",
                    key=key,
                    path=str(path),
                )
            merged[key] = value or ""
            source[key] = str(path)
    for key, value in environ.items():
        if key.startswith("E2E_") and key in known:
            merged[key] = value
            source[key] = "the environment"
    return merged, source
