"""inventory: list stock, adjust it with movement records, refuse negative stock (default seed)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _required_env(backend_url: str, database_url: str) -> None:
    """Fail every test with a clear message if BACKEND_URL or DATABASE_URL is missing."""


@pytest.fixture(scope="session")
def item(admin):
    """FG-003 in the main warehouse of plant A."""
    page = admin.get_json("/api/inventory?sku=FG-003&location=PLANT-A-WH1")
    assert page["total"] == 1, page
    return page["items"][0]
