"""The demo backend never writes a connection string into its log, even when misconfigured."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import REPO_ROOT

APP = REPO_ROOT / "demo" / "backend" / "app.py"


@pytest.mark.parametrize(
    "args",
    [
        ["--fd", "3", "postgresql://app:hunter2@127.0.0.1:5432/app"],  # {database_url} as a word
        ["--port", "postgresql://app:hunter2@127.0.0.1:5432/app"],
        ["--port", "host=127.0.0.1 password=hunter2 dbname=app"],
        ["--port", "host=127.0.0.1 password='hunter2 x' dbname=app"],
    ],
)
def test_an_argument_error_does_not_echo_the_database_url(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(APP), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
