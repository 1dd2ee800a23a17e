"""The results and state folders at their edges (issue 20): planted symbolic links are refused, a
full results folder is one line naming it on every runner, a run id used again starts a fresh
console output, and old run folders are pruned (never a live one).

Real processes, real file systems (a tiny tmpfs mounted for the full-disk test: needs root, as CI
is), the embedded cluster only where a project needs a database (none here: ``static`` has none).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import CLI, config_environ
from support.configs import make_config, write_pyproject
from support.runs import orphaned_guardian

from e2e_infra.resources.leases import process_start_time

pytestmark = pytest.mark.integration

STATIC = {"command": "{python} -c \"print('the suite of static ran')\"", "database": False}


def _config(tmp_path: Path, **extra: object) -> Path:
    return write_pyproject(tmp_path, port_range="16300-16319", projects={"static": STATIC}, **extra)


def _invoke(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.invoke(*args, env=config_environ(config, **env), timeout=180)


def _nox(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return CLI.nox(*args, env=config_environ(config, **env), timeout=180)


def _one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "Traceback" not in text and "unexpected" not in text, text
    lines = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert lines, text
    return lines[0]


# --- planted links --------------------------------------------------------------------------------


def test_a_run_folder_planted_as_a_link_is_refused_and_nothing_lands_where_it_points(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "planted").symlink_to(elsewhere, target_is_directory=True)
    for runner in (
        lambda: _invoke(config, "e2e.run", "static", E2E_RUN_ID="planted"),
        lambda: _invoke(config, "e2e.all", "--projects", "static", E2E_RUN_ID="planted"),
        lambda: _nox(config, "-s", "e2e-static", E2E_RUN_ID="planted"),
    ):
        line = _one_line(runner(), "symbolic link")
        assert str(tmp_path / "results" / "planted") in line
        assert list(elsewhere.iterdir()) == []  # no project folder, no report.html there
        assert elsewhere.stat().st_mode & 0o777 == 0o755  # and no chmod through the link


def test_a_guardian_log_planted_as_a_link_is_never_appended_to(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    log = config.state_dir / "guardian.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.symlink_to(victim)
    guardian = orphaned_guardian(config, "linked-log", cwd=tmp_path)
    assert guardian.wait(timeout=60) == 0  # it still reclaimed (nothing held)
    assert victim.read_text() == "the user's own file\n"
    assert log.is_symlink()


# --- a full results folder ------------------------------------------------------------------------


@contextlib.contextmanager
def _full_tmpfs(path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs at ``path``, then filled up (empty files still fit: the preflight's
    probe passes, and the run meets the full disk later, as on a real machine)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], check=True)
    try:
        with contextlib.suppress(OSError), open(path / "filler", "wb") as out:
            while True:
                out.write(bytes(4096))
                out.flush()
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_results_folder_is_one_line_naming_it_on_every_runner(tmp_path: Path) -> None:
    with _full_tmpfs(tmp_path / "results") as results:
        config = _config(tmp_path, results_dir=results)
        for name, result in (
            ("e2e.run", _invoke(config, "e2e.run", "static")),
            ("e2e.all", _invoke(config, "e2e.all", "--projects", "static")),
            ("nox -j", _nox(config, "-j", "2", "-s", "e2e-static")),
        ):
            line = _one_line(result, "no space is left on its device")
            assert str(results) in line and "E2E_RESULTS_DIR" in line, (name, line)


# --- a run id used again --------------------------------------------------------------------------


def test_a_run_id_used_again_starts_a_fresh_console_output(tmp_path: Path) -> None:
    config = _config(tmp_path)
    for _ in range(2):
        ran = _invoke(config, "e2e.all", "--projects", "static", E2E_RUN_ID="again")
        assert ran.returncode == 0, ran.stdout + ran.stderr
    output = (tmp_path / "results" / "again" / "static.output.log").read_text()
    assert output.count("the suite of static ran") == 1, output


# --- retention ------------------------------------------------------------------------------------


def test_old_run_folders_are_pruned_after_a_run_and_by_cleanup_but_never_a_live_one(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, keep_runs=3)
    results = tmp_path / "results"
    old = []
    for n in range(6):  # six finished runs, oldest first by mtime
        folder = results / f"old-{n}" / "static"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text("{}")
        stamp = time.time() - 3600 * (10 - n)
        os.utime(folder.parent, (stamp, stamp))
        old.append(folder.parent)
    # The oldest one still runs: its status says so, and its process (this test) is alive.
    live = results / "old-0" / "static" / "status.json"
    me = os.getpid()
    live.write_text(json.dumps({"done": False, "pid": me, "pid_start": process_start_time(me)}))
    stamp = time.time() - 3600 * 10
    os.utime(results / "old-0", (stamp, stamp))

    ran = _invoke(config, "e2e.all", "--projects", "static", E2E_RUN_ID="new")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    left = sorted(p.name for p in results.iterdir() if p.is_dir() and not p.is_symlink())
    # The newest three (the new run and old-4, old-5) and the live one stay.
    assert left == ["new", "old-0", "old-4", "old-5"], left

    # The run ended: cleanup prunes it too, and says so.
    live.write_text(json.dumps({"done": True, "pid": me, "pid_start": process_start_time(me)}))
    cleaned = _invoke(config, "e2e.cleanup", "--json")
    assert cleaned.returncode == 0, cleaned.stderr
    assert json.loads(cleaned.stdout)["runs"] == [str(results / "old-0")]
    assert not (results / "old-0").exists() and (results / "latest").resolve().name == "new"
