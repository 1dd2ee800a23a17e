"""Unit tests of e2e_infra.databases that need no server: names, fingerprints, markers,
name reservation, the database cap and the sweep decisions."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.config import Config, DatabaseConfig
from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases import (
    DatabaseAllocator,
    MarkedDatabase,
    Marker,
    database_name,
    fingerprint,
    host_tag,
    parse_marker,
    spare_name,
    sweep,
    template_name,
    validate_dbname,
)
from e2e_infra.databases.markers import stale_spares
from e2e_infra.databases.migrations import CommandRunner, SqlDirectoryRunner
from e2e_infra.errors import DatabaseLimitError, InvalidNameError, UsageError
from e2e_infra.resources.leases import Lease, Owner, Registry, Transaction
from e2e_infra.testing import FakeClock

# Nothing listens here (our team's range): any accidental connection fails instead of hanging.
NOWHERE = ConnInfo(host="127.0.0.1", port=15599, user="postgres", password="pw")


class FakeRunner:
    description = "fake"

    def __init__(self, *items: tuple[str, bytes]) -> None:
        self.items = list(items)

    def inputs(self) -> list[tuple[str, bytes]]:
        return self.items

    def apply(self, target: ConnInfo) -> None:  # pragma: no cover - never applied here
        raise AssertionError("not expected")


def dead_owner() -> Owner:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner.of_pid(proc.pid, run_id="dead-run")
    proc.wait()
    return owner


def make_allocator(
    tmp_path: Path, clock: FakeClock | None = None, **database: object
) -> DatabaseAllocator:
    config = Config(
        root=tmp_path,
        source=None,
        state_dir=tmp_path / "state",
        results_dir=tmp_path / "results",
        database=DatabaseConfig(**database),  # type: ignore[arg-type]
    )
    return DatabaseAllocator(config, Registry(config.state_dir), NOWHERE, clock=clock)


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "Upper", "1abc", "a-b", 'x"; DROP DATABASE y; --', "a" * 64, "é"]
)
def test_database_names_outside_the_safe_pattern_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_dbname(bad)


@given(
    base=st.from_regex(r"[a-z][a-z0-9_]{0,19}", fullmatch=True),
    seed=st.from_regex(r"[a-z][a-z0-9_]{0,39}", fullmatch=True),
    project=st.from_regex(r"[a-z][a-z0-9_]{0,39}", fullmatch=True),
)
def test_generated_names_always_fit_63_bytes_and_keep_the_fingerprint(
    base: str, seed: str, project: str
) -> None:
    fp = "ab12" * 16
    tpl = template_name(base, seed, fp)
    assert len(tpl) <= 63 and tpl.endswith("_" + fp[:12]) and tpl.startswith(f"{base}_tpl_")
    plain = database_name(base, project)
    suffixed = database_name(base, project, "c0ffee")
    assert plain == f"{base}_{project}"
    assert len(suffixed) <= 63 and suffixed.endswith("_c0ffee") and suffixed != plain


# --- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_everything_that_shapes_the_data() -> None:
    mig = FakeRunner(("0001.sql", b"CREATE TABLE a ()"), ("0002.sql", b"CREATE TABLE b ()"))
    seed = FakeRunner(("seed:default/0001.sql", b"INSERT ..."))
    base = fingerprint(mig, seed, "default", 15)
    assert base == fingerprint(mig, seed, "default", 15)
    assert len(base) == 64
    variants = [
        fingerprint(
            FakeRunner(("0001.sql", b"CREATE TABLE a (x int)"), mig.items[1]), seed, "default", 15
        ),
        fingerprint(FakeRunner(("0001b.sql", mig.items[0][1]), mig.items[1]), seed, "default", 15),
        fingerprint(FakeRunner(mig.items[0]), seed, "default", 15),
        fingerprint(mig, FakeRunner(), "default", 15),
        fingerprint(mig, seed, "auth_only", 15),
        fingerprint(mig, seed, "default", 16),
        # Same bytes moved between migrations and seeds must not collide.
        fingerprint(FakeRunner(*mig.items, *seed.items), FakeRunner(), "default", 15),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_the_remembered_fingerprint_follows_every_change_to_the_input_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from e2e_infra.databases import names

    # Files written just now are "racy" (see _RACY_SECONDS); pretend they settled long ago.
    monkeypatch.setattr(names, "_RACY_SECONDS", -3600)
    allocator = make_allocator(tmp_path)
    mig_dir, seed_dir = tmp_path / "mig", tmp_path / "seeds" / "default"
    mig_dir.mkdir()
    seed_dir.mkdir(parents=True)
    first = mig_dir / "0001.sql"
    first.write_text("CREATE TABLE a ()")
    (seed_dir / "0001.sql").write_text("INSERT ...")
    old = 1_000_000_000  # 2001: long settled, so the result may be remembered
    for path in (first, seed_dir / "0001.sql"):
        os.utime(path, (old, old))

    def fp() -> str:
        seeds = SqlDirectoryRunner(seed_dir, record_prefix="seed:default/", what="seed")
        return allocator.fingerprints.get(SqlDirectoryRunner(mig_dir), seeds, "default", 15)

    def direct() -> str:
        seeds = SqlDirectoryRunner(seed_dir, record_prefix="seed:default/", what="seed")
        return fingerprint(SqlDirectoryRunner(mig_dir), seeds, "default", 15)

    base = fp()
    assert base == direct() and fp() == base and len(allocator.fingerprints.known) == 1
    # Same size, same mtime, new content: a replace (new inode, new ctime) is seen.
    replacement = mig_dir / "0001.tmp"
    replacement.write_text("CREATE TABLE b ()")
    os.utime(replacement, (old, old))
    replacement.replace(first)
    assert fp() == direct() != base
    # An added file is seen.
    (mig_dir / "0002.sql").write_text("CREATE TABLE c ()")
    assert fp() == direct()
    # A file changed just now is hashed again on every call, never remembered: a second write
    # of the same size in the same timestamp tick would not change its stamp.
    monkeypatch.setattr(names, "_RACY_SECONDS", 2)
    (mig_dir / "0002.sql").write_text("CREATE TABLE d ()")
    remembered = len(allocator.fingerprints.known)
    assert fp() == direct()
    assert len(allocator.fingerprints.known) == remembered


def test_fingerprint_covers_the_kind_of_runner_not_only_its_files(tmp_path: Path) -> None:
    (tmp_path / "0001.sql").write_text("CREATE TABLE a ()")
    sql_runner = SqlDirectoryRunner(tmp_path)
    command = CommandRunner("x", cwd=tmp_path)
    command.inputs = sql_runner.inputs  # type: ignore[method-assign]  # same files, other code
    seed = FakeRunner()
    assert fingerprint(sql_runner, seed, "d", 15) != fingerprint(command, seed, "d", 15)


# --- markers --------------------------------------------------------------------------------------


def test_only_e2e_infra_markers_are_recognised() -> None:
    assert parse_marker('e2e-infra {"tool": "e2e-infra", "kind": "database"}') == {
        "tool": "e2e-infra",
        "kind": "database",
    }
    assert parse_marker(None) is None
    assert parse_marker("production database, do not touch") is None
    assert parse_marker("e2e-infra not json") is None
    assert parse_marker('e2e-infra {"tool": "someone-else"}') is None
    assert parse_marker('e2e-infra ["tool"]') is None


# --- strategy -------------------------------------------------------------------------------------


def test_auto_clone_strategy_follows_fsync_and_explicit_choice_wins(tmp_path: Path) -> None:
    auto = make_allocator(tmp_path)
    assert auto.catalog.strategy("off", 15) == "FILE_COPY"
    assert auto.catalog.strategy("on", 15) == "WAL_LOG"
    assert auto.catalog.strategy("off", 14) is None  # no STRATEGY clause before 15
    forced = make_allocator(tmp_path, clone_strategy="wal_log")
    assert forced.catalog.strategy("off", 15) == "WAL_LOG"


# --- reservation and the cap ----------------------------------------------------------------------


def test_second_live_lease_of_a_project_gets_a_suffixed_name(tmp_path: Path) -> None:
    allocator = make_allocator(tmp_path)
    me = Owner.current(run_id="run-a")
    first, _ = allocator.clones.reserve("auth_tests", me, "tpl", "default", marked=0)
    second, _ = allocator.clones.reserve(
        "auth_tests", Owner.current(run_id="run-b"), "tpl", "d", marked=1
    )
    assert first.resource == "e2e_db_auth_tests"
    assert second.resource.startswith("e2e_db_auth_tests_") and second.resource != first.resource
    third, _ = allocator.clones.reserve(
        "auth_tests", Owner.current(run_id="run-b"), "tpl", "d", marked=2
    )
    assert third.resource not in {first.resource, second.resource}


def test_a_dead_owners_lease_gives_its_name_back(tmp_path: Path) -> None:
    allocator = make_allocator(tmp_path)
    stale, _ = allocator.clones.reserve("auth_tests", dead_owner(), "tpl", "default", marked=0)
    fresh, dead = allocator.clones.reserve(
        "auth_tests", Owner.current(), "tpl", "default", marked=1
    )
    assert fresh.resource == stale.resource == "e2e_db_auth_tests"
    # The dead owner's lease stays until the new database is marked: if that owner died while
    # creating its database, the lease is the proof that an unmarked one of that name is ours.
    assert [lease.id for lease in dead] == [stale.id]
    leases = allocator.registry.snapshot()
    assert [lease.id for lease in leases] == [stale.id, fresh.id]


def test_a_kept_database_keeps_its_name_until_it_expires(tmp_path: Path) -> None:
    clock = FakeClock()
    allocator = make_allocator(tmp_path, clock=clock)
    kept, _ = allocator.clones.reserve("auth_tests", dead_owner(), "tpl", "default", marked=0)
    with allocator.registry.transaction() as txn:
        txn.update(kept.with_data(keep_until=clock.time() + 60))
    during, _ = allocator.clones.reserve(
        "auth_tests", Owner.current(run_id="r1"), "t", "d", marked=1
    )
    assert during.resource != kept.resource
    clock.advance(61)
    after, _ = allocator.clones.reserve(
        "auth_tests", Owner.current(run_id="r2"), "t", "d", marked=2
    )
    assert after.resource == kept.resource


def test_the_cap_on_live_databases_is_a_clear_error(tmp_path: Path) -> None:
    allocator = make_allocator(tmp_path, max_databases=2)
    allocator.clones.reserve("one", Owner.current(), "tpl", "default", marked=0)
    with pytest.raises(DatabaseLimitError, match=r"max_databases = 2.*db.cleanup") as info:
        allocator.clones.reserve("two", Owner.current(), "tpl", "default", marked=2)  # server count
    assert info.value.limit == 2
    allocator.clones.reserve("two", Owner.current(), "tpl", "default", marked=1)
    with pytest.raises(DatabaseLimitError):
        allocator.clones.reserve(
            "three", Owner.current(), "tpl", "default", marked=0
        )  # leases count


# --- release without a server ---------------------------------------------------------------------


def test_release_needs_a_selector(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        make_allocator(tmp_path).release()


def test_release_of_nothing_is_a_no_op_that_needs_no_server(tmp_path: Path) -> None:
    allocator = make_allocator(tmp_path)
    assert allocator.release("auth_tests") == []
    assert allocator.release(run_id="nope") == []
    assert allocator.release_all() == []


def test_release_rejects_a_malformed_name_before_anything_else(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        make_allocator(tmp_path).release(name="x; DROP DATABASE postgres")


# --- what cleanup may drop ------------------------------------------------------------------------


def marked(kind: str, owner: Owner, lease_id: str = "nolease", **extra: object) -> MarkedDatabase:
    marker = {
        "tool": "e2e-infra",
        "base": "e2e_db",
        "kind": kind,
        "lease": lease_id,
        "host": owner.host,
        "pid": owner.pid,
        "start": owner.start_time,
        **extra,
    }
    return MarkedDatabase("e2e_db_x", Marker.from_json(marker), is_template=False)


def why_drop(
    allocator: DatabaseAllocator,
    txn: Transaction,
    item: MarkedDatabase,
    lease: Lease | None,
    now: float,
    *,
    lock_free: Callable[[str], bool] | None = None,
) -> str | None:
    return sweep.why_drop(txn, item, lease, now, shared=allocator.shared, lock_free=lock_free)


def test_sweep_drops_only_on_proof_of_death_or_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    allocator = make_allocator(tmp_path, clock=clock)
    alive, dead = Owner.current(), dead_owner()
    now = clock.time()
    live_lease = Lease(kind="database", resource="e2e_db_x", project="x", owner=alive)
    stale_lease = replace(live_lease, owner=dead)
    other_host = replace(dead, host="elsewhere")
    with allocator.registry.transaction() as txn:
        why = functools.partial(why_drop, allocator)
        assert why(txn, marked("database", alive, live_lease.id), live_lease, now) is None
        assert "stale" in (why(txn, marked("database", dead), stale_lease, now) or "")
        assert "no lease" in (why(txn, marked("database", dead), None, now) or "")
        assert why(txn, marked("database", alive), None, now) is None  # another state folder
        assert why(txn, marked("database", other_host), None, now) is None  # cannot prove
        kept = marked("kept", dead, keep_until=now + 10)
        assert why(txn, kept, None, now) is None
        assert "expired" in (why(txn, kept, None, now + 11) or "")
        assert "builder is gone" in (why(txn, marked("building", dead), None, now) or "")
        assert why(txn, marked("building", alive), None, now) is None
        assert why(txn, marked("template", dead), None, now) is None  # pruned by age instead


# --- shared servers -------------------------------------------------------------------------------


def shared_allocator(tmp_path: Path, host: str, **config: object) -> DatabaseAllocator:
    allocator = make_allocator(tmp_path)
    registry = Registry(allocator.config.state_dir, host=host, ttl=config.get("ttl"))  # type: ignore[arg-type]
    return DatabaseAllocator(allocator.config, registry, NOWHERE, clock=FakeClock(), shared=True)


def test_on_a_shared_server_names_carry_the_host_and_hosts_never_meet(tmp_path: Path) -> None:
    a = shared_allocator(tmp_path / "a", "runner-1")
    b = shared_allocator(tmp_path / "b", "runner-2")
    assert host_tag("runner-1") != host_tag("runner-2") and len(host_tag("x")) == 4
    first, _ = a.clones.reserve(
        "auth_tests", Owner.current(run_id="r1"), "tpl", "default", marked=0
    )
    other, _ = b.clones.reserve(
        "auth_tests", Owner.current(run_id="r1"), "tpl", "default", marked=1
    )
    again, _ = a.clones.reserve(
        "auth_tests", Owner.current(run_id="r2"), "tpl", "default", marked=2
    )
    assert first.resource == f"e2e_db_auth_tests_{host_tag('runner-1')}"
    assert other.resource == f"e2e_db_auth_tests_{host_tag('runner-2')}"
    assert again.resource.startswith(first.resource + "_")
    assert not make_allocator(tmp_path / "local").shared  # the embedded cluster keeps short names


def test_another_hosts_database_goes_only_on_lock_proof_or_after_the_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    allocator = shared_allocator(tmp_path, "runner-1", ttl=60.0)
    now = clock.time()
    other = replace(Owner.current(), host="runner-2")
    held = marked("database", other, hold=True, created_at=now)
    command = marked("database", other, hold=False, created_at=now)
    asked: list[str] = []

    def free(name: str) -> bool:
        asked.append(name)
        return True

    with allocator.registry.transaction() as txn:
        why = functools.partial(why_drop, allocator)
        assert why(txn, held, None, now, lock_free=lambda name: False) is None  # owner holds it
        assert "holds no lock" in (why(txn, held, None, now, lock_free=free) or "")
        assert why(txn, held, None, now) is None  # no probe: never proven
        assert why(txn, command, None, now + 59, lock_free=free) is None
        assert "lease_ttl" in (why(txn, command, None, now + 61, lock_free=free) or "")
        assert asked == ["e2e_db_x"]  # the lock is asked only about databases that hold it
        kept = marked("kept", other, hold=False, keep_until=now + 10)
        assert why(txn, kept, None, now, lock_free=free) is None  # a keep is honoured first
        # Same host id, dead pid: maybe another pid namespace with the same host id; only the
        # lock proof lets it go.
        mine = marked("database", replace(dead_owner(), host="runner-1"), hold=True)
        assert why(txn, mine, None, now, lock_free=lambda name: False) is None
        assert "gone" in (why(txn, mine, None, now, lock_free=free) or "")


# --- warm spares ----------------------------------------------------------------------------------


def spare(name: str, template: str, oid: int, created: float) -> MarkedDatabase:
    marker = {
        "tool": "e2e-infra",
        "base": "e2e_db",
        "kind": "spare",
        "template": template,
        "template_oid": oid,
        "created_at": created,
    }
    return MarkedDatabase(name, Marker.from_json(marker), is_template=False)


def template(name: str, seed: str, oid: int, created: float) -> MarkedDatabase:
    marker = {
        "tool": "e2e-infra",
        "base": "e2e_db",
        "kind": "template",
        "seed": seed,
        "created_at": created,
    }
    return MarkedDatabase(name, Marker.from_json(marker), is_template=True, oid=oid)


def test_spare_names_are_unique_and_carry_the_fingerprint() -> None:
    fp = "ab" * 32
    names = {spare_name("e2e_db", fp) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(f"e2e_db_spare_{fp[:12]}_") and len(n) <= 63 for n in names)


def test_only_spares_of_the_current_build_of_a_template_within_the_cap_survive(
    tmp_path: Path,
) -> None:
    allocator = make_allocator(tmp_path, spares=1)
    items = [
        template("tpl_old", "default", 10, 1.0),
        template("tpl_new", "default", 20, 2.0),
        template("tpl_auth", "auth", 30, 1.0),
        spare("s_old", "tpl_old", 10, 1.0),  # an older template of its seed
        spare("s_rebuilt", "tpl_new", 19, 1.0),  # an earlier build of the same name
        spare("s_gone", "tpl_gone", 5, 1.0),  # its template is gone
        spare("s_new1", "tpl_new", 20, 3.0),
        spare("s_new2", "tpl_new", 20, 4.0),  # beyond spares = 1
        spare("s_auth", "tpl_auth", 30, 1.0),
    ]
    verdicts = {
        item.name: why for item, why in stale_spares(items, allocator.config.database.spares)
    }
    # Templates of one seed live side by side (branches): s_old's template is still there.
    assert set(verdicts) == {"s_rebuilt", "s_gone", "s_new2"}
    assert "earlier build" in verdicts["s_rebuilt"]
    assert "gone" in verdicts["s_gone"] and "beyond spares = 1" in verdicts["s_new2"]


# --- bounded waits and errors at the edge ---------------------------------------------------------


def test_close_waits_for_the_spare_thread_only_until_its_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import threading
    import time

    allocator = make_allocator(tmp_path, clone_timeout=0.2)
    release = threading.Event()
    allocator.spares._thread = threading.Thread(target=release.wait, args=(30,))
    allocator.spares._thread.start()
    started = time.monotonic()
    try:
        allocator.close()
        assert time.monotonic() - started < 5
        assert "was not ready within 0.2s" in caplog.text
    finally:
        release.set()


def test_a_privilege_error_at_the_edge_is_one_masked_line_naming_the_fix(tmp_path: Path) -> None:
    from psycopg import errors as pgerrors

    from e2e_infra.errors import DatabaseError

    allocator = make_allocator(tmp_path)
    with pytest.raises(DatabaseError) as info, allocator.catalog.errors("build a template"):
        raise pgerrors.InsufficientPrivilege("permission denied to create database")
    error = info.value
    line = error.one_line()
    assert "needs CREATEDB: ALTER ROLE postgres CREATEDB" in line
    assert "permission denied to create database" in line and "pw" not in line.split("@")[0]
