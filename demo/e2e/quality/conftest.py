"""quality: list and record quality checks with defects (default seed)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _required_env(backend_url: str, database_url: str) -> None:
    """Fail every test with a clear message if BACKEND_URL or DATABASE_URL is missing."""


@pytest.fixture(scope="session")
def work_order(admin, project_name):
    """A work order of this suite, released and in progress, so it can be inspected."""
    wo = admin.post_json(
        "/api/work-orders",
        {"sku": "FG-011", "quantity": 40, "notes": f"e2e quality {project_name}"},
        expected=201,
    )
    for status in ("released", "in_progress"):
        admin.post_json(f"/api/work-orders/{wo['id']}/status", {"status": status})
    return wo
