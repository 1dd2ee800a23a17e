"""Security: nobody else's data is touched, no password leaks, the state folder is private.

One embedded cluster for the module; ports 18400-18499. The CLI runs as a subprocess (``invoke``,
``nox``) exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as sqlerrors
from psycopg import sql
from support.cli import CLI, clean_environ, config_environ
from support.clusters import running_cluster
from support.configs import write_pyproject
from support.databases import DB_FIXTURES
from support.runs import project_folder

import e2e_infra
from e2e_infra.conninfo import ConnInfo

pytestmark = pytest.mark.integration

WEB = {
    "command": "{python} -m http.server {port} --bind 127.0.0.1",
    "port": "backend",
    "health": "http://127.0.0.1:{port}/",
    "startup_timeout": 20,
    "stop_timeout": 3,
}
BROKEN = {
    "command": "{python} -c 'import sys; print(\"boom: cannot start\"); sys.exit(4)'",
    "port": "backend",
    "startup_timeout": 5,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[e2e_infra.LocalCluster]:
    folder = tmp_path_factory.mktemp("security-pg")
    path = write_pyproject(folder, port_range="18400-18409")
    with running_cluster(e2e_infra.load_config(path, environ=clean_environ())) as running:
        yield running


def run_cli(
    tool: str, config_path: Path, *args: str, umask: int = -1, **env: str
) -> subprocess.CompletedProcess[str]:
    run = CLI.invoke if tool == "invoke" else CLI.nox
    return run(*args, env=config_environ(config_path, **env), timeout=120, umask=umask)


def databases(cluster: e2e_infra.LocalCluster) -> set[str]:
    with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()}


# --- nobody else's data ---------------------------------------------------------------------------


def test_databases_matching_the_pattern_without_our_marker_survive_every_cleanup(
    tmp_path: Path, cluster: e2e_infra.LocalCluster
) -> None:
    admin = cluster.tcp_conninfo()
    path = write_pyproject(tmp_path, port_range="18410-18419")
    # Look-alikes: our naming pattern, but not our marker (none, foreign text, forged JSON).
    foreign = {
        "e2e_db_victim": None,
        "e2e_db_tpl_default_000000000000": None,
        "e2e_db_build_000000000000_1": "e2e-infra not json",
        "e2e_db_forged": 'e2e-infra {"tool": "someone-else", "kind": "database"}',
        "e2e_db_commented": "production copy, do not drop",
    }
    with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
        for name, comment in foreign.items():
            conn.execute(f'CREATE DATABASE "{name}"')
            if comment is not None:
                conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{comment}'")
    with psycopg.connect(admin.with_dbname("e2e_db_victim").conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('mine')")
    # A control: a marked database whose owner is gone, which cleanup must drop.
    owner = subprocess.Popen(["sleep", "60"])
    env = {"E2E_ADMIN_DATABASE_URL": admin.url}
    got = run_cli(
        "invoke", path, "db.allocate", "--project", "gone", "--owner-pid", str(owner.pid), **env
    )
    assert got.returncode == 0, got.stderr
    owner.kill()
    owner.wait()
    try:
        dropped = run_cli("invoke", path, "db.cleanup", "--json", **env)
        assert dropped.returncode == 0, dropped.stderr
        gone = [row["database"] for row in json.loads(dropped.stdout)["dropped"]]
        assert [name for name in gone if name.startswith("e2e_db_gone")], gone
        reclaimed = run_cli("invoke", path, "e2e.cleanup", "--json", **env)
        assert reclaimed.returncode == 0, reclaimed.stderr
        assert set(foreign) <= databases(cluster)
        assert not [name for name in databases(cluster) if name.startswith("e2e_db_gone")]
        victim = admin.with_dbname("e2e_db_victim").conninfo()
        with psycopg.connect(victim, autocommit=True) as conn:
            assert conn.execute("SELECT v FROM precious").fetchall() == [("mine",)]
    finally:
        with psycopg.connect(admin.conninfo(), autocommit=True) as conn:
            for name in foreign:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


# --- no password anywhere ------------------------------------------------------------------------


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_no_password_appears_in_logs_errors_human_output_or_run_json(
    tmp_path: Path, cluster: e2e_infra.LocalCluster
) -> None:
    admin = cluster.tcp_conninfo()
    assert admin.password
    wrong, unreachable = "WrongSecret4u9x", "UnreachableSecret7q2"
    path = write_pyproject(
        tmp_path,
        port_range="18420-18439",
        servers={"web": {**WEB, "cwd": str(tmp_path)}, "broken": {**BROKEN, "cwd": str(tmp_path)}},
        projects={
            "fine": {"command": "{python} -c 'pass'", "servers": ["web"], "cwd": str(tmp_path)},
            "fails": {
                "command": "{python} -c 'import sys; sys.exit(1)'",
                "servers": ["web"],
                "cwd": str(tmp_path),
            },
            "crashes": {"command": "{python} -c 'pass'", "servers": ["broken"]},
        },
    )
    env = {"E2E_ADMIN_DATABASE_URL": admin.url}
    outputs = [
        run_cli("nox", path, "-s", "e2e-fine", "e2e-fails", "e2e-crashes", **env),
        run_cli("invoke", path, "e2e.run", "--project", "crashes", **env),
        run_cli("invoke", path, "db.allocate", "--project", "manual", **env),
        run_cli("invoke", path, "db.list", **env),
        run_cli("invoke", path, "db.list", "--json", **env),
        run_cli("invoke", path, "db.release", "--project", "manual", "--keep", **env),
        run_cli("invoke", path, "db.release", "--all", **env),
        run_cli("invoke", path, "pg.status", **env),
        run_cli("invoke", path, "pg.status", "--json", **env),
        run_cli("invoke", path, "e2e.list", **env),
        run_cli("invoke", path, "e2e.cleanup", **env),
        run_cli("invoke", path, "ports.list", **env),
    ]
    wrong_url = admin._url(wrong)  # the right server, the wrong password
    outputs.append(
        run_cli("invoke", path, "db.allocate", "--project", "x", E2E_ADMIN_DATABASE_URL=wrong_url)
    )
    lost = f"postgresql://postgres:{unreachable}@127.0.0.1:18439/postgres"
    outputs.append(
        run_cli("invoke", path, "db.allocate", "--project", "x", E2E_ADMIN_DATABASE_URL=lost)
    )
    outputs.append(run_cli("nox", path, "-s", "e2e-fine", E2E_ADMIN_DATABASE_URL=lost))
    # The runs and errors really happened: a passed run, a failed one, an error, two bad logins.
    results = {
        p: json.loads((project_folder(tmp_path / "results", p) / "run.json").read_text())["result"]
        for p in ("fine", "fails", "crashes")
    }
    assert results == {
        "fine": "error",
        "fails": "failed",
        "crashes": "error",
    }  # fine: last run lost
    assert outputs[-3].returncode != 0 and "password authentication failed" in outputs[-3].stderr
    assert outputs[-2].returncode != 0 and "cannot connect" in outputs[-2].stderr

    secrets = (admin.password, wrong, unreachable)
    for proc in outputs:
        for secret in secrets:
            assert secret not in proc.stdout + proc.stderr, proc.args
        assert "Traceback" not in proc.stdout + proc.stderr, proc.args
    written = _files(tmp_path / "state") + _files(tmp_path / "results") + [cluster.log_file]
    assert any(path.name == "run.json" for path in written)
    assert any(path.name == "web.log" for path in written)
    for file in written:
        text = file.read_bytes().decode("utf-8", errors="replace")
        for secret in secrets:
            assert secret not in text, file
    # Server logs and run records are the user's alone: 0600 files in 0700 folders.
    folder = project_folder(tmp_path / "results", "fails")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700  # the run's folder
    for name in ("run.json", "web.log"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


# --- private state --------------------------------------------------------------------------------


def test_state_folder_and_registry_are_private_even_with_umask_0(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    path = write_pyproject(tmp_path, port_range="18440-18449", state_dir=state)
    me = str(os.getpid())
    got = run_cli("invoke", path, "ports.allocate", "--project", "priv", "--owner-pid", me, umask=0)
    assert got.returncode == 0, got.stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "leases.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "leases.json.lock").stat().st_mode) == 0o600
    released = run_cli("invoke", path, "ports.release", "--project", "priv", umask=0)
    assert released.returncode == 0, released.stderr
    assert stat.S_IMODE((state / "leases.json").stat().st_mode) == 0o600


# --- environment files --------------------------------------------------------------------------


def test_environment_files_are_never_echoed(
    tmp_path: Path, cluster: e2e_infra.LocalCluster
) -> None:
    admin = cluster.tcp_conninfo()
    app_secret = "AppSecretValue42zz"
    path = write_pyproject(
        tmp_path,
        port_range="18450-18459",
        servers={"web": {**WEB, "cwd": str(tmp_path)}},
        projects={"envy": {"command": "{python} -c 'pass'", "cwd": str(tmp_path)}},
    )
    env_file = tmp_path / ".env"
    env_file.write_text(f"E2E_ADMIN_DATABASE_URL={admin.url}\nAPP_SECRET={app_secret}\n")
    outputs = [
        run_cli("invoke", path, *args)
        for args in (
            ("e2e.list",),
            ("e2e.run", "--project", "envy"),
            ("db.allocate", "--project", "envy"),
            ("db.list",),
            ("pg.status",),
            ("db.release", "--all"),
        )
    ]
    assert all(proc.returncode == 0 for proc in outputs), [p.stderr for p in outputs]
    # A broken .env: the error names the key and the file, never the value or the file's text.
    env_file.write_text(
        "E2E_ADMIN_DATABASE_URL=postgresql://u:EnvFileSecret7@db.example:notaport/x\n"
        f"APP_SECRET={app_secret}\n"
    )
    outputs.append(run_cli("invoke", path, "db.list"))
    assert outputs[-1].returncode == 2 and "E2E_ADMIN_DATABASE_URL" in outputs[-1].stderr
    env_file.write_text(f"E2E_TYPO_SETTING={app_secret}\n")
    outputs.append(run_cli("invoke", path, "ports.list"))
    assert outputs[-1].returncode == 2 and "E2E_TYPO_SETTING" in outputs[-1].stderr
    for proc in outputs:
        text = proc.stdout + proc.stderr
        for secret in (admin.password or "?", app_secret, "EnvFileSecret7"):
            assert secret not in text, (proc.args, text)
        assert "Traceback" not in text
    for file in _files(tmp_path / "state") + _files(tmp_path / "results"):
        text = file.read_bytes().decode("utf-8", errors="replace")
        assert app_secret not in text and (admin.password or "?") not in text, file


# --- a project's own objects never run with the admin's rights ------------------------------------

# Planted by the project role: it records who runs it, then tries a superuser's escape to the shell.
_SPY = """
CREATE TABLE public.seen (who text, superuser boolean, fired_by text);
CREATE FUNCTION public.record(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.seen SELECT current_user, rolsuper, what FROM pg_roles
        WHERE rolname = current_user;
    BEGIN
        EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', 'id > {marker}');
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
END $$;
CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.record('trigger on ' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
RETURN NULL; END $$;
CREATE SCHEMA evil;
CREATE FUNCTION evil.lower(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.record('evil.lower'); RETURN pg_catalog.lower($1); END $$;
"""


def _plant(url: ConnInfo, marker: Path) -> list[str]:
    """As the project role: the spy, a statement trigger on every table it may put one on, and a
    `lower` ahead of pg_catalog's on the database's search_path. The tables it trapped."""
    trapped = []
    with psycopg.connect(url.conninfo(), autocommit=True) as conn:
        conn.execute(_SPY.replace("{marker}", str(marker)).encode())
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%' AND c.relname <> 'seen'"
        ).fetchall()
        for number, (schema, table) in enumerate(tables):
            statement = sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {}.{} "
                "FOR EACH STATEMENT EXECUTE FUNCTION public.spy()"
            ).format(sql.Identifier(f"spy_{number}"), sql.Identifier(schema), sql.Identifier(table))
            try:
                conn.execute(statement)
                trapped.append(f"{schema}.{table}")
            except sqlerrors.InsufficientPrivilege:
                pass
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET search_path = evil, pg_catalog, public").format(
                sql.Identifier(url.dbname)
            )
        )
    return trapped


def test_objects_a_project_plants_never_run_with_the_admins_rights(
    tmp_path: Path, cluster: e2e_infra.LocalCluster
) -> None:
    """The issue's reproduction: `db.allocate --json` hands out the project's URL; with it the
    project plants triggers (on the tool's table too, where it may), a `lower` ahead of
    pg_catalog's, then `db.migrate` and `db.seed` run. Nothing planted runs as a superuser."""
    admin = cluster.tcp_conninfo()
    migrations, seeds = tmp_path / "migrations", tmp_path / "seeds"
    shutil.copytree(DB_FIXTURES / "migrations", migrations)
    shutil.copytree(DB_FIXTURES / "seeds", seeds)
    base = f"s{uuid.uuid4().hex[:8]}"
    path = write_pyproject(
        tmp_path,
        port_range="18460-18469",
        name_base=base,
        migrations_dir=migrations,
        seeds_dir=seeds,
    )
    env = {"E2E_ADMIN_DATABASE_URL": admin.url, "E2E_OWNER_PID": str(os.getpid())}
    marker = Path("/tmp") / f"e2e-infra-pwned-{uuid.uuid4().hex}"
    got = run_cli("invoke", path, "db.allocate", "--project", "q0", "--json", **env)
    assert got.returncode == 0, got.stderr
    url = ConnInfo.parse(json.loads(got.stdout)["database_url"])
    try:
        trapped = _plant(url, marker)
        assert "public.accounts" in trapped  # its own data: its own business
        (migrations / "0003_more.sql").write_text(
            "INSERT INTO accounts (name) VALUES (lower('Zed'));"
        )
        (seeds / "extra").mkdir()
        (seeds / "extra" / "0001_notes.sql").write_text(
            "INSERT INTO notes (account_id, body) SELECT id, lower('More') FROM accounts;"
        )
        migrated = run_cli("invoke", path, "db.migrate", "--project", "q0", **env)
        assert migrated.returncode == 0, migrated.stderr
        seeded = run_cli("invoke", path, "db.seed", "--project", "q0", "--seed", "extra", **env)
        assert seeded.returncode == 0, seeded.stderr

        assert not marker.exists(), marker.read_text()  # never a shell as the server's user
        with psycopg.connect(url.conninfo(), autocommit=True) as conn:
            seen = conn.execute("SELECT who, superuser, fired_by FROM public.seen").fetchall()
            applied = conn.execute("SELECT count(*) FROM accounts WHERE name = 'zed'").fetchone()
        # The planted code did run (the migration and the seed fired it), as the project's role.
        assert applied == (1,)
        fired = {what for _who, _super, what in seen}
        assert {"evil.lower", "trigger on public.accounts", "trigger on public.notes"} <= fired
        assert {(who, superuser) for who, superuser, _what in seen} == {(url.user, False)}
        # The tool's own bookkeeping was never the project's to trap.
        assert not [name for name in trapped if "e2e_infra" in name], trapped
    finally:
        marker.unlink(missing_ok=True)
        run_cli("invoke", path, "db.release", "--all", **env)


# --- no tool secret in a child's environment ------------------------------------------------------

_DUMP = """
import json, os, sys
with open(sys.argv[1], "w") as out:
    json.dump(dict(os.environ), out)
if len(sys.argv) > 2:  # a server: serve until stopped
    import http.server
    http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[2]), bind="127.0.0.1")
"""


def test_servers_suites_and_migrate_commands_never_see_the_admin_url_or_the_tools_plumbing(
    tmp_path: Path, cluster: e2e_infra.LocalCluster
) -> None:
    """`E2E_ADMIN_DATABASE_URL` exported the documented CI way (with PG* pointing at the admin and
    the fork server's variables): the real server, suite and migrate command of `e2e.run` and of
    `nox -j 2` (whose sessions run in forks of the fork server) print their environments."""
    admin = cluster.tcp_conninfo()
    assert admin.password
    (tmp_path / "dump.py").write_text(_DUMP)
    envs = tmp_path / "envs"
    envs.mkdir()
    base = f"v{uuid.uuid4().hex[:8]}"
    server = {
        "command": f"{{python}} dump.py {envs}/server-{{project}}.json {{port}}",
        "port": "backend",
        "health": "http://127.0.0.1:{port}/",
        "startup_timeout": 20,
        "stop_timeout": 3,
        "cwd": str(tmp_path),
    }
    projects = {
        name: {
            "command": f"{{python}} dump.py {envs}/suite-{name}.json",
            "servers": ["web"],
            "cwd": str(tmp_path),
        }
        for name in ("envy", "envier")
    }
    path = write_pyproject(
        tmp_path,
        port_range="18470-18489",
        name_base=base,
        migrations_dir=None,
        seeds_dir=None,
        migrate_command=f"{{python}} {tmp_path}/dump.py {envs}/migrate.json",
        servers={"web": server},
        projects=projects,
    )
    env = {
        "E2E_ADMIN_DATABASE_URL": admin.url,
        "PGHOST": admin.host,
        "PGPORT": str(admin.port),
        "PGUSER": admin.user,
        "PGPASSWORD": admin.password,
        "E2E_NOX_RUN_ID": "outer-nox-run",
        "E2E_BUILD_TIMEOUT": "120",
        "APP_SETTING": "the application's own",
    }
    ran = run_cli("invoke", path, "e2e.run", "--project", "envy", **env)
    assert ran.returncode == 0, ran.stderr
    seen = {file.stem: json.loads(file.read_text()) for file in envs.glob("*.json")}
    assert set(seen) == {"migrate", "server-envy", "suite-envy"}
    (envs / "suite-envy.json").unlink()
    (envs / "server-envy.json").unlink()
    ran = run_cli("nox", path, "-j", "2", "-s", "e2e-envy", "e2e-envier", **env)
    assert ran.returncode == 0, ran.stderr
    seen |= {file.stem: json.loads(file.read_text()) for file in envs.glob("*.json")}
    assert set(seen) == {"migrate", *(f"{k}-{p}" for k in ("server", "suite") for p in projects)}

    never = {"E2E_ADMIN_DATABASE_URL", "E2E_CONFIG", "E2E_BUILD_TIMEOUT"}
    never |= {"E2E_NOX_RUN_ID"}
    never |= {"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD"}
    for name, child in seen.items():
        assert not never & set(child), (name, sorted(never & set(child)))
        assert not [key for key, value in child.items() if admin.password in value], name
        assert child["APP_SETTING"] == "the application's own", name
        role = ConnInfo.parse(child["DATABASE_URL"])
        assert role.user != admin.user and role.password and role.user == role.dbname, name
        if name == "migrate":
            assert role.user.startswith(f"{base}_build_")  # the template's own builder
            continue
        project = name.split("-")[1]
        assert role.user.startswith(f"{base}_{project}")
        assert child["E2E_PROJECT"] == project and child["E2E_RUN_ID"], name
        assert child["BACKEND_PORT"] and child["E2E_RESULTS_DIR"] and child["E2E_INFRA_RUN"], name
