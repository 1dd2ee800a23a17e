"""``e2e-infra init``: the few files an adopting repository needs, written once, never overwritten.

What it writes into an existing repository (each only where it is missing):

- ``tasks.py`` and ``noxfile.py``: a few lines importing the task tree and the nox sessions;
- a commented ``[tool.e2e_infra]`` skeleton appended to ``pyproject.toml`` (created if missing);
  a file that already has the section is left alone, and the plan says so;
- ``.env.example`` with every ``E2E_*`` setting, commented;
- ``.gitignore`` entries for the tool's state and results folders.

:func:`plan` computes the changes without touching anything (``--dry-run`` prints it);
:func:`apply` writes them. Running it twice writes nothing the second time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UsageError

__all__ = ["IGNORES", "Change", "apply", "plan"]

#: The ignore entries the tool's default folders need (the state folder also ignores itself).
IGNORES = (".e2e-infra/", "e2e-results/")
_SECTION = re.compile(r"^\s*\[tool\.e2e_infra(\.|\])", re.M)


@dataclass(frozen=True)
class Change:
    path: Path
    action: str  # "create", "append", "skip"
    text: str  # what is written (empty for skip)
    why: str  # for people: what and why

    @property
    def writes(self) -> bool:
        return self.action != "skip"


def _template(name: str) -> str:
    return (resources.files("e2e_infra") / "templates" / name).read_text(encoding="utf-8")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read {path} ({exc}); fix or remove it, then run init again"
        ) from None


def _whole_file(path: Path, template: str, what: str) -> Change:
    if path.exists():
        return Change(path, "skip", "", f"{path.name} exists: left as it is ({what})")
    return Change(path, "create", _template(template), what)


def _pyproject(path: Path) -> Change:
    text = _read(path)
    section = _template("pyproject-section.toml")
    if text is None:
        return Change(path, "create", section.lstrip("\n"), "the [tool.e2e_infra] skeleton")
    if _SECTION.search(text):
        return Change(path, "skip", "", f"{path.name} already has [tool.e2e_infra]: left as it is")
    glue = "" if text.endswith("\n") or not text else "\n"
    return Change(path, "append", glue + section, "the commented [tool.e2e_infra] skeleton")


def _gitignore(path: Path) -> Change:
    text = _read(path) or ""
    present = {line.strip() for line in text.splitlines()}
    missing = [e for e in IGNORES if e not in present and e.rstrip("/") not in present]
    if not missing:
        return Change(path, "skip", "", "the tool's folders are ignored already")
    glue = "" if text.endswith("\n") or not text else "\n"
    body = glue + "# e2e-infra: state and results\n" + "".join(f"{m}\n" for m in missing)
    return Change(path, "append" if text else "create", body, f"ignore {', '.join(missing)}")


def plan(root: Path) -> list[Change]:
    """What :func:`apply` would write into the repository at ``root`` (nothing is touched)."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; run init at the root of your repository")
    return [
        _whole_file(root / "tasks.py", "tasks.py.tmpl", "the invoke task collection"),
        _whole_file(root / "noxfile.py", "noxfile.py.tmpl", "the e2e-<project> nox sessions"),
        _pyproject(root / "pyproject.toml"),
        _whole_file(root / ".env.example", "env.example", "every E2E_* setting, commented"),
        _gitignore(root / ".gitignore"),
    ]


def apply(changes: list[Change]) -> None:
    """Write the changes (create or append); a file appears whole or not at all."""
    for change in changes:
        if change.action == "create":
            tmp = change.path.with_name(f".{change.path.name}.{os.getpid()}.tmp")
            tmp.write_text(change.text, encoding="utf-8")
            os.replace(tmp, change.path)
        elif change.action == "append":
            with open(change.path, "a", encoding="utf-8") as out:
                out.write(change.text)
