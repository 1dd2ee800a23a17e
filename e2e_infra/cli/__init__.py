"""The command line of e2e-infra: invoke collections, nox sessions and the console script.

The only sub-package that imports invoke or nox. What a monorepo keeps at its root:

- ``tasks.py``: ``from e2e_infra.cli import namespace``; add your own tasks next to ours with
  ``Collection(*namespace.collections.values(), *namespace.tasks.values(), mine)``.
- ``noxfile.py``: ``from e2e_infra.cli import register_sessions; register_sessions()``.
- Without either, the ``e2e-infra`` console script (or ``python -m e2e_infra``) runs the same
  tasks: ``e2e-infra db.allocate --project auth_tests --json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .program import main, program
    from .sessions import register_sessions
    from .tree import namespace

__all__ = ["main", "namespace", "program", "register_sessions"]

_LAZY = {
    "namespace": "tree",
    "program": "program",
    "main": "program",
    "register_sessions": "sessions",
}


def __getattr__(name: str) -> Any:
    # A noxfile imports register_sessions without paying for invoke, and tasks.py the other way.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
