"""browser_ui: a real Chromium driven by pytest-playwright (backend + frontend).

Playwright cannot download its own browsers here, so the suite drives an installed Chromium:
``CHROMIUM_PATH`` if set, else the first of ``chromium``, ``chromium-headless-shell``,
``google-chrome`` on PATH. Playwright's output settings are left at their defaults
(``test-results/`` under the working folder, emptied by pytest-playwright at every run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import pytest

BROWSER_NAMES = ("chromium", "chromium-headless-shell", "google-chrome")
CHROMIUM = pytest.StashKey[str]()


def find_chromium(environ: Mapping[str, str] = os.environ) -> str:
    """The browser executable to drive; UsageError with the fix when there is none."""
    configured = environ.get("CHROMIUM_PATH", "").strip()
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise pytest.UsageError(
                f"CHROMIUM_PATH={configured} is not an executable file; point it at the "
                f"Chromium binary (e.g. /usr/bin/chromium) or unset it to search PATH"
            )
        return found
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise pytest.UsageError(
        f"no Chromium found (CHROMIUM_PATH is unset and none of {', '.join(BROWSER_NAMES)} "
        f"is on PATH): install it with `apt-get install chromium` or set CHROMIUM_PATH"
    )


def pytest_configure(config: pytest.Config) -> None:
    # At start-up, so a missing browser is one line before any test runs, not an error per test.
    config.stash[CHROMIUM] = find_chromium()


@pytest.fixture(scope="session")
def browser_type_launch_args(
    browser_type_launch_args: dict[str, Any], pytestconfig: pytest.Config
) -> dict[str, Any]:
    # Not channel=: Playwright only looks for its own channels' install paths.
    return {**browser_type_launch_args, "executable_path": pytestconfig.stash[CHROMIUM]}


@pytest.fixture(scope="session", autouse=True)
def _required_env(backend_url: str, frontend_url: str, database_url: str) -> None:
    """Fail every test with a clear message if a needed variable is missing."""
