"""A run's prepare steps: one-time work before any project (build a reporter, a dashboard).

``[tool.e2e_infra.prepare.<name>]`` steps (:class:`~e2e_infra.config.PrepareConfig`) run once per
run, in the order of the file, before the first project acquires anything: :func:`ensure_prepared`
is called by ``invoke e2e.all`` before its pool starts and by every project's session (nox runs
one session per project, maybe in several processes at once). The first caller of a run takes a
file lock in the state folder and runs the steps; the others wait for it and read what it wrote,
``<run>/prepare.json``. So a step runs once per run whatever the runner, and its failure fails
every project of the run with the same line, naming the step and its log.

A step is skipped when its fingerprint (its command, folder, ``env`` and the content of every file
its ``inputs`` globs match) is the one of its last successful run on this checkout (kept in
``<state_dir>/prepare-state.json``) and every ``outputs`` glob matches something. A step without
``inputs`` runs every time. Each step's output goes to ``<run>/prepare/<step>.log``; a failure
raises :class:`~e2e_infra.errors.PrepareError` with its last lines.
"""

from __future__ import annotations

import contextlib
import enum
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, PrepareConfig
from ..errors import ConfigError, E2EInfraError, PrepareError
from ..files import RESULTS_SETTING, ensure_private_dir, folder_error

__all__ = ["PrepareRecord", "StepRecord", "StepStatus", "ensure_prepared", "read_prepared"]

STATE_FILE = "prepare-state.json"
LOCK_FILE = "prepare.lock"
_TAIL_LINES = 20
_STOP_GRACE = 5.0


class StepStatus(enum.Enum):
    RAN = "ran"
    SKIPPED = "skipped"  # its inputs are unchanged since its last successful run
    FAILED = "failed"


@dataclass(frozen=True)
class StepRecord:
    """How one step went in this run."""

    name: str
    command: str
    status: StepStatus
    seconds: float
    reason: str  # why it ran or was skipped, or how it failed
    log: str | None = None
    returncode: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "status": self.status.value,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "log": self.log,
            "returncode": self.returncode,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepRecord:
        return cls(
            name=str(data["name"]),
            command=str(data["command"]),
            status=StepStatus(data["status"]),
            seconds=float(data.get("seconds") or 0.0),
            reason=str(data.get("reason") or ""),
            log=str(data["log"]) if data.get("log") else None,
            returncode=int(data["returncode"]) if data.get("returncode") is not None else None,
        )


@dataclass(frozen=True)
class PrepareRecord:
    """The run's prepare steps, as ``<run>/prepare.json`` holds them."""

    steps: tuple[StepRecord, ...]
    started_at: float

    @property
    def failed(self) -> StepRecord | None:
        return next((s for s in self.steps if s.status is StepStatus.FAILED), None)

    def to_json(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrepareRecord:
        steps = tuple(StepRecord.from_json(s) for s in data.get("steps") or ())
        return cls(steps=steps, started_at=float(data.get("started_at") or 0.0))


def read_prepared(config: Config) -> PrepareRecord | None:
    """The run's prepare record, None when the run had no prepare step (or it is unreadable)."""
    try:
        data = json.loads(config.layout.prepare_record.read_text(encoding="utf-8"))
        return PrepareRecord.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_prepared(config: Config) -> PrepareRecord | None:
    """Run the prepare steps of ``config``'s run unless this run ran them already; its record.

    None when no step is configured. Raises :class:`PrepareError` when a step failed (now, or
    in the process of this run that ran them).
    """
    if not config.prepare:
        return None
    if config.run is None:
        raise ConfigError("prepare steps belong to a run: choose one with Config.for_run()")
    import filelock

    ensure_private_dir(config.state_dir)
    lock = filelock.FileLock(str(config.state_dir / LOCK_FILE), mode=0o600)
    timeout = sum(step.timeout for step in config.prepare.values()) + 60.0
    try:
        with lock.acquire(timeout=timeout):
            record = read_prepared(config)
            if record is None:
                record = _run_steps(config)
    except filelock.Timeout:
        raise PrepareError(
            f"another process held the prepare lock {lock.lock_file} for over {timeout:g}s; "
            "retry when it is done",
            step="*",
        ) from None
    failed = record.failed
    if failed is not None:
        raise _error(failed)
    return record


def _error(step: StepRecord) -> PrepareError:
    tail = ""
    if step.log:
        from ..processes.logs import log_tail

        tail = log_tail(Path(step.log), _TAIL_LINES)
    from ..processes.logs import last_line

    last = last_line(tail)
    shown = f": {last}" if last else ""
    where = f"; its whole output: {step.log}" if step.log else ""
    return PrepareError(
        f"prepare step {step.name} (`{step.command}`) {step.reason}{shown}{where}; no project "
        "ran: fix it and run again",
        step=step.name,
        log_path=step.log,
        log_tail=tail,
    )


def _run_steps(config: Config) -> PrepareRecord:
    started = time.time()
    state = _read_state(config)
    records: list[StepRecord] = []
    for step in config.prepare.values():
        if records and records[-1].status is StepStatus.FAILED:
            break  # in order: a later step may need what the failed one builds
        fingerprint = _fingerprint(config, step)
        if step.inputs and state.get(step.name) == fingerprint:
            missing = _missing_output(step)
            if missing is None:
                records.append(
                    StepRecord(step.name, step.command, StepStatus.SKIPPED, 0.0, "inputs unchanged")
                )
                continue
            reason = f"ran: its output {missing} is missing"
        elif not step.inputs:
            reason = "ran: it declares no inputs"
        else:
            reason = "ran: its inputs changed" if step.name in state else "ran: first run"
        record = _run_step(config, step, reason)
        records.append(record)
        if record.status is StepStatus.RAN:
            state[step.name] = fingerprint
            _write_state(config, state)
    result = PrepareRecord(tuple(records), started)
    _write_json(config.layout.prepare_record, result.to_json())
    return result


def _run_step(config: Config, step: PrepareConfig, reason: str) -> StepRecord:
    from ..processes import KILL, child_environ, escalation, spawn
    from ..processes.logs import open_log
    from .servers import render, render_command

    values = {"python": sys.executable, "root": str(config.root), "run_id": config.run or ""}
    argv = render_command(step.command, values, key=f"prepare.{step.name}.command")
    env = {**child_environ(), **{k: render(v, values) for k, v in step.env.items()}}
    log_path = config.layout.prepare_log(step.name)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise folder_error(log_path.parent, exc, setting=RESULTS_SETTING, what="create") from None
    began = time.monotonic()
    with open_log(log_path, fresh=True) as log:
        try:
            child = spawn(argv, cwd=step.cwd, env=env, log=log, what=f"prepare step {step.name}")
        except OSError as exc:
            return StepRecord(
                step.name,
                step.command,
                StepStatus.FAILED,
                time.monotonic() - began,
                f"cannot start ({argv[0]}: {exc.strerror}; fix prepare.{step.name}.command/cwd)",
                str(log_path),
            )
        try:
            returncode = child.popen.wait(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            child.stop(escalation(_STOP_GRACE))
            return StepRecord(
                step.name,
                step.command,
                StepStatus.FAILED,
                time.monotonic() - began,
                f"ran over its timeout ({step.timeout:g}s; raise prepare.{step.name}.timeout) "
                "and was stopped",
                str(log_path),
            )
        finally:
            if child.popen.poll() is None:  # an interrupt: no orphan
                child.stop(KILL)
    seconds = time.monotonic() - began
    if returncode != 0:
        return StepRecord(
            step.name,
            step.command,
            StepStatus.FAILED,
            seconds,
            f"failed with exit code {returncode}",
            str(log_path),
            returncode,
        )
    return StepRecord(step.name, step.command, StepStatus.RAN, seconds, reason, str(log_path), 0)


def _input_files(step: PrepareConfig) -> list[Path]:
    found: set[Path] = set()
    for pattern in step.inputs:
        for match in glob.glob(pattern, root_dir=step.cwd, recursive=True):
            path = step.cwd / match
            if path.is_file():
                found.add(path)
    return sorted(found)


def _fingerprint(config: Config, step: PrepareConfig) -> str:
    """sha256 of what the step's result depends on, as far as the config says."""
    digest = hashlib.sha256()
    for part in (step.command, str(step.cwd), json.dumps(sorted(step.env.items()))):
        digest.update(part.encode("utf-8") + b"\0")
    for path in _input_files(step):
        name = os.path.relpath(path, step.cwd)
        try:
            data = path.read_bytes()
        except OSError:
            continue  # vanished meanwhile: the next run sees the change
        digest.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _missing_output(step: PrepareConfig) -> str | None:
    for pattern in step.outputs:
        if not glob.glob(pattern, root_dir=step.cwd, recursive=True):
            return pattern
    return None


def _state_path(config: Config) -> Path:
    return config.state_dir / STATE_FILE


def _read_state(config: Config) -> dict[str, str]:
    try:
        data = json.loads(_state_path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    steps = data.get("steps") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in steps.items()} if isinstance(steps, dict) else {}


def _write_state(config: Config, state: Mapping[str, str]) -> None:
    with contextlib.suppress(E2EInfraError):  # losing it costs a rebuild, not the run
        _write_json(_state_path(config), {"steps": dict(state)})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise folder_error(path, exc, setting=RESULTS_SETTING, what="write") from None
