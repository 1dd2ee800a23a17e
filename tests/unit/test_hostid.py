"""Unit tests of e2e_infra.config.hostid: a default host id that two hosts cannot share."""

from __future__ import annotations

from pathlib import Path

from e2e_infra.config.hostid import default_host_id, host_identity


def test_the_same_hostname_on_other_machines_or_pid_namespaces_gives_other_ids() -> None:
    here = default_host_id("runner", ("machine-1", "4026531836"))
    assert here.startswith("runner-") and here == default_host_id(
        "runner", ("machine-1", "4026531836")
    )
    other_namespace = default_host_id("runner", ("machine-1", "4026532001"))
    other_machine = default_host_id("runner", ("machine-2", "4026531836"))
    assert len({here, other_namespace, other_machine}) == 3


def test_the_identity_reads_the_machine_id_else_the_boot_id(tmp_path: Path) -> None:
    (tmp_path / "proc/sys/kernel/random").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/random/boot_id").write_text("boot-7\n")
    assert host_identity(tmp_path) == ("boot-7", "")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("m-1\n")
    assert host_identity(tmp_path)[0] == "m-1"


def test_this_process_has_a_pid_namespace_and_a_stable_default_id() -> None:
    _machine, namespace = host_identity()
    assert namespace.isdigit()
    assert default_host_id() == default_host_id()
