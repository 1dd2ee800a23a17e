"""Which projects a change affects: for the pre-push hook and ``invoke e2e.affected``.

A project is affected when a changed file matches one of its ``paths`` globs (relative to the
config root; ``**`` spans folders), when migrations or seeds changed and it uses the database, or
when the tool itself changed (``tasks.py``, ``noxfile.py``, the config file, ``.env.e2e``, and the
``e2e_infra`` package when it lives inside the repository, as in the tool's own checkout), which
affects every project.

The changed files come from git: between two revisions given by hand, or from the lines git hands a
pre-push hook on stdin (``<local ref> <local sha> <remote ref> <remote sha>``). A new branch (remote
sha all zeros) is compared with its merge-base with the remote's default branch; without one every
project is affected. A deleted ref pushes nothing.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError

__all__ = [
    "HOOK_MARKER",
    "TOOL_PATHS",
    "ZERO_SHA",
    "Affected",
    "HookChange",
    "PushedRef",
    "affected_by_ranges",
    "affected_projects",
    "changed_files",
    "default_branch_base",
    "git_toplevel",
    "glob_regex",
    "hook_script",
    "install_pre_push_hook",
    "is_our_hook",
    "match_path",
    "parse_pre_push",
    "push_ranges",
    "uninstall_pre_push_hook",
]

ZERO_SHA = "0" * 40
#: Files of the tool in an adopting repository, relative to the config root: a change there
#: affects every project. The package itself counts only where it lives in the repository
#: (:func:`_package_dir`); an installed one changes with the lock file that pins it.
TOOL_PATHS: tuple[str, ...] = ("tasks.py", "noxfile.py", ".env.e2e")


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


_GIT_TIMEOUT = 60.0


# --- globs ----------------------------------------------------------------------------------------


def _segment_regex(segment: str) -> str:
    """One path segment of a glob: ``*`` and ``?`` never cross a ``/``; ``[...]`` classes."""
    out: list[str] = []
    i, n = 0, len(segment)
    while i < n:
        ch = segment[i]
        if ch == "*":
            while i < n and segment[i] == "*":
                i += 1  # "**" inside a segment ("a**b") is a plain "*", as in pathlib
            out.append("[^/]*")
            continue
        if ch == "?":
            out.append("[^/]")
        elif ch == "[":
            j = i + 1
            if j < n and segment[j] in "!^":
                j += 1
            if j < n and segment[j] == "]":
                j += 1
            while j < n and segment[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(ch))  # no closing bracket: a literal "["
            else:
                body = segment[i + 1 : j]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = re.sub(r"([\\\[&~|])", r"\\\1", body)  # literal inside a class
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=512)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob as :meth:`pathlib.PurePath.full_match` (3.13) reads it.

    ``*`` matches within one segment, ``**`` as a whole segment matches zero or more segments
    (``a/**`` matches everything under ``a``; ``a/**/b`` matches ``a/b`` and ``a/x/y/b``).
    A leading ``./`` or ``/`` and a trailing ``/`` (meaning "this folder": ``a/`` = ``a/**``) are
    accepted. Matching is case-sensitive.
    """
    text = pattern.strip()
    while text.startswith("./"):
        text = text[2:]
    text = text.lstrip("/")
    if text.endswith("/"):
        text = text.rstrip("/") + "/**"
    if not text:
        raise UsageError(f"empty path glob {pattern!r}: use e.g. 'apps/web/**'")
    segments = [s for s in text.split("/") if s not in ("", ".")]
    parts: list[str | None] = []
    for segment in segments:
        if segment == "**":
            if parts and parts[-1] is None:
                continue  # "**/**" is one "**"
            parts.append(None)
        else:
            parts.append(_segment_regex(segment))
    regex: list[str] = []
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if part is None:
            if last == 0:
                regex.append(".*")
            elif i == 0:
                regex.append("(?:[^/]+/)*")
            elif i == last:
                regex.append("(?:/[^/]+)+")  # "a/**": what is under a, not a itself
            else:
                regex.append("/(?:[^/]+/)*")
        else:
            if i > 0 and parts[i - 1] is not None:
                regex.append("/")
            regex.append(part)
    return re.compile("".join(regex), re.DOTALL)


def match_path(path: str | Path, pattern: str) -> bool:
    """True if the relative ``path`` (``/``-separated) matches the glob ``pattern`` entirely."""
    text = Path(path).as_posix() if isinstance(path, Path) else path
    while text.startswith("./"):
        text = text[2:]
    return glob_regex(pattern).fullmatch(text) is not None


# --- which projects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Affected:
    """The projects a set of changed files affects, and why."""

    projects: tuple[str, ...]  # in config order
    reasons: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    changed: tuple[str, ...] = ()  # relative to the git top level (or absolute when outside)
    everything: str | None = None  # set when every project is affected: why
    ranges: tuple[tuple[str | None, str], ...] = ()  # (base, head) compared; base None = no base

    def to_json(self) -> dict[str, Any]:
        return {
            "projects": list(self.projects),
            "reasons": {k: list(v) for k, v in self.reasons.items()},
            "changed": list(self.changed),
            "everything": self.everything,
            "ranges": [{"base": base, "head": head} for base, head in self.ranges],
        }


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.is_relative_to(folder)


def affected_projects(
    config: Config,
    changed: Iterable[Path],
    *,
    everything: str | None = None,
    ranges: Sequence[tuple[str | None, str]] = (),
    shown_root: Path | None = None,
) -> Affected:
    """The projects that ``changed`` (absolute paths) affect.

    ``everything`` forces every project (e.g. "no base to compare with"). ``shown_root`` is the
    folder the ``changed`` list in the result is shown relative to (the git top level).
    """
    root = config.root.resolve()
    files = sorted({Path(p) for p in changed})  # absolute, under the (real) git top level
    shown = shown_root.resolve() if shown_root else root
    changed_shown = tuple(_relative(p, shown) or str(p) for p in files)
    names = tuple(config.projects)
    if everything:
        return Affected(
            names, {n: (everything,) for n in names}, changed_shown, everything, tuple(ranges)
        )

    source = config.source.resolve() if config.source else None
    package = _package_dir()
    db = config.database
    db_dirs = [d.resolve() for d in (db.migrations_dir, db.seeds_dir) if d is not None]
    reasons: dict[str, list[str]] = {name: [] for name in names}
    tool_change: str | None = None
    db_change: str | None = None
    for path in files:
        rel = _relative(path, root)
        if tool_change is None and (
            path == source
            or _under(path, package)
            or (rel is not None and any(match_path(rel, g) for g in TOOL_PATHS))
        ):
            tool_change = rel or str(path)
        if db_change is None and (
            any(_under(path, d) for d in db_dirs)
            or (rel is not None and any(match_path(rel, g) for g in db.migrate_inputs))
        ):
            db_change = rel or str(path)
        if rel is None:
            continue
        for name, project in config.projects.items():
            if any(match_path(rel, glob) for glob in project.paths):
                reasons[name].append(rel)
    if tool_change is not None:
        why = f"the tool or its configuration changed ({tool_change})"
        return Affected(names, {n: (why,) for n in names}, changed_shown, why, tuple(ranges))
    out: dict[str, tuple[str, ...]] = {}
    for name, project in config.projects.items():
        why_list = list(reasons[name])
        if db_change is not None and project.database:
            why_list.insert(0, f"migrations or seeds changed ({db_change})")
        if why_list:
            out[name] = tuple(why_list)
    return Affected(tuple(out), out, changed_shown, None, tuple(ranges))


# --- git ------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run git {' '.join(args)} in {repo}: {exc}") from None
    if check and proc.returncode != 0:
        detail = " ".join(proc.stderr.split())[:300]
        raise UsageError(
            f"git {' '.join(args)} failed in {repo}: {detail or f'exit {proc.returncode}'}; "
            "check the revisions (--base / --head) and that this is a git checkout"
        )
    return proc


def _revision(value: str, what: str) -> str:
    """A revision or remote name that git cannot mistake for an option."""
    if not value or value.startswith("-") or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise UsageError(f"{what} {value!r} is not a git revision (e.g. origin/main or a sha)")
    return value


def git_toplevel(start: Path) -> Path:
    """The top folder of the git work tree that holds ``start``."""
    return Path(_git(start, "rev-parse", "--show-toplevel").stdout.strip()).resolve()


def changed_files(repo: Path, base: str, head: str) -> list[Path]:
    """Files that differ between ``base`` and ``head`` (both sides of a rename), absolute."""
    base, head = _revision(base, "--base"), _revision(head, "--head")
    top = git_toplevel(repo)
    out = _git(top, "diff", "--name-only", "--no-renames", "-z", base, head, "--").stdout
    return [top / name for name in out.split("\0") if name]


def default_branch_base(repo: Path, head: str, remote: str = "origin") -> str | None:
    """The merge-base of ``head`` with ``remote``'s default branch, or None if there is none."""
    head, remote = _revision(head, "--head"), _revision(remote, "--remote")
    candidates: list[str] = []
    sym = _git(repo, "symbolic-ref", "-q", f"refs/remotes/{remote}/HEAD", check=False)
    if sym.returncode == 0 and sym.stdout.strip():
        candidates.append(sym.stdout.strip())
    candidates += [f"refs/remotes/{remote}/{name}" for name in ("main", "master", "trunk")]
    for ref in candidates:
        if _git(repo, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False).returncode:
            continue
        base = _git(repo, "merge-base", head, ref, check=False)
        if base.returncode == 0 and base.stdout.strip():
            return base.stdout.strip()
    return None


@dataclass(frozen=True)
class PushedRef:
    local_ref: str
    local_sha: str
    remote_ref: str
    remote_sha: str

    @property
    def deleted(self) -> bool:
        return self.local_sha == ZERO_SHA

    @property
    def new_branch(self) -> bool:
        return self.remote_sha == ZERO_SHA


def parse_pre_push(text: str) -> list[PushedRef]:
    """Parse the lines git gives a pre-push hook on stdin; refuse anything else."""
    refs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not all(
            re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", p) for p in (parts[1], parts[3])
        ):
            raise UsageError(
                f"pre-push input line {number} is not '<local ref> <local sha> <remote ref> "
                f"<remote sha>': {line[:120]!r} (git passes these on stdin to the hook)"
            )
        refs.append(PushedRef(parts[0], parts[1], parts[2], parts[3]))
    return refs


def push_ranges(
    repo: Path, refs: Sequence[PushedRef], remote: str = "origin"
) -> tuple[list[tuple[str | None, str]], str | None]:
    """The (base, head) ranges a push sends, and why every project is affected (or None).

    A deleted ref sends nothing; a new branch is compared with its merge-base with the remote's
    default branch; when there is none, every project is affected.
    """
    ranges: list[tuple[str | None, str]] = []
    for ref in refs:
        if ref.deleted:
            continue
        zeros = "0" * len(ref.remote_sha)
        base: str | None = ref.remote_sha if ref.remote_sha != zeros else None
        if (
            base is not None
            and _git(repo, "cat-file", "-e", f"{base}^{{commit}}", check=False).returncode
        ):
            # The remote moved to a commit we never fetched (the push will be refused as non-fast-
            # forward unless forced): compare with what we share with the default branch.
            base = None
        if base is None:
            base = default_branch_base(repo, ref.local_sha, remote)
        ranges.append((base, ref.local_sha))
        if base is None:
            return ranges, (
                f"{ref.local_ref} is new and shares no history with {remote}'s default branch"
            )
    return ranges, None


def affected_by_ranges(
    config: Config,
    repo: Path,
    ranges: Sequence[tuple[str | None, str]],
    everything: str | None = None,
) -> Affected:
    """The projects affected by the changes in ``ranges`` (``everything`` forces all)."""
    top = git_toplevel(repo)
    files: set[Path] = set()
    if everything is None:
        for base, head in ranges:
            if base is None:
                everything = f"no base revision to compare {head[:12]} with"
                break
            files.update(changed_files(top, base, head))
    return affected_projects(config, files, everything=everything, ranges=ranges, shown_root=top)


# --- the pre-push hook ----------------------------------------------------------------------------

HOOK_MARKER = "e2e-infra-hook: pre-push v1"
_BACKUP_SUFFIX = ".before-e2e-infra"


@dataclass(frozen=True)
class HookChange:
    path: Path
    backup: Path | None = None  # where a foreign hook was kept (install --force) or came from


def _hooks_dir(top: Path) -> Path:
    text = _git(top, "rev-parse", "--git-path", "hooks").stdout.strip()
    path = Path(text)
    return path if path.is_absolute() else top / path


def hook_script(*, python: str, config: str, remote_arg: str = '"$1"') -> str:
    """The pre-push script: skip on E2E_SKIP, cd to the repo root, exec ``e2e.affected``.

    It runs the installed package (``python -m e2e_infra``), so it needs no ``tasks.py``.

    ``config`` is the shell expression of the config file (``"$PWD"/pyproject.toml`` when it
    lives in the repository, so a moved checkout keeps working).
    """
    command = " ".join(shlex.quote(part) for part in (python, "-m", "e2e_infra"))
    return f"""#!/bin/sh
# {HOOK_MARKER}
# Runs the E2E projects this push affects: `e2e-infra e2e.affected --pre-push` (docs/workflow.md).
# Written by `e2e-infra hooks.install`; `e2e-infra hooks.uninstall` removes it.
# Skip it once: E2E_SKIP=1 git push   (git push --no-verify skips every pre-push hook)
case "${{E2E_SKIP:-}}" in
  1|true|yes|on) echo "e2e-infra: E2E_SKIP is set: not running the E2E projects" >&2; exit 0 ;;
esac
cd "$(git rev-parse --show-toplevel)" || exit 1
if [ -z "${{E2E_CONFIG:-}}" ]; then E2E_CONFIG={config}; export E2E_CONFIG; fi
exec {command} e2e.affected --pre-push --remote {remote_arg}
"""


def is_our_hook(path: Path) -> bool:
    try:
        return HOOK_MARKER in path.read_text(encoding="utf-8", errors="replace")[:500]
    except OSError:
        return False


def install_pre_push_hook(
    repo: Path, *, python: str, config: Path, force: bool = False
) -> HookChange:
    """Write ``<git dir>/hooks/pre-push``; a hook we did not write needs ``force`` (kept aside)."""
    top = git_toplevel(repo)
    path = _hooks_dir(top) / "pre-push"
    backup: Path | None = None
    if path.exists() and not is_our_hook(path):
        if not force:
            raise UsageError(
                f"{path} exists and was not written by e2e-infra; pass --force to replace it "
                f"(it is kept as {path.name}{_BACKUP_SUFFIX} and restored by hooks.uninstall), "
                'or call `e2e-infra e2e.affected --pre-push --remote "$1"` from it yourself'
            )
        backup = path.with_name(path.name + _BACKUP_SUFFIX)
        os.replace(path, backup)
    config = config.resolve()
    if config.is_relative_to(top):
        shown = '"$PWD"/' + shlex.quote(config.relative_to(top).as_posix())
    else:
        shown = shlex.quote(str(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(hook_script(python=python, config=shown), encoding="utf-8")
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return HookChange(path, backup)


def uninstall_pre_push_hook(repo: Path) -> HookChange | None:
    """Remove our pre-push hook (restoring one kept by ``install --force``); None if not ours."""
    top = git_toplevel(repo)
    path = _hooks_dir(top) / "pre-push"
    if not path.exists():
        return None
    if not is_our_hook(path):
        raise UsageError(f"{path} was not written by e2e-infra; left it alone (remove it by hand)")
    path.unlink()
    backup = path.with_name(path.name + _BACKUP_SUFFIX)
    if backup.exists():
        os.replace(backup, path)
        return HookChange(path, backup)
    return HookChange(path)
