"""Warm spares against the real session cluster: prepared after a release, claimed by rename,
capped, counted, never handed out from an old template, swept when half-made."""

from __future__ import annotations

import select
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support.clusters import PgCluster
from support.databases import DB_FIXTURES, Factory, admin_execute, databases, dead_owner

from e2e_infra.databases import DatabaseAllocator, spare_name
from e2e_infra.errors import DatabaseLimitError
from e2e_infra.resources.leases import Lease, Owner

pytestmark = pytest.mark.integration


def oid_of(pg: PgCluster, name: str) -> int | None:
    with psycopg.connect(pg.admin.conninfo()) as conn:
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return None if row is None else int(row[0])


def spares_of(pg: PgCluster, allocator: DatabaseAllocator) -> dict[str, dict[str, Any]]:
    return {
        name: marker
        for name, marker in databases(pg, allocator.base + "_").items()
        if marker is not None and marker["kind"] == "spare"
    }


def test_a_release_prepares_a_spare_and_the_next_allocation_is_that_spare_renamed(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(spares=1)
    first = allocator.allocate("alpha", Owner.current())
    assert spares_of(pg_cluster, allocator) == {}  # nothing before a release
    allocator.release("alpha")
    allocator.close()  # joins the background preparation

    spares = spares_of(pg_cluster, allocator)
    assert len(spares) == 1
    (spare, marker), template_oid = next(iter(spares.items())), oid_of(pg_cluster, first.template)
    assert spare.startswith(f"{allocator.base}_spare_")
    assert (marker["template"], marker["template_oid"]) == (first.template, template_oid)
    assert allocator.registry.snapshot() == ()  # the making lease is gone once it is marked
    spare_oid = oid_of(pg_cluster, spare)

    me = Owner.current()
    got = allocator.allocate("beta", me)
    assert got.name == f"{allocator.base}_beta"
    assert oid_of(pg_cluster, got.name) == spare_oid  # the same database, renamed: no clone
    assert oid_of(pg_cluster, spare) is None
    marker = databases(pg_cluster, got.name)[got.name]
    assert marker is not None
    assert (marker["kind"], marker["lease"], marker["pid"]) == ("database", got.lease.id, me.pid)
    with psycopg.connect(got.url.conninfo()) as conn:  # the template's schema and seed
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (3,)

    allocator.release("beta")
    allocator.close()
    assert len(spares_of(pg_cluster, allocator)) == 1  # topped up again, never beyond the cap


def test_one_admin_connection_serves_the_allocator_and_one_the_server_ended_is_replaced(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(spares=1)
    allocator.allocate("alpha", Owner.current())
    allocator.release("alpha")
    allocator.close()  # joins the spare; closes the admin connection too
    assert allocator.connections.kept is None
    allocator.allocate("beta", Owner.current())
    kept = allocator.connections.kept
    assert kept is not None and not kept.closed
    assert kept.info.host.startswith("/")  # the embedded cluster's unix socket, not TCP
    allocator.release("beta")
    assert allocator.connections.kept is kept  # the same connection, lent again
    allocator.close()
    assert kept.closed and allocator.connections.kept is None

    got = allocator.allocate("gamma", Owner.current())
    kept = allocator.connections.kept
    assert kept is not None
    admin_execute(pg_cluster, "SELECT pg_terminate_backend(%s)", kept.info.backend_pid)
    deadline = time.monotonic() + 5
    while not select.select([kept.pgconn.socket], [], [], 0)[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert allocator.release("gamma") == [got.name]  # a new connection, no error
    assert allocator.connections.kept is not None and allocator.connections.kept is not kept
    allocator.close()


def test_spares_are_capped_per_template_and_count_toward_max_databases(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(spares=2, max_databases=3)
    owner = Owner.current()
    for project in ("one", "two", "three"):
        allocator.allocate(project, owner)
    template = allocator.find("one").template
    assert allocator.prepare_spares(template) == []  # 3 live databases: no room left
    allocator.release_all()
    allocator.close()
    assert len(spares_of(pg_cluster, allocator)) == 2  # three releases, cap two

    claimed = [allocator.allocate(p, owner) for p in ("four", "five")]  # both from spares
    assert spares_of(pg_cluster, allocator) == {}
    allocator.allocate("six", owner)  # cold clone: 3 live now
    with pytest.raises(DatabaseLimitError, match="max_databases = 3"):
        allocator.allocate("seven", owner)
    assert len({c.name for c in claimed}) == 2

    # Lowering the setting lets cleanup drop the spares beyond it.
    allocator.release_all()
    allocator.close()
    assert len(spares_of(pg_cluster, allocator)) == 2
    lowered = make_allocator(name_base=allocator.base, spares=1)
    dropped = dict(lowered.cleanup())
    assert len(dropped) == 1 and "beyond spares = 1" in next(iter(dropped.values()))
    assert len(spares_of(pg_cluster, allocator)) == 1


def test_concurrent_allocations_never_share_a_spare(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(spares=3)
    template = allocator.ensure_template("default")
    made = allocator.prepare_spares(template)
    assert len(made) == 3
    spare_oids = {oid_of(pg_cluster, name) for name in made}
    workers = [
        DatabaseAllocator(
            allocator.config,
            type(allocator.registry)(allocator.config.state_dir),
            allocator.admin,
            client=allocator.client,
        )
        for _ in range(6)
    ]
    barrier = threading.Barrier(len(workers))
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = workers[index].allocate(f"p{index}", Owner.current()).name
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    names = set(results.values())
    assert len(names) == 6
    oids = {oid_of(pg_cluster, name) for name in names}
    assert len(oids) == 6 and None not in oids
    assert oids & spare_oids == spare_oids  # every spare went to exactly one allocation
    assert spares_of(pg_cluster, allocator) == {}
    markers = databases(pg_cluster, allocator.base + "_")
    assert all(markers[name] and markers[name]["kind"] == "database" for name in names)
    assert sorted(allocator.release_all()) == sorted(names)
    for worker in workers:
        worker.close()
    allocator.close()


def test_spares_of_an_old_or_rebuilt_template_are_never_handed_out_and_are_dropped(
    make_allocator: Factory, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    # One template per seed, however recently used: the old one goes when the new one is built.
    allocator = make_allocator(
        spares=1, migrations_dir=migrations, keep_templates=1, template_keep_hours=0
    )
    template = allocator.ensure_template("default")
    (old_spare,) = allocator.prepare_spares(template)

    # A rebuild of the same fingerprint is another database (another OID): its spare is stale.
    assert allocator.ensure_template("default", rebuild=True) == template
    assert oid_of(pg_cluster, old_spare) is None

    # A spare whose marker names the right template but not this build is never claimed.
    (spare,) = allocator.prepare_spares(template)
    forged = spare_name(allocator.base, databases(pg_cluster, spare)[spare]["fingerprint"])  # type: ignore[index]
    admin_execute(
        pg_cluster,
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(forged), sql.Identifier(template)
        ),
    )
    marker = {**databases(pg_cluster, spare)[spare], "template_oid": 1}  # type: ignore[dict-item]
    admin_execute(
        pg_cluster,
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(forged),
            sql.Literal("e2e-infra " + __import__("json").dumps(marker)),
        ),
    )
    admin_execute(  # the genuine spare goes, so only the forged one is left to tempt
        pg_cluster, sql.SQL("DROP DATABASE {}").format(sql.Identifier(spare))
    )
    forged_oid = oid_of(pg_cluster, forged)
    got = allocator.allocate("alpha", Owner.current())
    assert oid_of(pg_cluster, got.name) != forged_oid
    assert forged in dict(allocator.cleanup())

    # Editing a migration makes a new template; the old template's spares go with the change.
    allocator.release("alpha")
    allocator.close()
    (before,) = spares_of(pg_cluster, allocator)
    with (migrations / "0002_notes.sql").open("a") as handle:
        handle.write("\nALTER TABLE notes ADD COLUMN extra int;\n")
    changed = allocator.allocate("beta", Owner.current())
    assert changed.template != template
    assert before not in databases(pg_cluster, allocator.base + "_")
    allocator.release("beta")
    allocator.close()
    assert [m["template"] for m in spares_of(pg_cluster, allocator).values()] == [changed.template]


def test_cleanup_drops_a_half_made_spare_of_a_dead_maker_but_no_other_unmarked_database(
    make_allocator: Factory, pg_cluster: PgCluster
) -> None:
    allocator = make_allocator(spares=1)
    template = allocator.ensure_template("default")
    half = f"{allocator.base}_spare_000000000000_abcdef"
    stranger = f"{allocator.base}_spare_000000000000_fedcba"
    for name in (half, stranger):
        admin_execute(
            pg_cluster,
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            ),
        )
    with allocator.registry.transaction() as txn:  # died between CREATE and COMMENT
        txn.add(Lease(kind="spare", resource=half, project="(spares)", owner=dead_owner()))
    dropped = dict(allocator.cleanup())
    assert "half-made spare" in dropped[half]
    present = databases(pg_cluster, allocator.base + "_")
    assert half not in present and stranger in present and present[stranger] is None
    assert allocator.registry.snapshot() == ()
