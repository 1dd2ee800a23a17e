"""The db.* invoke tasks as real subprocesses, and a cold start of 8 allocating processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from support import REPO_ROOT
from support.cli import Cli, Invoke, config_environ
from support.clusters import PgCluster
from support.configs import make_config, write_pyproject

from e2e_infra.conninfo import ConnInfo
from e2e_infra.postgres import LocalCluster
from e2e_infra.resources.leases import Owner
from e2e_infra.run.workspace import Workspace

pytestmark = pytest.mark.integration

DEMO = REPO_ROOT / "demo"


def test_allocate_json_carries_the_real_url_and_human_output_masks_it(
    db_invoke: Invoke, pg_cluster: PgCluster
) -> None:
    password = pg_cluster.tcp.password
    assert password
    done = db_invoke("db.allocate", "--project", "auth_tests", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert set(document) == {
        *("project", "database", "database_url", "template", "seed", "run_id"),
        *("lease", "expires"),  # its lease's id, and no expiry without --ttl
    }
    assert document["expires"] is None
    # The project's own role and password: the admin's never reaches a project.
    role = ConnInfo.parse(document["database_url"])
    assert role.user == role.dbname == document["database"]
    assert role.password and password not in document["database_url"]
    with psycopg.connect(document["database_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (3,)

    url = db_invoke("db.url", "--project", "auth_tests")
    assert url.returncode == 0 and url.stdout.strip() == document["database_url"]

    human = db_invoke("db.allocate", "--project", "auth_tests")  # a second one: suffixed name
    listing = db_invoke("db.list")
    listing_json = db_invoke("db.list", "--json")
    for output in (human, listing, listing_json):
        assert output.returncode == 0, output.stderr
        assert password not in output.stdout + output.stderr
        assert role.password not in output.stdout + output.stderr
    assert "***" in human.stdout
    kinds = sorted(row["kind"] for row in json.loads(listing_json.stdout)["databases"])
    assert kinds == ["database", "database", "template"]

    released = db_invoke("db.release", "--project", "auth_tests")
    assert released.returncode == 0 and released.stdout.count("dropped") == 2
    again = db_invoke("db.release", "--project", "auth_tests")
    assert again.returncode == 0 and "no databases to release" in again.stdout


def test_user_errors_are_one_line_with_the_fix(db_invoke: Invoke) -> None:
    bad_name = db_invoke("db.allocate", "--project", "Bad-Name")
    assert bad_name.returncode == 2
    assert bad_name.stderr.strip().startswith("error: invalid project name")
    assert len(bad_name.stderr.strip().splitlines()) == 1

    no_profile = db_invoke("db.allocate", "--project", "quality", "--seed", "nightly")
    assert no_profile.returncode == 2
    assert "available: default, empty" in no_profile.stderr
    assert len(no_profile.stderr.strip().splitlines()) == 1

    no_db = db_invoke("db.url", "--project", "quality")
    assert no_db.returncode == 2 and no_db.stdout == ""
    assert "invoke db.allocate --project quality" in no_db.stderr


def test_unreachable_server_is_one_line_naming_the_masked_url(db_invoke: Invoke) -> None:
    url = "postgresql://postgres:hunter2-secret@127.0.0.1:15597/postgres"
    done = db_invoke(
        "db.allocate", "--project", "quality", env_extra={"E2E_ADMIN_DATABASE_URL": url}
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect to PostgreSQL")
    assert "postgresql://postgres:***@127.0.0.1:15597/postgres" in lines[0]
    assert "hunter2-secret" not in done.stderr + done.stdout


def test_release_keep_then_cleanup_keeps_it_while_it_is_fresh(db_invoke: Invoke) -> None:
    assert db_invoke("db.allocate", "--project", "dashboard").returncode == 0
    kept = db_invoke("db.release", "--project", "dashboard", "--keep")
    assert kept.returncode == 0 and "kept" in kept.stdout and "***" in kept.stdout
    assert db_invoke("db.cleanup").stdout.strip() == "nothing to drop"
    assert db_invoke("db.url", "--project", "dashboard").returncode == 0
    assert db_invoke("db.release", "--all").stdout.count("dropped") == 1


# --- cold start: no cluster, no template, 8 processes at once -----------------------------------

_BARRIER = (
    "import os, sys, time\n"
    "deadline = time.monotonic() + 60\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    if time.monotonic() > deadline: sys.exit('barrier never opened')\n"
    "    time.sleep(0.005)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def test_eight_processes_from_a_cold_start_share_one_cluster_and_one_template(
    tmp_path: Path, new_cluster: Callable[..., LocalCluster], cli: Cli
) -> None:
    projects = [f"p{i}" for i in range(8)]
    config_file = write_pyproject(
        tmp_path,
        port_range="15500-15509",
        name_base="cold",
        migrations_dir=DEMO / "migrations",
        seeds_dir=DEMO / "seeds",
    )
    config = make_config(tmp_path, port_range="15500-15509", name_base="cold")
    cluster = new_cluster(config, start=False)  # only to stop and remove it afterwards
    assert not cluster.status().running
    env = config_environ(config_file, E2E_OWNER_PID=str(os.getpid()))
    barrier = tmp_path / "go"
    children = [
        # The barrier execs this Python with the rest of the command line: invoke's.
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _BARRIER,
                str(barrier),
                *cli.invoke_argv("db.allocate", "--project", project, "--json")[1:],
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for project in projects
    ]
    try:
        barrier.touch()
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    for child, (_out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    stderr = "".join(err for _out, err in outputs)
    assert stderr.count("initialised a PostgreSQL") == 1  # one cluster
    assert stderr.count("built template") == 1  # one template build
    documents = [json.loads(out) for out, _err in outputs]
    assert sorted(doc["database"] for doc in documents) == [f"cold_{p}" for p in projects]
    assert len({doc["template"] for doc in documents}) == 1
    for doc in documents:
        with psycopg.connect(doc["database_url"]) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()
            users = conn.execute("SELECT count(*) FROM users").fetchone()
            orders = conn.execute("SELECT count(*) FROM work_orders").fetchone()
        assert tables is not None and tables[0] >= 20
        assert users is not None and users[0] >= 3
        assert orders is not None and orders[0] > 0  # the default seed's rows
    with Workspace(config) as ws:
        released = ws.databases.release_all()
    assert sorted(released) == sorted(doc["database"] for doc in documents)
    assert Owner.current().is_alive()
