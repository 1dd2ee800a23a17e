"""auth_tests: login, tokens and sessions; runs on the auth_only seed (users, no MES data)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _required_env(backend_url: str, database_url: str) -> None:
    """Fail every test with a clear message if BACKEND_URL or DATABASE_URL is missing."""
