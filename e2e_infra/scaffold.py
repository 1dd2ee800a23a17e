"""``e2e-infra init``: the few files an adopting repository needs, written once, never overwritten.

What it writes into an existing repository (each only where it is missing):

- ``tasks.py`` and ``noxfile.py``: a few lines importing the task tree and the nox sessions;
- a commented ``[tool.e2e_infra]`` skeleton appended to ``pyproject.toml`` (created if missing);
  in a Node repository with Playwright configs, a section proposed from them instead
  (:mod:`e2e_infra.scaffold_node`); a file that already has the section is left alone, and the
  plan says so;
- ``.env.example`` with every ``E2E_*`` setting, commented; an existing one is left alone and
  the plan lists the settings it lacks;
- ``.gitignore`` entries for the tool's state and results folders.

A file it writes that the repository's ignore rules hide (``git check-ignore``) is named, with
the rule. :func:`plan` computes the changes without touching anything (``--dry-run`` prints it);
:func:`apply` writes them. Running it twice writes nothing the second time.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, replace
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
    advice: str = ""  # what to do by hand: an ignore rule that hides the file, ...
    suggested: str = ""  # lines to add by hand (shown with --dry-run)

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
    from .scaffold_node import node_plan

    text = _read(path)
    if text is not None and _SECTION.search(text):
        return Change(path, "skip", "", f"{path.name} already has [tool.e2e_infra]: left as it is")
    node = node_plan(path.parent)
    if node is not None:
        section = node.section()
        why = f"[tool.e2e_infra] proposed from {node.summary()}"
        advice = "".join(
            f"{config}: Playwright could not read it ({why}); its projects are missing: make it "
            "load (install, build what it imports), remove the section and run init again\n"
            for config, why in node.unreadable
        )
        if text is None:
            return Change(path, "create", section.lstrip("\n"), why, advice)
        glue = "" if text.endswith("\n") or not text else "\n"
        return Change(path, "append", glue + section, why, advice)
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


def _env_example(path: Path) -> Change:
    """``.env.example``: written when missing; else the settings it lacks, to add by hand."""
    from .scaffold_node import lines_missing_from

    change = _whole_file(path, "env.example", "every E2E_* setting, commented")
    if change.writes:
        return change
    missing = lines_missing_from(_read(path) or "", _template("env.example"))
    if not missing:
        return replace(change, why=f"{path.name} exists and names every E2E_* setting")
    names = [m.group(1) for line in missing if (m := re.match(r"#\s*(E2E_\w+)=", line))]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return replace(
        change,
        why=f"{path.name} exists: left as it is; it lacks {len(names)} E2E_* setting(s): {shown}",
        advice=f"to document them there, add the lines `e2e-infra init --dry-run` shows for "
        f"{path.name}\n",
        suggested="\n".join(missing) + "\n",
    )


def _ignored(root: Path, change: Change) -> Change:
    """A file ``init`` writes that the repository's ignore rules hide: say so, with the rule."""
    if not change.writes or change.path.name == ".gitignore":
        return change
    try:
        proc = subprocess.run(
            ["git", "check-ignore", "-v", "--no-index", "--", change.path.name],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return change  # no git here: nothing to say
    if proc.returncode != 0:  # 1: not ignored; 128: not a repository
        return change
    rule = proc.stdout.strip().split("\t")[0]
    note = (
        f"{change.path.name} is ignored by the repository's rules ({rule}): commit it with "
        f"`git add -f {change.path.name}`, or change that rule\n"
    )
    return replace(change, advice=change.advice + note)


def plan(root: Path) -> list[Change]:
    """What :func:`apply` would write into the repository at ``root`` (nothing is touched)."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; run init at the root of your repository")
    changes = [
        _whole_file(root / "tasks.py", "tasks.py.tmpl", "the invoke task collection"),
        _whole_file(root / "noxfile.py", "noxfile.py.tmpl", "the e2e-<project> nox sessions"),
        _pyproject(root / "pyproject.toml"),
        _env_example(root / ".env.example"),
        _gitignore(root / ".gitignore"),
    ]
    return [_ignored(root, change) for change in changes]


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
