"""nox sessions of e2e-infra: `nox -j auto -t e2e` runs every E2E project at once."""

from e2e_infra.cli import register_sessions

register_sessions()

# ---- Above: what `e2e-infra init` writes for an adopting repository. Below: this repository's
# own development sessions (the test suite, the lock, the dependency bounds).
import nox  # noqa: E402

LOCK = ("pyproject.toml", "--all-extras", "--universal", "--python-version", "3.11")
CHECKS = "ruff check . && ruff format --check . && mypy && deptry ."


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """ruff, mypy, deptry, then every test on real PostgreSQL: what .ci/run runs."""
    session.run("sh", "-c", CHECKS)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=False)
def lock(session: nox.Session) -> None:
    """Refresh requirements-dev.txt (`-- --upgrade` for the newest; else only what changed)."""
    out = ("--custom-compile-command", "nox -s lock", "-o", "requirements-dev.txt")
    session.run("uv", "pip", "compile", *LOCK, *out, *session.posargs)


def _bounds(session: nox.Session, resolution: str) -> None:
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
