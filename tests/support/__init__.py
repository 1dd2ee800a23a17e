"""Helpers shared by e2e-infra's own tests; the fixtures over them live in the conftest files.

``tests`` is on pytest's pythonpath (pyproject.toml), so a test module, a conftest or a
module-scoped fixture imports ``support.<module>``:

* :mod:`support.cli`: the tool's three entry points (nox, invoke, the console script) run as
  subprocesses the way a user runs them, and the environments they get.
* :mod:`support.configs`: ``pyproject.toml`` files and configs under a test's tmp folder.
* :mod:`support.clusters`: embedded PostgreSQL clusters that are stopped and removed afterwards,
  even after a test run that died without teardown.
* :mod:`support.databases`: what a test reads or drops on a cluster by hand.
* :mod:`support.runs`: what a run leaves: its results folders, its live processes, a nox run in a
  session of its own and the guardian of a session.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository's root: its noxfile.py, tasks.py, pyproject.toml and demo/."""

FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
"""Files the tests copy or run: a database's migrations and seeds, servers, adopter repos."""
