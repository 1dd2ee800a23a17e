"""The lease registry: file format, atomic writes, corruption recovery, owner proof, the lock."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import filelock
import pytest

from e2e_infra.errors import LockTimeoutError, RegistryError
from e2e_infra.resources.leases import (
    SCHEMA_VERSION,
    Lease,
    Owner,
    Registry,
    new_run_id,
    process_start_time,
)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state", host="here", lock_timeout=5)


@pytest.fixture
def me() -> Owner:
    return Owner.current(host="here", run_id="run-1")


def gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


def lease(owner: Owner, resource: str = "20000", created_at: float = 1_700_000_000.0) -> Lease:
    return Lease("port", resource, "web", owner, created_at=created_at, data={"name": "backend"})


def test_a_lease_survives_the_round_trip_through_the_file(registry: Registry, me: Owner) -> None:
    original = lease(me, created_at=123.5)
    with registry.transaction() as txn:
        txn.add(original)

    assert Registry(registry.state_dir, host="here").snapshot() == (original,)


def test_the_file_is_versioned_json_with_every_field_of_a_lease(
    registry: Registry, me: Owner
) -> None:
    with registry.transaction() as txn:
        txn.add(lease(me))

    document = json.loads(registry.path.read_text())
    assert document["version"] == SCHEMA_VERSION
    (record,) = document["leases"]
    assert set(record) == {"id", "kind", "resource", "project", "owner", "created_at", "data"}
    assert set(record["owner"]) == {"pid", "start_time", "host", "run_id"}


def test_writes_leave_no_temporary_files_and_keep_the_folder_private(
    registry: Registry, me: Owner
) -> None:
    for index in range(3):
        with registry.transaction() as txn:
            txn.add(lease(me, resource=str(20000 + index)))

    names = sorted(path.name for path in registry.state_dir.iterdir())
    assert names == [".gitignore", "leases.json", "leases.json.lock"]
    assert stat.S_IMODE(registry.state_dir.stat().st_mode) == 0o700


def test_a_read_only_transaction_does_not_write(registry: Registry) -> None:
    with registry.transaction() as txn:
        assert txn.leases == ()
    assert not registry.path.exists()


def test_an_error_inside_a_transaction_writes_nothing(registry: Registry, me: Owner) -> None:
    with pytest.raises(RuntimeError), registry.transaction() as txn:
        txn.add(lease(me))
        raise RuntimeError("boom")
    assert registry.snapshot() == ()


def test_remove_is_idempotent_and_update_needs_a_registered_lease(
    registry: Registry, me: Owner
) -> None:
    held = lease(me)
    with registry.transaction() as txn:
        txn.add(held)
        assert txn.update(held.with_data(pgid=42)).data == {"name": "backend", "pgid": 42}
        assert txn.remove(held) is True
        assert txn.remove(held.id) is False
        with pytest.raises(RegistryError, match="not registered"):
            txn.update(held)


def test_find_filters_by_kind_project_resource_and_run(registry: Registry, me: Owner) -> None:
    other_run = Owner.current(host="here", run_id="run-2")
    with registry.transaction() as txn:
        txn.add(lease(me, resource="1"))
        txn.add(lease(other_run, resource="2"))
        txn.add(Lease("database", "db", "api", me))
        assert [x.resource for x in txn.find("port")] == ["1", "2"]
        assert [x.resource for x in txn.find(run_id="run-2")] == ["2"]
        assert [x.resource for x in txn.find(project="api")] == ["db"]
        assert [x.resource for x in txn.find("port", resource="2")] == ["2"]


@pytest.mark.parametrize(
    "content",
    [
        b'{"version": 1, "leases": [{"id": "ab',
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"version": 99, "leases": []}',
    ],
    ids=["truncated", "empty", "not-utf8", "not-an-object", "future-version"],
)
def test_a_bad_registry_is_kept_aside_with_a_warning_and_rebuilt(
    registry: Registry, me: Owner, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    registry.state_dir.mkdir(parents=True)
    registry.path.write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="e2e_infra"), registry.transaction() as txn:
        assert txn.leases == ()
        txn.add(lease(me))

    (aside,) = registry.state_dir.glob("leases.json.corrupt-*")
    assert aside.read_bytes() == content
    assert str(aside) in caplog.text
    assert len(registry.snapshot()) == 1


def test_a_malformed_record_is_dropped_and_the_others_kept(
    registry: Registry, me: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    good = lease(me)
    registry.state_dir.mkdir(parents=True)
    document = {"version": SCHEMA_VERSION, "leases": [good.to_json(), {"id": "x"}]}
    registry.path.write_text(json.dumps(document))

    with caplog.at_level(logging.WARNING, logger="e2e_infra"):
        assert registry.snapshot() == (good,)
    assert "dropped malformed record #1" in caplog.text


@pytest.mark.parametrize(
    "owner",
    [
        {"pid": 0, "start_time": 1.0, "host": "h", "run_id": "r"},
        {"pid": True, "start_time": 1.0, "host": "h", "run_id": "r"},
        {"pid": 5, "start_time": "soon", "host": "h", "run_id": "r"},
        {"pid": 5, "start_time": 1.0, "host": None, "run_id": "r"},
    ],
)
def test_owner_records_with_bad_fields_are_refused(owner: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Owner.from_json(owner)


def test_a_live_owner_is_not_stale(registry: Registry, me: Owner) -> None:
    with registry.transaction() as txn:
        assert txn.stale_reason(lease(me)) is None
    assert me.is_alive()


def test_an_owner_whose_pid_is_gone_is_stale(registry: Registry) -> None:
    dead = Owner(pid=gone_pid(), start_time=1.0, host="here", run_id="r")
    with registry.transaction() as txn:
        reason = txn.stale_reason(lease(dead))
    assert reason is not None and "is gone" in reason
    assert not dead.is_alive()


def test_an_owner_whose_pid_was_reused_is_stale(registry: Registry, me: Owner) -> None:
    impostor = Owner(pid=me.pid, start_time=me.start_time - 1000, host="here", run_id="r")
    with registry.transaction() as txn:
        reason = txn.stale_reason(lease(impostor))
    assert reason is not None and "reused" in reason


def test_a_ttl_never_reclaims_a_live_owner_on_this_host(tmp_path: Path, me: Owner) -> None:
    registry = Registry(tmp_path, host="here", ttl=1.0)
    with registry.transaction() as txn:
        assert txn.stale_reason(lease(me, created_at=0.0)) is None


def test_an_owner_on_another_host_is_stale_only_past_the_ttl(tmp_path: Path) -> None:
    elsewhere = Owner(pid=1, start_time=1.0, host="other-host", run_id="r")
    with Registry(tmp_path, host="here").transaction() as txn:
        assert txn.stale_reason(lease(elsewhere, created_at=0.0)) is None  # no TTL: never
    with Registry(tmp_path, host="here", ttl=60).transaction() as txn:
        young = lease(elsewhere, created_at=txn.now - 10)
        old = lease(elsewhere, created_at=txn.now - 120)
        assert txn.stale_reason(young) is None
        reason = txn.stale_reason(old)
        assert reason is not None and "other-host" in reason and "TTL" in reason


def test_stale_lists_only_the_stale_leases_of_a_kind(registry: Registry, me: Owner) -> None:
    dead = Owner(pid=gone_pid(), start_time=1.0, host="here", run_id="r")
    with registry.transaction() as txn:
        txn.add(lease(me, resource="1"))
        txn.add(lease(dead, resource="2"))
        txn.add(Lease("database", "db", "web", dead))
        assert [(x.resource, "gone" in why) for x, why in txn.stale("port")] == [("2", True)]
        assert len(txn.stale()) == 2


def test_a_held_lock_times_out_with_an_error_naming_the_lock(registry: Registry) -> None:
    registry.snapshot()  # creates the folder
    blocked = Registry(registry.state_dir, host="here", lock_timeout=0.05)
    holder = filelock.FileLock(str(registry.lock_path), thread_local=False)
    with holder, pytest.raises(LockTimeoutError) as caught:
        blocked.snapshot()
    assert caught.value.lock_path == str(registry.lock_path)
    assert "E2E_LOCK_TIMEOUT" in caught.value.one_line()


def test_owner_of_a_missing_pid_is_refused_with_the_fix() -> None:
    with pytest.raises(RegistryError, match="pass the pid of a live process"):
        Owner.of_pid(gone_pid())


def test_process_start_time_is_none_for_pids_that_cannot_be_live() -> None:
    assert process_start_time(0) is None
    assert process_start_time(-1) is None
    assert process_start_time(gone_pid()) is None
    assert process_start_time(os.getpid()) == pytest.approx(Owner.current().start_time)


def test_run_ids_are_unique() -> None:
    assert len({new_run_id() for _ in range(200)}) == 200


def test_an_owner_that_cannot_be_inspected_is_not_proof_of_death(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    from e2e_infra.resources.leases import Lease, Owner, process_state

    owner = Owner(pid=os.getpid(), start_time=0.0, host=registry.host, run_id="r1")
    with registry.transaction() as txn:
        txn.add(Lease(kind="port", resource="3100", project="p", owner=owner))

    def denied(pid: int) -> psutil.Process:
        raise psutil.AccessDenied(pid)

    monkeypatch.setattr(psutil, "Process", denied)  # e.g. another user's process under hidepid
    assert process_state(os.getpid(), 0.0) == "unknown"
    with registry.transaction() as txn:
        assert txn.stale() == []
    monkeypatch.undo()
    assert process_state(os.getpid(), 0.0) == "reused"


def test_a_new_state_folder_is_private_and_ignores_itself(tmp_path: Path) -> None:
    from e2e_infra.files import ensure_private_dir

    state = ensure_private_dir(tmp_path / "repo" / ".e2e-infra")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (state / ".gitignore").read_text().splitlines()[-1] == "*"


def test_an_existing_shared_folder_keeps_its_mode(tmp_path: Path) -> None:
    from e2e_infra.files import ensure_private_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    ensure_private_dir(shared)
    Registry(shared, host="h").snapshot()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_a_state_path_under_a_regular_file_is_one_folder_error(tmp_path: Path) -> None:
    from e2e_infra.errors import FolderError
    from e2e_infra.files import ensure_private_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="state_dir"):
        ensure_private_dir(tmp_path / "file" / "state")
    with pytest.raises(FolderError, match="is not a folder"):
        ensure_private_dir(tmp_path / "file")


def test_a_lease_with_a_time_to_live_is_judged_by_its_expiry_never_its_owners_pid(
    registry: Registry,
) -> None:
    # A CI step's shell: gone as soon as the step ends, its lease meant to outlive it.
    dead = Owner(pid=gone_pid(), start_time=1.0, host="here", run_id="r")
    with registry.transaction() as txn:
        txn.now = 1_700_000_000.0
        alive = lease(dead).with_data(expires=txn.now + 60)
        assert txn.stale_reason(alive) is None
        txn.now += 61
        reason = txn.stale_reason(alive)
    assert reason is not None and reason.startswith("its time to live ran out at ")
