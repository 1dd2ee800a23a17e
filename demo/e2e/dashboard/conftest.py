"""dashboard: the frontend pages and the backend data they display (backend + frontend)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _required_env(backend_url: str, frontend_url: str, database_url: str) -> None:
    """Fail every test with a clear message if a needed variable is missing."""
