"""invoke tasks for e2e-infra: ``invoke --list`` shows them all.

Thin adapters: each task parses its arguments, calls the ``e2e_infra`` library and prints the
result (a table for people, one JSON document with ``--json``). Errors from the library become one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Collection, Context, task  # noqa: F401 -- used by each namespace
from invoke.exceptions import Exit

import e2e_infra

F = TypeVar("F", bound=Callable[..., Any])


# --- plumbing shared by every namespace ---------------------------------------------------------


def _setup_logging() -> None:
    root = logging.getLogger("e2e_infra")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def cli(fn: F) -> F:
    """Turn library errors into one line on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(c: Context, *args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(c, *args, **kwargs)
        except e2e_infra.E2EInfraError as exc:
            raise Exit(f"error: {exc.one_line()}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted: everything this command held was released", code=130) from None

    return wrapper  # type: ignore[return-value]


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout, and nothing else there."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def load() -> e2e_infra.Config:
    return e2e_infra.load_config()


# --- ports ----------------------------------------------------------------------------------------

ports = Collection("ports")

# --- pg -------------------------------------------------------------------------------------------

pg = Collection("pg")

# --- db -------------------------------------------------------------------------------------------

db = Collection("db")

# --- e2e ------------------------------------------------------------------------------------------

e2e = Collection("e2e")

# --- hooks ----------------------------------------------------------------------------------------

hooks = Collection("hooks")

# --- the tree -------------------------------------------------------------------------------------

ns = Collection(ports, pg, db, e2e, hooks)
