"""nox sessions: `e2e-<project>` per configured project (`nox -j auto -t e2e`), and `tests`."""

import nox

from e2e_infra.cli import register_sessions

register_sessions()


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """ruff, mypy, then every test on real PostgreSQL: what .ci/run runs."""
    session.run("sh", "-c", "ruff check . && ruff format --check . && mypy")
    session.run("python", "-m", "pytest", *session.posargs)
