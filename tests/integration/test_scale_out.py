"""bench/scale_out.py as a test: hosts on one server through faults past the grace, every drop
audited against the runs live at that moment; and the same audit failing on a deliberate bug.

Each run starts its own server (ports 15530-15539), its own hosts in their own pid namespaces,
one of them in its own network namespace (root, ``unshare`` and ``ip`` are required: CI has them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
from support import REPO_ROOT
from support.cli import clean_environ

from e2e_infra.databases.shared import DEATH_GRACE

pytestmark = pytest.mark.integration

BENCH = REPO_ROOT / "bench" / "scale_out.py"


def simulate(*argv: str) -> tuple[int, dict[str, Any]]:
    assert os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"), "needs root"
    out = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--port-range", "15530-15539", *argv],
        capture_output=True,
        text=True,
        env=clean_environ(),
        cwd=REPO_ROOT,
        timeout=240,
    )
    assert out.stdout.strip(), out.stderr[-2000:]
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


def test_a_killed_host_an_outage_and_a_cut_past_the_grace_drop_nothing_unexplained() -> None:
    code, summary = simulate(
        *("--hosts", "3", "--seconds", "50", "--gap", "2", "--seed", "7"),
        *("--faults", "kill,outage,cut", "--outage", "8-8", "--cut", "12"),
    )
    assert summary["unexplained_drops"] == 0, summary["unexplained"]
    assert code == 0
    assert summary["host_kills"] >= 1
    assert summary["longest_outage_s"] > DEATH_GRACE and summary["longest_cut_s"] > DEATH_GRACE
    assert summary["grace_s"] == DEATH_GRACE
    assert summary["runs"] > 10 and summary["passed"] > 0
    assert summary["pid_namespaces"] and summary["skipped_faults"] == []
    # Every drop the server logged was matched: a release, a leftover, or an explained one.
    matched = summary["released_drops"] + summary["leftover_drops"] + summary["live_drops"]
    assert matched + len(summary["other_drops"]) == summary["drops_logged"]


def test_the_audit_fails_when_cleanup_trusts_a_pid_across_pid_namespaces() -> None:
    code, summary = simulate(
        *("--hosts", "2", "--seconds", "20", "--gap", "2", "--seed", "7"),
        *("--faults", "terminate", "--bug", "pid-check"),
    )
    assert summary["same_host_id"] and summary["bug"] == "pid-check"
    assert summary["unexplained_drops"] > 0 and summary["live_drops"] > 0
    assert code == 1
