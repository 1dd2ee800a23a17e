"""What a run leaves where a test can look: its results folders and its live processes; a nox run
in a session of its own, and the guardian of a session."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil

import e2e_infra
from e2e_infra.resources.leases import process_start_time
from e2e_infra.run.guardian import start_guardian
from support.cli import CLI, clean_environ, config_environ


def run_processes(results_dir: Path) -> list[psutil.Process]:
    """Live processes started by runs whose results go under ``results_dir`` (servers, suites)."""
    marker = str(results_dir)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("E2E_RESULTS_DIR", "").startswith(marker):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run_folder(results_dir: Path) -> Path:
    """The newest run's results folder (``<results_dir>/latest``), or ``results_dir`` itself for
    a run without a run folder (a ProjectSession used directly)."""
    latest = results_dir / "latest"
    return latest if latest.exists() else results_dir


def project_folder(results_dir: Path, project: str) -> Path:
    """The results folder of ``project``'s newest run, whichever run folder holds it."""
    folders = {p.resolve() for p in (results_dir / project, *results_dir.glob(f"*/{project}"))}
    with_record = [f for f in folders if (f / "run.json").is_file()]
    if not with_record:
        return run_folder(results_dir) / project
    return max(with_record, key=lambda f: (f / "run.json").stat().st_mtime)


class Nox:
    """A nox run in a session of its own (so the test can always end it), output in a file.

    A file, not a pipe: a SIGKILLed nox leaves children that would hold a pipe open.
    """

    def __init__(self, config_path: Path, *args: str) -> None:
        self.output = config_path.parent / f"nox-{time.monotonic_ns()}.out"
        with self.output.open("w") as out:
            self.proc = CLI.popen(
                CLI.nox_argv(*args),
                env=config_environ(config_path),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        returncode = self.proc.wait(timeout=timeout)
        return returncode, self.output.read_text()


def start_nox(config_path: Path, *args: str) -> Nox:
    return Nox(config_path, *args)


def guardian_of(owner_pid: int) -> psutil.Process:
    """The session's guardian: a child of the owner that names e2e_infra.run.guardian in its command
    line (a shell until its owner dies) and leads its own session."""
    owner = psutil.Process(owner_pid)
    for child in owner.children():
        if "e2e_infra.run.guardian" in child.cmdline() and os.getsid(child.pid) == child.pid:
            return child
    raise AssertionError(f"no guardian started by {owner_pid}")


def orphaned_guardian(config: e2e_infra.Config, run_id: str, cwd: Path) -> subprocess.Popen[bytes]:
    """A guardian whose owner (a ``sleep``) was SIGKILLed holding its pipe, with the config's
    ``guardian.log``: the full guardian is now running; its process is returned to wait on."""
    owner = subprocess.Popen(["sleep", "60"])
    guardian = start_guardian(
        owner_pid=owner.pid,
        owner_start_time=process_start_time(owner.pid) or 0.0,
        run_id=run_id,
        project="p",
        timeout=60,
        log_path=config.state_dir / "guardian.log",
        cwd=cwd,
        env={**clean_environ(), "E2E_CONFIG": str(config.source)},
    )
    # The owner holds the write end; here that is this test, so close it as a dying owner would
    # (without the stop line), after the owner is gone.
    owner.kill()
    owner.wait(timeout=10)
    os.close(guardian.fd)
    assert guardian.proc is not None
    return guardian.proc
