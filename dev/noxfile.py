"""This repository's own development sessions: the test suite, the lock, the dependency bounds.

    nox -f dev/noxfile.py -s tests          what .ci/run runs: ruff, mypy, deptry, pytest
    nox -f dev/noxfile.py -s lock           refresh requirements-dev.txt
    nox -f dev/noxfile.py -s deps-newest    the newest versions the ranges allow
    nox -f dev/noxfile.py -s deps-lowest    the lowest (true lower bounds)

Kept apart from the root ``noxfile.py``, which is exactly what ``e2e-infra init`` writes for an
adopting repository (a few lines over the installed package). nox runs a noxfile's sessions in
its folder; each session here goes back to the repository root first.
"""

from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent.parent
nox.options.envdir = str(ROOT / ".nox")  # where ruff, mypy and deptry already look away

LOCK = ("pyproject.toml", "--all-extras", "--universal", "--python-version", "3.11")
CHECKS = "ruff check . && ruff format --check . && mypy && deptry ."


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """ruff, mypy, deptry, then every test on real PostgreSQL: what .ci/run runs."""
    session.chdir(ROOT)
    session.run("sh", "-c", CHECKS)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=False)
def lock(session: nox.Session) -> None:
    """Refresh requirements-dev.txt (`-- --upgrade` for the newest; else only what changed)."""
    session.chdir(ROOT)
    out = (
        "--custom-compile-command",
        "nox -f dev/noxfile.py -s lock",
        "-o",
        "requirements-dev.txt",
    )
    session.run("uv", "pip", "compile", *LOCK, *out, *session.posargs)


def _bounds(session: nox.Session, resolution: str) -> None:
    session.chdir(ROOT)
    session.install(f"--resolution={resolution}", "-e", ".[dev]")
    session.run("uv", "pip", "check")
    session.run("sh", "-c", CHECKS, external=True)
    session.run("python", "-m", "pytest", "tests/unit", "-p", "no:cacheprovider", "-q")
    projects = "auth_tests,browser_ui"  # a database project and pytest-playwright in a browser
    session.run("python", "-m", "e2e_infra", "e2e.all", "--projects", projects)


@nox.session(name="deps-newest", venv_backend="uv")
def deps_newest(session: nox.Session) -> None:
    """The newest versions every range allows, in a fresh venv: checks, unit tests, demo."""
    _bounds(session, "highest")


@nox.session(name="deps-lowest", venv_backend="uv")
def deps_lowest(session: nox.Session) -> None:
    """The lowest versions the declared ranges allow (true lower bounds), the same checks."""
    _bounds(session, "lowest-direct")
