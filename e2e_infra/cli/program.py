"""The ``e2e-infra`` console script (and ``python -m e2e_infra``): the task tree, no tasks.py."""

from __future__ import annotations

from invoke.program import Program

from .. import __version__
from .tree import namespace

__all__ = ["main", "program"]

program = Program(namespace=namespace, name="e2e-infra", binary="e2e-infra", version=__version__)


def main() -> None:
    program.run()
