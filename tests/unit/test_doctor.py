"""The doctor's checks, one by one, on files under tmp_path and fake probes: nothing is started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from e2e_infra.config import Config, load_config
from e2e_infra.doctor import (
    Check,
    DoctorReport,
    check_folders,
    check_free_ports,
    check_port_range,
    check_registry,
)
from e2e_infra.resources.leases import Lease, Owner, Registry


def make(tmp_path: Path, extra: str = "", projects: int = 2) -> Config:
    body = (
        f'[tool.e2e_infra]\nstate_dir = "state"\nresults_dir = "out"\n'
        f'port_range = "19500-19509"\n{extra}\n'
    )
    body += "".join(f'[tool.e2e_infra.projects.p{i}]\ncommand = "true"\n' for i in range(projects))
    (tmp_path / "pyproject.toml").write_text(body)
    return load_config(tmp_path / "pyproject.toml", environ={})


def test_the_port_range_must_stay_out_of_the_ephemeral_range(tmp_path: Path) -> None:
    config = make(tmp_path)
    assert check_port_range(config, (32768, 60999)).status == "ok"
    overlap = check_port_range(config, (19000, 60999))
    assert overlap.status == "fail"
    assert "overlaps" in overlap.detail and "port_range" in overlap.fix
    assert check_port_range(config, None).status == "warn"  # cannot tell: say so
    allowed = make(tmp_path, "allow_ephemeral_overlap = true")
    assert check_port_range(allowed, (19000, 60999)).status == "warn"


def test_a_missing_registry_is_fine_and_a_corrupt_one_is_a_failure_with_the_fix(
    tmp_path: Path,
) -> None:
    config = make(tmp_path)
    checks, leases = check_registry(config)
    assert [c.status for c in checks] == ["ok", "ok"] and leases == []

    config.state_dir.mkdir()
    registry_file = config.state_dir / "leases.json"
    registry_file.write_text("{not json")
    checks, _ = check_registry(config)
    assert checks[0].status == "fail" and "e2e.cleanup" in checks[0].fix
    assert registry_file.read_text() == "{not json"  # the doctor never moves it aside

    registry_file.write_text(json.dumps({"version": 99, "leases": []}))
    checks, _ = check_registry(config)
    assert checks[0].status == "fail" and "schema version 99" in checks[0].detail


def dead_owner() -> Owner:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner.of_pid(proc.pid, run_id="gone")
    proc.wait()
    return owner


def test_stale_leases_and_malformed_records_are_warnings(tmp_path: Path) -> None:
    config = make(tmp_path)
    registry = Registry(config.state_dir, host=config.host_id)
    alive = Owner.current(host=config.host_id, run_id="me")
    with registry.transaction() as txn:
        txn.add(Lease("port", "19500", "p0", alive, data={"name": "backend"}))
        txn.add(Lease("port", "19501", "p1", dead_owner(), data={"name": "backend"}))
    document = json.loads((config.state_dir / "leases.json").read_text())
    document["leases"].append({"kind": "port"})  # malformed
    (config.state_dir / "leases.json").write_text(json.dumps(document))
    checks, leases = check_registry(config)
    health, stale = checks
    assert health.status == "warn" and "1 malformed record" in health.detail
    assert stale.status == "warn" and "19501" in stale.detail and "19500" not in stale.detail
    assert "e2e.cleanup" in stale.fix
    assert sorted(lease.resource for lease in leases) == ["19500", "19501"]


def test_free_ports_count_leases_and_taken_ports(tmp_path: Path) -> None:
    config = make(tmp_path, projects=3)  # all at once: 3 projects x 2 port names + 1 cluster = 7
    owner = Owner.current(host=config.host_id, run_id="me")
    leases = [Lease("port", str(p), "p0", owner) for p in (19500, 19501)]
    taken = {19502}
    check = check_free_ports(config, leases, probe=lambda port: port not in taken)
    assert check.status == "ok" and check.detail.startswith("7 of 10 ports free")
    taken = {19502, 19503, 19504, 19505}
    assert check_free_ports(config, leases, probe=lambda port: port not in taken).status == "warn"
    assert check_free_ports(config, leases, probe=lambda port: False).status == "fail"


def test_writable_state_and_results_folders_pass(tmp_path: Path) -> None:
    config = make(tmp_path)
    assert check_folders(config).status == "ok"


def test_only_failures_make_a_non_zero_exit() -> None:
    warn = Check("x", "warn", "meh")
    fail = Check("y", "fail", "broken", "fix it")
    assert DoctorReport((warn,)).exit_code == 0
    report = DoctorReport((warn, fail))
    assert report.exit_code == 1
    assert report.to_json()["failures"] == 1 and report.to_json()["ok"] is False
