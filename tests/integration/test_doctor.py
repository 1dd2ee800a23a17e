"""``invoke e2e.doctor`` from the outside: real binaries, a real cluster, real ports.

The doctor must say the embedded cluster is startable without starting it, report a running one,
fail (exit 1) on a broken registry, an overlapping port range or an unreachable admin URL (with
the password masked), and exit 0 when only warnings remain.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.cli import CLI, Cli, config_environ
from support.clusters import running_cluster

import e2e_infra

pytestmark = pytest.mark.integration

PORT_RANGE = "19300-19399"


def write_config(folder: Path, port_range: str = PORT_RANGE) -> Path:
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.e2e_infra]
            state_dir = "{folder / "state"}"
            results_dir = "{folder / "results"}"
            port_range = "{port_range}"
            [tool.e2e_infra.projects.alpha]
            command = "true"
            servers = []
            [tool.e2e_infra.projects.beta]
            command = "true"
            servers = []
            """
        )
    )
    return folder / "pyproject.toml"


def doctor(config: Path, **extra: str) -> tuple[int, dict[str, Any], str]:
    env = config_environ(config, **extra)
    proc = CLI.invoke("e2e.doctor", "--json", env=env, cwd=config.parent, timeout=120)
    return proc.returncode, json.loads(proc.stdout), proc.stdout + proc.stderr


def by_name(report: dict[str, Any], name: str) -> list[dict[str, str]]:
    return [c for c in report["checks"] if c["name"] == name]


def test_a_healthy_machine_passes_and_the_cluster_is_startable_but_not_started(
    tmp_path: Path,
) -> None:
    config_path = write_config(tmp_path)
    code, report, _ = doctor(config_path)
    assert code == 0, report
    assert report["ok"] is True
    names = {c["name"] for c in report["checks"]}
    assert names >= {"binaries", "postgres", "postgres version", "port range", "registry"}
    assert names >= {"stale leases", "free ports", "folders"}
    (postgres,) = by_name(report, "postgres")
    assert postgres["status"] == "ok" and "startable" in postgres["detail"]
    assert by_name(report, "free ports")[0]["detail"].startswith("100 of 100 ports free")
    config = e2e_infra.load_config(config_path, environ={})
    registry = e2e_infra.make_registry(config)
    cluster = e2e_infra.LocalCluster(
        config, registry, e2e_infra.PortAllocator.from_config(config, registry)
    )
    assert not cluster.status().running  # the doctor did not start it


def test_a_running_cluster_is_reported_with_its_version(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    config = e2e_infra.load_config(config_path, environ={})
    with running_cluster(config) as cluster:
        code, report, _ = doctor(config_path)
        port = cluster.status().port
    assert code == 0, report
    (postgres,) = by_name(report, "postgres")
    assert (
        "the embedded cluster runs" in postgres["detail"] and f"port {port}" in postgres["detail"]
    )
    (version,) = by_name(report, "postgres version")
    assert version["status"] == "ok" and "PostgreSQL 15" in version["detail"]
    # The cluster's own port lease counts as leased.
    assert "(1 leased)" in by_name(report, "free ports")[0]["detail"]


def test_real_problems_exit_non_zero_and_say_what_to_fix(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, port_range="40000-40099")  # inside 32768-60999
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "leases.json").write_text("garbage")
    code, report, _ = doctor(config_path)
    assert code == 1
    failed = {c["name"]: c for c in report["checks"] if c["status"] == "fail"}
    assert set(failed) == {"port range", "registry"}
    assert "3100-5500" in failed["port range"]["fix"]
    assert "e2e.cleanup" in failed["registry"]["fix"]
    assert (tmp_path / "state" / "leases.json").read_text() == "garbage"  # left as it was


def test_an_unreachable_admin_url_fails_without_showing_the_password(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    url = "postgresql://app:s3cret-pw@127.0.0.1:19399/app"  # our range, nothing listens
    code, report, output = doctor(config_path, E2E_ADMIN_DATABASE_URL=url)
    assert code == 1
    (postgres,) = by_name(report, "postgres")
    assert postgres["status"] == "fail" and "127.0.0.1:19399" in postgres["detail"]
    assert "s3cret-pw" not in output
    (binaries,) = by_name(report, "binaries")
    assert binaries["status"] == "ok"  # found, or not needed with an admin URL


def test_warnings_alone_exit_zero_and_the_table_says_what_to_fix(tmp_path: Path, cli: Cli) -> None:
    config_path = write_config(tmp_path, port_range="40000-40099")
    env = config_environ(config_path, E2E_ALLOW_EPHEMERAL_OVERLAP="1")
    proc = cli.invoke("e2e.doctor", env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warn" in proc.stdout and "allowed by allow_ephemeral_overlap" in proc.stdout
    assert "ready (1 warning(s))" in proc.stdout
