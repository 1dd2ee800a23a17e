"""work_orders: list/get/create work orders and walk their status transitions (default seed)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _required_env(backend_url: str, database_url: str) -> None:
    """Fail every test with a clear message if BACKEND_URL or DATABASE_URL is missing."""


@pytest.fixture(scope="session")
def created() -> list[int]:
    """Ids of the work orders this suite created (the final test checks the exact count)."""
    return []
