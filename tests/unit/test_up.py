"""The files of an environment kept up, and who may touch them: no database, no servers here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dotenv import dotenv_values
from support.configs import make_config

from e2e_infra.cli.sessions import _attach_args
from e2e_infra.config import Config
from e2e_infra.errors import ConfigError, UsageError
from e2e_infra.report.retention import prune_runs
from e2e_infra.resources.leases import process_start_time
from e2e_infra.run.up import (
    UpState,
    _publish,
    export_lines,
    keep_up,
    live_up,
    read_up,
    take_down,
)

ENV = {
    "BACKEND_URL": "http://127.0.0.1:4100",
    "DATABASE_URL": "postgresql://e2e_db_web:pw-x_1@127.0.0.1:5432/e2e_db_web",
    "GREETING": 'it\'s a "quoted" value',
    "LITERAL": "a $HOME and a space",
}


def _config(tmp_path: Path) -> Config:
    return make_config(tmp_path, projects={"web": {"command": "true", "servers": []}})


def _state(pid: int, start: float, **changes: object) -> UpState:
    values: dict[str, object] = {
        "project": "web",
        "pid": pid,
        "start_time": start,
        "host": "h",
        "run_id": "r1",
        "started_at": time.time(),
        "until": time.time() + 3600,
        "ports": {"backend": 4100},
        "database": "e2e_db_web",
        "seed": "default",
        "env": ENV,
        "servers": {"backend": {"pid": 123, "alive": True, "log": "/x/backend.log"}},
        "folder": "/x",
    }
    values.update(changes)
    return UpState(**values)  # type: ignore[arg-type]


def _dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(proc.pid) or 1.0
    proc.wait()
    return proc.pid, start


def test_the_state_and_env_files_are_private_and_read_back(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = _state(os.getpid(), process_start_time(os.getpid()) or 0.0)
    _publish(config, state)
    env_file, state_file = config.layout.up_env("web"), config.layout.up_state("web")
    assert env_file.parent == config.results_dir / "up"
    for path in (env_file, state_file):
        assert path.stat().st_mode & 0o777 == 0o600
    assert read_up(config, "web") == state
    assert live_up(config, "web") == state
    # The .env file reads back as the same values in dotenv and in a shell, as do the exports.
    assert dotenv_values(env_file) == ENV
    show = '\nprintf "%s\\n" "$GREETING" "$LITERAL" "$DATABASE_URL"'
    expected = [ENV["GREETING"], ENV["LITERAL"], ENV["DATABASE_URL"]]
    for script in (export_lines(ENV) + show, f"set -a; . {env_file}" + show):
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == expected


def test_a_state_whose_process_is_gone_is_not_up_and_is_forgotten(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _publish(config, _state(*_dead_pid()))
    with pytest.raises(UsageError, match=r"web is not up any more .*`invoke e2e.up web`"):
        live_up(config, "web")
    assert not config.layout.up_state("web").exists() and not config.layout.up_env("web").exists()
    with pytest.raises(UsageError, match=r"web is not up; start it .*`invoke e2e.up web`"):
        live_up(config, "web")
    assert take_down(config, "web") == "web is not up"


def test_a_second_up_of_a_project_kept_up_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = _state(os.getpid(), process_start_time(os.getpid()) or 0.0)
    _publish(config, state)
    with pytest.raises(UsageError, match=r"web is up already .*`invoke e2e.down web`"):
        keep_up(config, "web")
    assert read_up(config, "web") == state  # untouched
    with pytest.raises(UsageError, match="--hours"):
        keep_up(config, "web", hours=0)


def test_retention_never_prunes_what_is_kept_up_and_up_is_no_run_id(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_runs=1, projects={"web": {"command": "true"}})
    for run in ("r1", "r2", "r3"):
        (config.results_dir / run).mkdir(parents=True)
    _publish(config, _state(os.getpid(), process_start_time(os.getpid()) or 0.0))
    (config.results_dir / "up" / "web").mkdir()
    removed = prune_runs(config)
    assert {p.name for p in removed} == {"r1", "r2"}
    assert config.layout.up_env("web").is_file() and (config.results_dir / "up" / "web").is_dir()
    with pytest.raises(ConfigError, match=r"folder of `invoke e2e\.up`"):
        config.for_run("up")


@pytest.mark.parametrize(
    ("posargs", "expected"),
    [
        (["-k", "login"], (["-k", "login"], False, True)),
        (["--attach", "-k", "x"], (["-k", "x"], True, True)),
        (["--attach", "--no-reset"], ([], True, False)),
        (["-k", "--attach"], (["-k", "--attach"], False, True)),  # the suite's, not ours
    ],
)
def test_nox_takes_only_leading_attach_flags(
    posargs: list[str], expected: tuple[list[str], bool, bool]
) -> None:
    assert _attach_args(list(posargs)) == expected
