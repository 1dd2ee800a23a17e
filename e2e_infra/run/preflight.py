"""What a run checks before it acquires anything (ports, a database, servers).

A mistake found here costs nothing to undo: a folder that cannot be written (read-only, missing,
not a folder), a working directory that does not exist. Placeholders are checked earlier still,
when the configuration is loaded (:mod:`e2e_infra.config`). Each problem is one
:class:`~e2e_infra.errors.E2EInfraError` line naming the path and the fix.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ProjectConfig
from ..errors import ConfigError, FolderError
from ..files import RESULTS_SETTING, STATE_SETTING, check_writable, ensure_private_dir, folder_error

__all__ = ["check_project", "writable_folder"]


def writable_folder(path: Path, *, setting: str, private: bool = False) -> Path:
    """``path`` as a folder this process can write in (created if missing), else FolderError."""
    if private:
        ensure_private_dir(path)
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FolderError(
                f"{path} exists and is not a folder; remove it or point {setting} elsewhere",
                path=str(path),
            ) from None
        except OSError as exc:
            raise folder_error(path, exc, setting=setting, what="create the folder") from None
    return check_writable(path, setting=setting)


def _shown(config: Config, path: Path) -> str:
    try:
        return str(path.relative_to(config.root))
    except ValueError:
        return str(path)


def _check_cwd(config: Config, path: Path, who: str, key: str) -> None:
    if path.is_dir():
        return
    problem = "is not a folder" if path.exists() else "does not exist"
    where = config.source or "pyproject.toml"
    raise ConfigError(
        f"{who}: cwd {_shown(config, path)} {problem} ({key}.cwd in {where}); create it or fix "
        "the cwd",
        key=f"{key}.cwd",
        path=str(config.source) if config.source else None,
    )


def check_project(config: Config, project: ProjectConfig) -> None:
    """Everything that can be checked about ``project`` before a run acquires anything."""
    writable_folder(config.state_dir, setting=STATE_SETTING, private=True)
    writable_folder(config.results_dir, setting=RESULTS_SETTING)
    _check_cwd(config, project.cwd, f"project {project.name}", f"projects.{project.name}")
    for name in project.servers:
        server = config.servers[name]
        who = f"server {name} of project {project.name}"
        _check_cwd(config, server.cwd, who, f"servers.{name}")
