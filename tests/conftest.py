"""Settings and fixtures for every test of e2e-infra's own suite (unit and integration).

The helpers behind the fixtures live in :mod:`support` (``tests/support/``), importable from any
test module and from module-scoped fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings
from support import REPO_ROOT
from support.cli import CLI, Cli

# No per-example deadline for hypothesis: the suite runs on 2-core CI machines beside real
# PostgreSQL servers, browsers and the integration tests' processes, where one example touching
# the filesystem took over the 200 ms default (test_bad_input's registry files). A deadline there
# measures the machine's load, not the code; a hang is still bounded by pytest-timeout's per-test
# timeout (pyproject.toml).
settings.register_profile("e2e-infra", deadline=None)
settings.load_profile("e2e-infra")


@pytest.fixture
def repo_root() -> Path:
    """The repository's root: its noxfile.py, tasks.py, pyproject.toml and demo/."""
    return REPO_ROOT


@pytest.fixture
def cli() -> Cli:
    """The tool's entry points (nox, invoke, the console script) of this checkout, as
    subprocesses: ``cli.nox(*args, env=..., cwd=..., timeout=...)``, ``cli.invoke(...)``,
    ``cli.console(...)``, ``cli.popen(cli.nox_argv(...), ...)``."""
    return CLI
