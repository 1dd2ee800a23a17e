"""nox sessions of e2e-infra: `nox -j auto -t e2e` runs every E2E project at once."""

from e2e_infra.cli import register_sessions

register_sessions()
