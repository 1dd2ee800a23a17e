"""Security: nobody else's data is touched, no password leaks, the state folder is private.

One embedded cluster for the module; ports 18400-18499. The CLI runs as a subprocess (``invoke``,
``nox``) exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from support.cli import CLI, clean_environ, config_environ
from support.clusters import running_cluster
from support.configs import write_pyproject
from support.runs import project_folder

import e2e_infra

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
