"""Unit tests of e2e_infra.databases.migrations: inputs, commands, seed profiles; no database."""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil
import pytest

from e2e_infra.config import Config, DatabaseConfig
from e2e_infra.conninfo import ConnInfo
from e2e_infra.databases.migrations import (
    CommandRunner,
    SqlDirectoryRunner,
    migration_runner,
    seed_profiles,
    seed_runner,
)
from e2e_infra.errors import ConfigError, InvalidNameError, MigrationError, SeedProfileNotFoundError

SECRET = "s3cr3t-pw"
TARGET = ConnInfo(host="127.0.0.1", port=15599, user="app", dbname="e2e_db_x", password=SECRET)


def make_config(tmp_path: Path, **database: object) -> Config:
    return Config(
        root=tmp_path,
        source=None,
        state_dir=tmp_path / "state",
        results_dir=tmp_path / "results",
        database=DatabaseConfig(**database),  # type: ignore[arg-type]
    )


def test_sql_directory_inputs_are_sql_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "0002_b.sql").write_text("B")
    (tmp_path / "0001_a.sql").write_text("A")
    (tmp_path / "notes.txt").write_text("not a migration")
    (tmp_path / "0003_dir.sql").mkdir()
    runner = SqlDirectoryRunner(tmp_path, record_prefix="seed:x/")
    assert runner.inputs() == [("seed:x/0001_a.sql", b"A"), ("seed:x/0002_b.sql", b"B")]


def test_sql_directory_that_does_not_exist_names_the_folder_and_the_key(tmp_path: Path) -> None:
    runner = SqlDirectoryRunner(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"missing does not exist.*migrations_dir"):
        runner.inputs()


def test_command_inputs_hash_the_command_the_files_it_names_and_the_globs(tmp_path: Path) -> None:
    (tmp_path / "migrate.py").write_text("print('hi')")
    (tmp_path / "versions").mkdir()
    (tmp_path / "versions" / "a1.py").write_text("rev a1")
    (tmp_path / "versions" / "b2.py").write_text("rev b2")
    runner = CommandRunner(
        "{python} migrate.py --all", cwd=tmp_path, input_globs=("versions/*.py",)
    )
    assert runner.inputs() == [
        ("command", b"{python} migrate.py --all"),
        ("migrate.py", b"print('hi')"),
        ("versions/a1.py", b"rev a1"),
        ("versions/b2.py", b"rev b2"),
    ]


def test_command_gets_database_url_of_the_target_and_runs_in_cwd(tmp_path: Path) -> None:
    script = "import os, pathlib; pathlib.Path('seen').write_text(os.environ['DATABASE_URL'])"
    runner = CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path)
    runner.apply(TARGET)
    assert (tmp_path / "seen").read_text() == TARGET.url


def test_failing_command_names_the_command_and_masks_the_password(tmp_path: Path) -> None:
    script = "import os, sys; print('cannot use', os.environ['DATABASE_URL']); sys.exit(3)"
    runner = CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path)
    with pytest.raises(MigrationError) as info:
        runner.apply(TARGET)
    message = str(info.value)
    assert "exit code 3" in message
    assert "cannot use postgresql://app:***@127.0.0.1:15599/e2e_db_x" in message
    assert SECRET not in message
    assert info.value.file.startswith("{python} -c")


def test_command_that_overruns_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    # The command starts a grandchild and both sleep: the whole process group must be stopped.
    script = (
        "import subprocess, sys, time, pathlib; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "pathlib.Path('child.pid').write_text(str(p.pid)); time.sleep(60)"
    )
    config = make_config(tmp_path, migrate_command=f'{{python}} -c "{script}"', build_timeout=1.0)
    runner = migration_runner(config)  # the timeout is database.build_timeout
    with pytest.raises(MigrationError, match=r"did not finish within 1s") as info:
        runner.apply(TARGET)
    assert "raise database.build_timeout / E2E_BUILD_TIMEOUT" in str(info.value)
    grandchild = psutil.Process(int((tmp_path / "child.pid").read_text()))
    # It was SIGKILLed; once init reaps it, it is gone (a zombie until then).
    psutil.wait_procs([grandchild], timeout=5)
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


def test_missing_command_is_a_migration_error_naming_it(tmp_path: Path) -> None:
    runner = CommandRunner("no-such-migrator-xyz up", cwd=tmp_path)
    with pytest.raises(MigrationError, match="no-such-migrator-xyz up"):
        runner.apply(TARGET)


def test_migration_runner_prefers_the_command_and_needs_one_of_them(tmp_path: Path) -> None:
    both = make_config(tmp_path, migrations_dir=tmp_path, migrate_command="alembic upgrade head")
    assert isinstance(migration_runner(both), CommandRunner)
    only_dir = make_config(tmp_path, migrations_dir=tmp_path)
    assert isinstance(migration_runner(only_dir), SqlDirectoryRunner)
    with pytest.raises(ConfigError, match=r"migrations_dir or database\.migrate_command"):
        migration_runner(make_config(tmp_path))


def test_seed_profiles_are_folders_and_commands(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    for name in ("default", "auth_only", "Not-Valid"):
        (seeds / name).mkdir(parents=True)
    (seeds / "stray.sql").write_text("")
    config = make_config(tmp_path, seeds_dir=seeds, seed_commands={"big": "{python} big.py"})
    assert seed_profiles(config) == ["auth_only", "big", "default"]
    assert isinstance(seed_runner(config, "big"), CommandRunner)
    runner = seed_runner(config, "auth_only")
    assert isinstance(runner, SqlDirectoryRunner)
    assert runner.record_prefix == "seed:auth_only/"


def test_missing_seed_profile_names_the_available_ones(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    (seeds / "default").mkdir(parents=True)
    (seeds / "auth_only").mkdir()
    config = make_config(tmp_path, seeds_dir=seeds)
    with pytest.raises(SeedProfileNotFoundError) as info:
        seed_runner(config, "nightly")
    assert info.value.available == ["auth_only", "default"]
    assert "available: auth_only, default" in str(info.value)
    assert info.value.exit_code == 2


def test_seed_profile_name_is_validated_before_touching_the_filesystem(tmp_path: Path) -> None:
    config = make_config(tmp_path, seeds_dir=tmp_path)
    with pytest.raises(InvalidNameError):
        seed_runner(config, "../etc")


def test_a_command_and_inputs_outside_the_root_are_hashed_under_their_absolute_path(
    tmp_path: Path,
) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    (elsewhere / "versions").mkdir(parents=True)
    (elsewhere / "m.py").write_text("migrate")
    (elsewhere / "versions" / "a1.py").write_text("rev a1")
    (root / "local.sql").write_text("local")
    runner = CommandRunner(
        f"python {elsewhere / 'm.py'}",
        cwd=root,
        input_globs=(f"{elsewhere}/versions/*.py", "*.sql", "**/*.sql"),
    )
    assert runner.inputs() == [
        ("command", f"python {elsewhere / 'm.py'}".encode()),
        ((elsewhere / "m.py").as_posix(), b"migrate"),
        ((elsewhere / "versions" / "a1.py").as_posix(), b"rev a1"),
        ("local.sql", b"local"),
    ]


def test_an_overrun_command_gets_sigterm_first_and_a_grace_period(tmp_path: Path) -> None:
    script = (
        "import signal, sys, time, pathlib; "
        "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path('term').write_text('x'), "
        "print('cleaned up', flush=True), sys.exit(0))); "
        "print('started', flush=True); time.sleep(60)"
    )
    runner = CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path, timeout=1.0, stop_grace=5.0)
    with pytest.raises(MigrationError, match=r"did not finish within 1s.*: cleaned up") as info:
        runner.apply(TARGET)
    assert (tmp_path / "term").exists()  # it was asked to stop before being killed
    assert info.value.log_tail.splitlines() == ["started", "cleaned up"]  # lines, not squashed


def test_a_command_that_ignores_sigterm_and_leaves_its_output_open_is_still_bounded(
    tmp_path: Path,
) -> None:
    import time

    # Ignores SIGTERM, and a grandchild in its own session keeps the output pipe open after the
    # group is killed: every wait after the timeout must still end.
    script = (
        "import signal, subprocess, sys, time, pathlib; signal.signal(signal.SIGTERM, "
        "signal.SIG_IGN); p = subprocess.Popen([sys.executable, '-c', 'import time; "
        "time.sleep(30)'], start_new_session=True); pathlib.Path('child.pid').write_text("
        "str(p.pid)); time.sleep(60)"
    )
    runner = CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path, timeout=1.0, stop_grace=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(MigrationError, match="did not finish within 1s"):
            runner.apply(TARGET)
        assert time.monotonic() - started < 15
    finally:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            psutil.Process(int((tmp_path / "child.pid").read_text())).kill()


def test_a_repository_without_seeds_gets_an_empty_default_seed(tmp_path: Path) -> None:
    from e2e_infra.config import load_config
    from e2e_infra.databases.migrations import NoSeed, seed_runner
    from e2e_infra.testing import config_toml

    (tmp_path / "pyproject.toml").write_text(config_toml({}), encoding="utf-8")
    config = load_config(tmp_path / "pyproject.toml", environ={})
    runner = seed_runner(config, config.database.default_seed)
    assert isinstance(runner, NoSeed) and runner.inputs() == []
    with pytest.raises(SeedProfileNotFoundError):
        seed_runner(config, "auth_only")  # a named profile still has to exist


def test_runners_take_their_timeout_from_the_build_timeout(tmp_path: Path) -> None:
    (tmp_path / "seeds" / "fast").mkdir(parents=True)
    config = make_config(
        tmp_path,
        migrations_dir=tmp_path,
        seeds_dir=tmp_path / "seeds",
        seed_commands={"slow": "seed.sh"},
        build_timeout=42.0,
    )
    runners = [migration_runner(config), seed_runner(config, "fast"), seed_runner(config, "slow")]
    assert [runner.timeout for runner in runners] == [42.0, 42.0, 42.0]  # type: ignore[attr-defined]


def test_a_migrate_command_gets_neither_the_admin_url_nor_the_tools_plumbing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2E_ADMIN_DATABASE_URL", "postgresql://postgres:AdminPw9@db/postgres")
    monkeypatch.setenv("PGPASSWORD", "AdminPw9")
    monkeypatch.setenv("E2E_NOX_RUN_ID", "a nox run")
    monkeypatch.setenv("APP_SETTING", "kept")
    script = "import json, os; open('env.json', 'w').write(json.dumps(dict(os.environ)))"
    CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path).apply(TARGET)
    import json

    env = json.loads((tmp_path / "env.json").read_text())
    assert env["DATABASE_URL"] == TARGET.url and env["APP_SETTING"] == "kept"
    assert not {"E2E_ADMIN_DATABASE_URL", "PGPASSWORD", "E2E_NOX_RUN_ID"} & set(env)


def test_the_line_that_says_why_skips_what_npm_adds_after_a_script_failed() -> None:
    from e2e_infra.processes.logs import last_line

    output = (
        'seeding line 1\nError: relation "items" does not exist\n'
        "npm error Lifecycle script `seed` failed with error:\nnpm error code 1\n"
        "npm error command sh -c node seed.mjs\n"
    )
    assert last_line(output) == 'Error: relation "items" does not exist'
    assert last_line("npm error code 1\n") == "npm error code 1"
    assert last_line("") == ""


def test_database_env_reaches_the_command_and_its_fingerprint(tmp_path: Path) -> None:
    script = "import os, pathlib; pathlib.Path('seen').write_text(os.environ['SEED_LABEL'])"
    plain = CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path)
    runner = CommandRunner(f'{{python}} -c "{script}"', cwd=tmp_path, env={"SEED_LABEL": "x"})
    runner.apply(TARGET)
    assert (tmp_path / "seen").read_text() == "x"
    assert plain.inputs()[0] == ("command", plain.command.encode())  # fingerprints as before
    assert runner.inputs()[0] != plain.inputs()[0]
