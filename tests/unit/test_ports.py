"""PortAllocator against a real registry file and a fake probe: no socket is ever bound here."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from e2e_infra.config import Config, PortRange
from e2e_infra.errors import InvalidNameError, PortRangeError, PortsExhaustedError, UsageError
from e2e_infra.resources.leases import Lease, Owner, Registry
from e2e_infra.resources.ports import PortAllocator, ephemeral_port_range
from e2e_infra.testing import FakePortProbe

RANGE = PortRange(20000, 20009)
KERNEL = (32768, 60999)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state", lock_timeout=5)


@pytest.fixture
def me() -> Owner:
    return Owner.current(run_id="run-1")


def allocator(
    registry: Registry, probe: FakePortProbe | None = None, port_range: PortRange = RANGE
) -> PortAllocator:
    return PortAllocator(
        registry, port_range, ephemeral_range=KERNEL, probe=probe or FakePortProbe()
    )


def dead_owner(registry: Registry) -> Owner:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return Owner(pid=proc.pid, start_time=1.0, host=registry.host, run_id="dead-run")


def live_foreigner(run_id: str = "other") -> Owner:
    return Owner.of_pid(1, run_id=run_id)  # init: alive for as long as the test runs


def test_allocates_one_distinct_port_per_name_inside_the_range(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry).allocate("web", ["backend", "frontend"], me)

    assert list(ports) == ["backend", "frontend"]
    assert len(set(ports.values())) == 2
    assert all(port in RANGE for port in ports.values())


def test_each_port_is_recorded_as_a_port_lease_of_the_project_and_owner(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry).allocate("web", ["backend", "frontend"], me)

    leases = {lease.data["name"]: lease for lease in registry.snapshot()}
    assert set(leases) == {"backend", "frontend"}
    for name, lease in leases.items():
        assert (lease.kind, lease.resource, lease.project) == ("port", str(ports[name]), "web")
        assert lease.owner == me


def test_the_same_owner_asking_again_gets_the_same_ports_and_no_new_leases(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry)
    first = ports.allocate("web", ["backend", "frontend"], me)
    again = ports.allocate("web", ["frontend", "backend"], me)

    assert again == first
    assert len(registry.snapshot()) == 2


def test_asking_again_for_one_more_name_keeps_the_others(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    first = ports.allocate("web", ["backend"], me)
    more = ports.allocate("web", ["backend", "admin"], me)

    assert more["backend"] == first["backend"]
    assert more["admin"] != first["backend"]
    assert len(registry.snapshot()) == 2


def test_another_run_of_the_same_process_gets_its_own_ports(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    first = ports.allocate("web", ["backend"], me)
    other_run = ports.allocate("web", ["backend"], Owner.current(run_id="run-2"))

    assert other_run["backend"] != first["backend"]


def test_ports_leased_by_live_owners_are_neither_probed_nor_given_out(
    registry: Registry, me: Owner
) -> None:
    probe = FakePortProbe()
    ports = allocator(registry, probe)
    theirs = ports.allocate("api", ["backend", "frontend"], live_foreigner())
    probe.probed.clear()

    mine = ports.allocate("web", ["backend", "frontend"], me)

    assert not set(mine.values()) & set(theirs.values())
    assert not set(probe.probed) & set(theirs.values())


def test_ports_the_probe_finds_taken_are_skipped(registry: Registry, me: Owner) -> None:
    taken = set(range(20000, 20008))
    ports = allocator(registry, FakePortProbe(busy=taken)).allocate("web", ["a", "b"], me)

    assert sorted(ports.values()) == [20008, 20009]


def test_the_scan_wraps_around_the_end_of_the_range(registry: Registry, me: Owner) -> None:
    everything_but_the_first = set(range(20001, 20010))
    probe = FakePortProbe(busy=everything_but_the_first)

    assert allocator(registry, probe).allocate("web", ["a"], me) == {"a": 20000}


def test_projects_start_their_scan_at_different_ports(registry: Registry, me: Owner) -> None:
    ports = allocator(registry, port_range=PortRange(20000, 22999))
    firsts = {ports.allocate(f"p{i}", ["a"], me)["a"] for i in range(8)}

    assert len(firsts) == 8
    assert not firsts <= set(range(20000, 20008))  # not simply the lowest ports in order


def test_exhaustion_names_who_holds_what_and_the_fix_and_leases_nothing(
    registry: Registry, me: Owner
) -> None:
    small = PortRange(20000, 20004)
    ports = allocator(registry, FakePortProbe(busy={20004}), port_range=small)
    ports.allocate("api", ["a", "b"], live_foreigner("x"))
    ports.allocate("jobs", ["a"], live_foreigner("y"))
    before = registry.snapshot()

    with pytest.raises(PortsExhaustedError) as caught:
        ports.allocate("web", ["backend", "frontend"], me)

    error = caught.value
    assert (error.low, error.high, error.wanted) == (20000, 20004, 2)
    assert error.leased == {"api": 2, "jobs": 1}
    message = error.one_line()
    assert "20000-20004" in message
    assert "api: 2" in message and "jobs: 1" in message
    assert "3 of 5 ports are leased" in message
    assert "1 are taken by other processes" in message
    assert "E2E_PORT_RANGE" in message and "invoke ports.release" in message
    assert registry.snapshot() == before


def test_allocate_reclaims_a_dead_owners_ports_and_logs_it(
    registry: Registry, me: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    small = PortRange(20000, 20001)
    ports = allocator(registry, port_range=small)
    ports.allocate("crashed", ["a", "b"], dead_owner(registry))

    with caplog.at_level(logging.INFO, logger="e2e_infra"):
        mine = ports.allocate("web", ["a", "b"], me)

    assert sorted(mine.values()) == [20000, 20001]
    assert {lease.project for lease in registry.snapshot()} == {"web"}
    assert "reclaimed port" in caplog.text and "crashed" in caplog.text


def test_a_live_owners_lease_is_never_reclaimed_however_old(tmp_path: Path, me: Owner) -> None:
    registry = Registry(tmp_path / "state", ttl=1.0)  # a TTL is no proof against a live owner
    with registry.transaction() as txn:
        txn.add(Lease("port", "20000", "old", me, created_at=0.0, data={"name": "a"}))
        txn.add(Lease("port", "20001", "older", live_foreigner(), created_at=0.0))

    ports = allocator(registry, port_range=PortRange(20000, 20002))
    assert ports.reclaim_stale() == []
    assert ports.allocate("web", ["a"], me) == {"a": 20002}
    assert {lease.project for lease in ports.leases()} == {"old", "older", "web"}


def test_allocate_for_run_tells_whether_another_live_run_holds_the_projects_ports(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry)
    ports.allocate("web", ["a"], dead_owner(registry))  # a crashed run: not "another run"
    ports.allocate("api", ["a"], live_foreigner("other"))  # another project: never counted

    mine, others = ports.allocate_for_run("web", ["a", "b"], me)
    assert others is False and len(set(mine.values())) == 2
    assert {(lease.project, lease.owner.run_id) for lease in registry.snapshot()} == {
        ("web", "run-1"),
        ("api", "other"),
    }  # the dead run's lease went in the same transaction
    assert ports.allocate_for_run("web", ["a", "b"], me) == (mine, False)  # asking again

    theirs, others = ports.allocate_for_run("web", ["a"], live_foreigner("second"))
    assert others is True and theirs["a"] not in mine.values()


def test_allocate_for_run_exhausted_raises_and_keeps_the_reclaims(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry, port_range=PortRange(20000, 20001))
    ports.allocate("crashed", ["a"], dead_owner(registry))
    ports.allocate("api", ["a"], live_foreigner("x"))

    with pytest.raises(PortsExhaustedError):
        ports.allocate_for_run("web", ["a", "b"], me)
    assert [lease.project for lease in registry.snapshot()] == ["api"]  # nothing half-leased


def test_reclaim_stale_returns_each_dead_lease_with_its_reason(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry)
    ports.allocate("web", ["a"], me)
    ports.allocate("crashed", ["a", "b"], dead_owner(registry))

    reclaimed = ports.reclaim_stale()

    assert sorted(lease.project for lease, _ in reclaimed) == ["crashed", "crashed"]
    assert all("is gone" in reason for _, reason in reclaimed)
    assert [lease.project for lease in ports.leases()] == ["web"]
    assert ports.reclaim_stale() == []


def test_non_port_leases_are_left_alone(registry: Registry, me: Owner) -> None:
    with registry.transaction() as txn:
        txn.add(Lease("database", "e2e_db_web", "web", dead_owner(registry)))
    ports = allocator(registry)

    assert ports.reclaim_stale() == []
    assert ports.release_all() == []
    assert [lease.kind for lease in registry.snapshot()] == ["database"]


def test_reallocate_leases_a_different_port_and_drops_the_old_one(
    registry: Registry, me: Owner
) -> None:
    ports = allocator(registry)
    first = ports.allocate("web", ["backend", "frontend"], me)

    fresh = ports.reallocate("web", "backend", me)

    assert fresh not in first.values()
    held = {lease.data["name"]: int(lease.resource) for lease in ports.leases()}
    assert held == {"backend": fresh, "frontend": first["frontend"]}


def test_reallocate_keeps_the_old_lease_when_no_port_is_left(registry: Registry, me: Owner) -> None:
    ports = allocator(registry, port_range=PortRange(20000, 20000))
    ports.allocate("web", ["backend"], me)

    with pytest.raises(PortsExhaustedError):
        ports.reallocate("web", "backend", me)
    assert [lease.resource for lease in ports.leases()] == ["20000"]


def test_release_is_idempotent_and_touches_only_that_project(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    ports.allocate("web", ["a", "b"], me)
    ports.allocate("api", ["a"], me)

    released = ports.release("web")
    assert sorted(lease.data["name"] for lease in released) == ["a", "b"]
    assert ports.release("web") == []
    assert [lease.project for lease in ports.leases()] == ["api"]


def test_release_by_run_id_keeps_other_runs(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    ports.allocate("web", ["a"], me)
    ports.allocate("web", ["a"], Owner.current(run_id="run-2"))

    assert len(ports.release("web", run_id="run-2")) == 1
    assert [lease.owner.run_id for lease in ports.leases()] == ["run-1"]


def test_release_all_drops_every_port_lease(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    ports.allocate("web", ["a"], me)
    ports.allocate("api", ["a"], live_foreigner())

    assert len(ports.release_all()) == 2
    assert ports.leases() == []
    assert ports.release_all() == []


def test_leases_with_status_tells_live_from_stale(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    ports.allocate("web", ["a"], me)
    ports.allocate("crashed", ["a"], dead_owner(registry))

    status = {lease.project: reason for lease, reason in ports.leases_with_status()}
    assert status["web"] is None
    assert status["crashed"] is not None and "is gone" in status["crashed"]
    assert len(registry.snapshot()) == 2  # looking reclaims nothing


@pytest.mark.parametrize("project", ["", "Web", "1web", "web-app", "a" * 41, "web\n"])
def test_malformed_project_names_are_refused_before_anything_is_leased(
    registry: Registry, me: Owner, project: str
) -> None:
    with pytest.raises(InvalidNameError) as caught:
        allocator(registry).allocate(project, ["a"], me)
    assert caught.value.exit_code == 2
    assert registry.snapshot() == ()


@pytest.mark.parametrize("names", [[], ["a", "a"], ["Backend"], ["front-end"]])
def test_bad_port_name_lists_are_refused(registry: Registry, me: Owner, names: list[str]) -> None:
    with pytest.raises(UsageError):
        allocator(registry).allocate("web", names, me)
    assert registry.snapshot() == ()


def test_a_lone_name_is_one_port_not_its_letters(registry: Registry, me: Owner) -> None:
    assert list(allocator(registry).allocate("web", "backend", me)) == ["backend"]


def test_a_range_overlapping_the_ephemeral_range_is_refused_with_the_fix(
    registry: Registry,
) -> None:
    with pytest.raises(PortRangeError) as caught:
        PortAllocator(registry, PortRange(30000, 40000), ephemeral_range=KERNEL)
    message = caught.value.one_line()
    assert "30000-40000" in message and "32768-60999" in message
    assert "allow_ephemeral_overlap" in message and "E2E_PORT_RANGE" in message
    assert caught.value.exit_code == 2


def test_an_overlapping_range_is_accepted_when_forced(registry: Registry, me: Owner) -> None:
    ports = PortAllocator(
        registry,
        PortRange(60990, 60999),
        ephemeral_range=KERNEL,
        allow_ephemeral_overlap=True,
        probe=FakePortProbe(),
    )
    assert ports.allocate("web", ["a"], me)["a"] in PortRange(60990, 60999)


def test_ranges_touching_the_ephemeral_range_edges(registry: Registry) -> None:
    PortAllocator(registry, PortRange(3100, 32767), ephemeral_range=KERNEL)
    PortAllocator(registry, PortRange(61000, 65535), ephemeral_range=KERNEL)
    with pytest.raises(PortRangeError):
        PortAllocator(registry, PortRange(60999, 61000), ephemeral_range=KERNEL)


def test_from_config_takes_the_range_and_the_overlap_policy(
    registry: Registry, tmp_path: Path
) -> None:
    config = Config(
        root=tmp_path,
        source=None,
        state_dir=tmp_path / "state",
        results_dir=tmp_path,
        port_range=PortRange(40000, 40010),
        allow_ephemeral_overlap=True,
    )
    assert PortAllocator.from_config(config, registry).port_range == PortRange(40000, 40010)


def test_ephemeral_port_range_reads_the_kernel_file_format(tmp_path: Path) -> None:
    good = tmp_path / "range"
    good.write_text("32768\t60999\n")
    assert ephemeral_port_range(good) == (32768, 60999)
    for text in ("", "32768", "a b", "60999 32768", "0 10"):
        good.write_text(text)
        assert ephemeral_port_range(good) is None, text
    assert ephemeral_port_range(tmp_path / "missing") is None


def test_release_all_keeps_a_live_clusters_own_lease(registry: Registry, me: Owner) -> None:
    ports = allocator(registry)
    ports.allocate("postgres", ["postgres"], me)  # what the embedded cluster files its port under
    ports.allocate("web", ["backend"], me)
    released = ports.release_all()
    assert [lease.project for lease in released] == ["web"]
    assert [lease.project for lease in ports.leases()] == ["postgres"]
