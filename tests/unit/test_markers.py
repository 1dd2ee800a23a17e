"""Unit tests of e2e_infra.databases.markers: the typed marker and the pure keep / drop policy.
No database, no processes: the facts about owners are given, not observed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.databases.markers import (
    MARKER_PREFIX,
    Action,
    Facts,
    Kind,
    MarkedDatabase,
    Marker,
    decide,
    parse_marker,
    stale_spares,
    status,
    templates_to_prune,
)

NOW = 1_800_000_000.0
HERE, THERE = "runner-1", "runner-2"


def db(kind: Kind = Kind.DATABASE, host: str = HERE, **fields: object) -> Marker:
    return Marker(kind=kind, base="e2e_db", host=host, pid=4242, start=1.5, **fields)  # type: ignore[arg-type]


def facts(**fields: object) -> Facts:
    return Facts(**{"now": NOW, "host": HERE, **fields})  # type: ignore[arg-type]


# --- parsing and serialising ----------------------------------------------------------------------


def test_a_lease_marker_is_written_exactly_as_the_tool_always_wrote_it() -> None:
    marker = Marker(
        kind=Kind.DATABASE,
        base="e2e_db",
        lease="abc",
        project="auth_tests",
        host=HERE,
        pid=12,
        start=3.25,
        run="run-1",
        created_at=10.0,
        template="e2e_db_tpl_default_0123456789ab",
        seed="default",
        hold=False,
    )
    expected = {
        "tool": "e2e-infra",
        "format": 3,  # TEMPLATE_FORMAT_VERSION
        "base": "e2e_db",
        "kind": "database",
        "lease": "abc",
        "project": "auth_tests",
        "host": HERE,
        "pid": 12,
        "start": 3.25,
        "run": "run-1",
        "created_at": 10.0,
        "keep_until": None,  # unset keys of its kind are written as null
        "template": "e2e_db_tpl_default_0123456789ab",
        "seed": "default",
        "hold": False,
    }
    assert marker.comment() == MARKER_PREFIX + json.dumps(
        expected, sort_keys=True, separators=(",", ":")
    )


def test_a_spare_marker_writes_only_the_keys_of_a_spare() -> None:
    spare = Marker(kind=Kind.SPARE, base="b", template="t", template_oid=7, fingerprint="ff")
    assert set(json.loads(spare.comment()[len(MARKER_PREFIX) :])) == {
        "tool",
        "format",
        "base",
        "kind",
        "template",
        "template_oid",
        "fingerprint",
        "seed",
        "host",
        "created_at",
    }


@pytest.mark.parametrize(
    "comment",
    [
        None,
        "",
        "production database, do not touch",
        "e2e-infra not json",
        'e2e-infra {"tool": "someone-else", "kind": "database"}',
        'e2e-infra ["tool"]',
        "e2e-infra null",
    ],
)
def test_anything_but_our_marker_is_not_a_marker(comment: str | None) -> None:
    assert Marker.parse(comment) is None and parse_marker(comment) is None


def test_fields_of_the_wrong_type_read_as_unset_and_unknown_kinds_as_unknown() -> None:
    forged = {
        "tool": "e2e-infra",
        "kind": ["database"],
        "base": 5,
        "pid": True,
        "start": "yesterday",
        "keep_until": False,
        "hold": "yes",
        "template_oid": 1.5,
    }
    marker = Marker.parse(MARKER_PREFIX + json.dumps(forged))
    assert marker is not None
    assert marker.kind is Kind.UNKNOWN
    assert (marker.base, marker.pid, marker.start, marker.keep_until) == (None, None, None, None)
    assert (marker.hold, marker.template_oid) == (None, None)
    newer = Marker.parse('e2e-infra {"tool": "e2e-infra", "kind": "snapshot", "extra": 1}')
    assert newer is not None and newer.kind is Kind.UNKNOWN
    assert decide(newer, facts()).action is Action.KEEP  # a kind we do not know is never ours


_text = st.none() | st.text(max_size=20)
_number = (
    st.none() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
)
_integer = st.none() | st.integers(-(2**63), 2**63)

markers = st.builds(
    Marker,
    kind=st.sampled_from(Kind),
    base=_text,
    format=_integer,
    lease=_text,
    project=_text,
    host=_text,
    pid=_integer,
    start=_number,
    run=_text,
    created_at=_number,
    keep_until=_number,
    template=_text,
    template_oid=_integer,
    fingerprint=_text,
    seed=_text,
    hold=st.none() | st.booleans(),
)


@given(markers)
def test_every_marker_survives_its_comment(marker: Marker) -> None:
    comment = marker.comment()
    assert comment.startswith(MARKER_PREFIX)
    assert Marker.parse(comment) == marker
    assert Marker.from_json(marker.to_json()) == marker


@given(markers, st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=40))
def test_the_comment_statement_quotes_the_name_and_the_marker(marker: Marker, tail: str) -> None:
    statement = marker.comment_sql("e2e_" + tail).as_string(None)
    assert statement.startswith(f'COMMENT ON DATABASE "e2e_{tail}" IS ')


# --- keep or drop: project databases --------------------------------------------------------------


def test_a_live_lease_keeps_and_a_stale_one_drops() -> None:
    assert decide(db(), facts(has_lease=True)).action is Action.KEEP
    verdict = decide(db(), facts(has_lease=True, lease_stale="owner pid 4242 is gone"))
    assert verdict.drop and verdict.reason == "lease is stale: owner pid 4242 is gone"


def test_without_a_lease_only_a_proven_dead_owner_on_this_host_drops() -> None:
    assert decide(db(), facts()).action is Action.KEEP  # another state folder, say
    gone = decide(db(), facts(owner_gone="owner pid 4242 is gone"))
    assert gone.drop and gone.reason == "no lease and owner pid 4242 is gone"
    # A pid means nothing on another host: the fact is not trusted there.
    elsewhere = db(host=THERE)
    assert decide(elsewhere, facts(owner_gone="owner pid 4242 is gone")).action is Action.KEEP


def test_a_keep_is_honoured_until_it_expires_and_the_leases_keep_wins() -> None:
    kept = db(Kind.KEPT, keep_until=NOW + 10)
    assert decide(kept, facts(owner_gone="gone")).action is Action.KEEP
    assert "expired" in decide(kept, facts(now=NOW + 11)).reason
    assert decide(kept, facts(now=NOW + 11)).drop
    # The lease's keep (updated first by a release --keep) wins over the marker's.
    longer = facts(now=NOW + 11, has_lease=True, lease_keep_until=NOW + 60)
    assert decide(kept, longer).action is Action.KEEP


def test_on_a_shared_server_another_hosts_database_needs_lock_proof_or_the_ttl() -> None:
    shared = facts(shared=True, ttl=60.0)
    held = db(host=THERE, hold=True, created_at=NOW)
    verdict = decide(held, shared)
    assert verdict.action is Action.DROP_IF_UNLOCKED and "holds no lock" in verdict.reason
    command = db(host=THERE, hold=False, created_at=NOW)
    assert decide(command, replace(shared, now=NOW + 59)).action is Action.KEEP
    late = decide(command, replace(shared, now=NOW + 61))
    assert late.drop and "lease_ttl (60s)" in late.reason
    assert decide(command, replace(shared, now=NOW + 10**6, ttl=None)).action is Action.KEEP
    # This host's own databases too need the lock proof: a dead-looking pid may live in another
    # pid namespace that uses the same host id.
    mine = db(hold=True)
    verdict = decide(mine, replace(shared, owner_gone="owner pid 4242 is gone"))
    assert verdict.action is Action.DROP_IF_UNLOCKED and "4242 is gone" in verdict.reason


def test_a_command_allocation_on_a_shared_server_lives_until_its_renewable_expiry() -> None:
    shared = facts(shared=True, ttl=None, owner_gone="owner pid 4242 is gone")
    for host in (HERE, THERE):  # never by pid, even on the same host id
        command = db(host=host, hold=False, created_at=NOW - 10**6, expires=NOW + 5)
        assert decide(command, shared).action is Action.KEEP
        late = decide(command, replace(shared, now=NOW + 6))
        assert late.drop and "not renewed" in late.reason


def test_templates_and_spares_are_never_dropped_by_the_owner_policy() -> None:
    for kind in (Kind.TEMPLATE, Kind.SPARE):
        assert decide(db(kind), facts(owner_gone="gone")).action is Action.KEEP


def test_a_half_built_template_goes_only_when_its_builder_is_gone() -> None:
    assert decide(db(Kind.BUILDING), facts()).action is Action.KEEP
    verdict = decide(db(Kind.BUILDING), facts(owner_gone="owner pid 4242 is gone"))
    assert verdict.drop and "builder is gone" in verdict.reason


def test_on_a_shared_server_a_half_built_template_needs_the_lock_proof_never_a_pid() -> None:
    shared = facts(shared=True, owner_gone="owner pid 4242 is gone")
    for host in (HERE, THERE):  # the same host id may be another pid namespace
        verdict = decide(db(Kind.BUILDING, host=host), shared)
        assert verdict.action is Action.DROP_IF_UNLOCKED and "build lock" in verdict.reason
    assert status(db(Kind.BUILDING), replace(shared, locked=True)) == "building"
    assert status(db(Kind.BUILDING), replace(shared, locked=False)).startswith("unlocked: ")


@given(
    st.sampled_from([Kind.DATABASE, Kind.KEPT]),
    st.booleans(),
    st.booleans(),
    st.none() | st.floats(NOW - 100, NOW + 100),
)
def test_nothing_whose_owner_may_live_and_whose_keep_holds_is_ever_dropped(
    kind: Kind, shared: bool, other_host: bool, keep_until: float | None
) -> None:
    marker = db(kind, host=THERE if other_host else HERE, keep_until=keep_until, hold=True)
    verdict = decide(marker, facts(shared=shared, ttl=None))
    if keep_until is not None and keep_until > NOW:
        assert verdict.action is Action.KEEP
    elif keep_until is None:
        assert not verdict.drop  # no proof of death was given


# --- the status line ------------------------------------------------------------------------------


def test_status_names_what_each_database_is_waiting_for() -> None:
    assert status(db(Kind.TEMPLATE), facts()) == "ready"
    assert status(db(Kind.BUILDING), facts()) == "building"
    assert status(db(Kind.BUILDING), facts(owner_gone="x")) == "abandoned: x"
    assert status(db(Kind.SPARE, template="t"), facts()) == "spare of t"
    assert status(db(), facts(has_lease=True)) == "live"
    assert status(db(), facts(owner_gone="x")) == "stale: no lease and x"
    assert status(db(), facts()).startswith("live (no lease here")
    shared = facts(shared=True)
    assert status(db(host=THERE, hold=True), shared) == f"live (host {THERE} holds its lock)"
    assert status(db(host=THERE), shared) == f"live (host {THERE} allocated by a command)"
    assert status(db(Kind.KEPT, keep_until=NOW + 60), facts()).startswith("kept until ")


# --- spares and templates -------------------------------------------------------------------------


def item(name: str, marker: Marker, oid: int | None = None) -> MarkedDatabase:
    return MarkedDatabase(name, marker, is_template=marker.kind is Kind.TEMPLATE, oid=oid)


def tpl(name: str, seed: str, oid: int, created: float) -> MarkedDatabase:
    return item(name, Marker(kind=Kind.TEMPLATE, seed=seed, created_at=created), oid)


def spare(name: str, template: str, oid: int, created: float) -> MarkedDatabase:
    marker = Marker(kind=Kind.SPARE, template=template, template_oid=oid, created_at=created)
    return item(name, marker)


def test_only_the_oldest_spares_of_the_current_build_of_each_template_within_the_cap_survive() -> (
    None
):
    marked = [
        tpl("tpl_old", "default", 10, 1.0),
        tpl("tpl_new", "default", 20, 2.0),
        spare("s_old", "tpl_old", 10, 1.0),
        spare("s_rebuilt", "tpl_new", 19, 1.0),
        spare("s_gone", "tpl_gone", 5, 1.0),
        spare("s_second", "tpl_new", 20, 4.0),
        spare("s_first", "tpl_new", 20, 3.0),
    ]
    doomed = {entry.name: why for entry, why in stale_spares(marked, cap=1)}
    # tpl_old lives on (another branch's template): its spare stays.
    assert set(doomed) == {"s_rebuilt", "s_gone", "s_second"}
    no_spares = {entry.name for entry, _ in stale_spares(marked, cap=0)}
    assert no_spares == set(doomed) | {"s_first", "s_old"}


def test_templates_go_when_unused_for_the_age_and_beyond_the_most_recently_used_of_a_seed() -> None:
    marked = [
        tpl("a1", "default", 1, 1.0),
        tpl("a2", "default", 2, 2.0),
        tpl("a3", "default", 3, 3.0),
        tpl("b1", "auth", 4, 1.0),
        spare("s", "a3", 3, 1.0),
    ]

    def prune(keep: str | None, limit: int, now: float = 1000.0, age: float = 100.0) -> set[str]:
        doomed = templates_to_prune(marked, keep=keep, limit=limit, now=now, max_age=age)
        return {entry.name for entry, _ in doomed}

    assert prune(None, 2) == {"a1"}
    assert prune(None, 2, now=50.0) == set()  # all used within the age: all stay
    # The template just built (or used) stays even if its clock was behind.
    assert prune("a1", 1) == {"a2", "a3"}
    # Last use, not creation, orders them: a1 cloned recently outranks the newer a2 and a3.
    used = Marker(kind=Kind.TEMPLATE, seed="default", created_at=1.0, last_used=990.0)
    marked[0] = item("a1", used, 1)
    assert prune(None, 1) == {"a2", "a3"}
    assert prune(None, 1, age=20.0) == {"a2", "a3"}
    reasons = [
        why for _, why in templates_to_prune(marked, keep=None, limit=1, now=1000.0, max_age=0)
    ]
    assert reasons and all("keep_templates = 1" in why for why in reasons)


def test_a_spare_is_claimable_only_from_the_same_build_of_the_same_template() -> None:
    spare_marker = Marker(kind=Kind.SPARE, base="b", template="t", template_oid=7, fingerprint="ff")
    assert spare_marker.is_spare_of("b", "t", 7, "ff")
    assert not spare_marker.is_spare_of("b", "t", 8, "ff")  # rebuilt since
    assert not spare_marker.is_spare_of("b", "t", None, "ff")
    assert not spare_marker.is_spare_of("other", "t", 7, "ff")
    assert not replace(spare_marker, kind=Kind.DATABASE).is_spare_of("b", "t", 7, "ff")


def test_a_database_with_a_time_to_live_lives_until_it_expires_whatever_its_pid() -> None:
    # db.allocate --ttl on the local cluster: the owner's pid is gone by design (a CI step).
    leased = db(expires=NOW + 60)
    for known in (facts(owner_gone="owner pid 4242 is gone"), facts(shared=True)):
        assert decide(leased, known).action is Action.KEEP
    expired = decide(leased, facts(now=NOW + 61, owner_gone="owner pid 4242 is gone"))
    assert expired.drop and "expired" in expired.reason
    assert status(leased, facts(has_lease=True)).startswith("live until ")
