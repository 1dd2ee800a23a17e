"""static_pages: the frontend alone; no database and no backend are running for this project."""

import os

import pytest


@pytest.fixture(scope="session")
def expected_backend_url() -> str:
    """The URL the frontend was started with: BACKEND_URL, else http://127.0.0.1:$BACKEND_PORT."""
    url = os.environ.get("BACKEND_URL", "").strip()
    port = os.environ.get("BACKEND_PORT", "").strip()
    if not url and port:
        url = f"http://127.0.0.1:{port}"
    if not url:
        pytest.fail(
            "neither BACKEND_URL nor BACKEND_PORT is set: static_pages checks that the frontend "
            "injected the backend URL it was started with, so it must know that URL. Run it "
            "through e2e-infra or export BACKEND_URL.",
            pytrace=False,
        )
    return url.rstrip("/")


@pytest.fixture(scope="session", autouse=True)
def _required_env(frontend_url: str, expected_backend_url: str) -> None:
    """Fail every test with a clear message if FRONTEND_URL or the backend URL is missing."""
