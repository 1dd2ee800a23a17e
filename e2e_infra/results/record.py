"""The run record: one result enum, one frozen record of a project's run, to and from JSON.

Every reader and writer of a project's outcome goes through here (nox keeps one ``Status`` and one
``Result`` the same way): the session builds a :class:`Draft` while it runs and writes the frozen
:class:`RunRecord` it becomes as ``run.json``; the summary, ``report.html``, the live status, the
CI plan and the command line read :class:`RunRecord` back. What a result means (did it pass, is
its duration the suite's, how to colour it, how bad it is) is a property of :class:`Result`, so
no module compares result strings (``tests/unit/test_layout.py`` keeps it so).

``run.json`` carries ``"version"``: 1 was the format before this module (no version field, the
same keys); 3 added ``suite_log``, ``playwright_report``, ``error_log`` and ``template``; 4 added
``attempts`` (the earlier attempts of a project run again, ``retries``), ``flaky_tests``,
``attached`` (a suite run against an environment kept up by ``e2e.up``) and
``server_startups``.
:meth:`RunRecord.from_json` reads them all (a missing key is its default).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from ..conninfo import mask_secrets
from ..errors import E2EInfraError, Interrupted, SuiteFailedError
from ..files import RESULTS_SETTING, folder_error

__all__ = ["RECORD_VERSION", "Draft", "Result", "RunRecord"]

RECORD_VERSION = 4


class Result(Enum):
    """How a project's run ended (``RUNNING``: not yet, or its process died before it said)."""

    RUNNING = "running"
    PASSED = "passed"
    FLAKY = "flaky"  # failed, then passed on a retry
    FAILED = "failed"  # the suite failed
    ERROR = "error"  # the tool or the environment failed: ports, database, a server
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"

    @classmethod
    def parse(cls, value: object) -> Result:
        """The member named by ``value``; ``ERROR`` for anything unknown (a newer writer)."""
        try:
            return cls(value)
        except ValueError:
            return cls.ERROR

    @property
    def ok(self) -> bool:
        """Whether the run counts as a success for an exit code."""
        return self in (Result.PASSED, Result.FLAKY, Result.SKIPPED)

    @property
    def timed(self) -> bool:
        """Whether its duration says how long the suite takes (for CI plans and scheduling)."""
        return self in (Result.PASSED, Result.FLAKY, Result.FAILED)

    @property
    def finished(self) -> bool:
        return self is not Result.RUNNING

    @property
    def severity(self) -> int:
        """For sorting what to read first: the worst result first (lower is worse)."""
        return _SEVERITY[self]

    @property
    def style(self) -> str:
        """Its colour in a terminal (rich)."""
        return _STYLE[self]

    @property
    def css(self) -> str:
        """Its colour class in ``report.html``."""
        return _CSS[self]

    @property
    def label(self) -> str:
        return self.value

    def __str__(self) -> str:
        return self.value


_SEVERITY = {
    Result.FAILED: 0,
    Result.ERROR: 1,
    Result.RUNNING: 2,
    Result.INTERRUPTED: 3,
    Result.FLAKY: 4,
    Result.SKIPPED: 5,
    Result.PASSED: 6,
}
_STYLE = {
    Result.RUNNING: "cyan",
    Result.PASSED: "green",
    Result.FLAKY: "yellow",
    Result.FAILED: "red",
    Result.ERROR: "red",
    Result.INTERRUPTED: "yellow",
    Result.SKIPPED: "dim",
}
_CSS = {
    Result.RUNNING: "grey",
    Result.PASSED: "green",
    Result.FLAKY: "amber",
    Result.FAILED: "red",
    Result.ERROR: "red",
    Result.INTERRUPTED: "amber",
    Result.SKIPPED: "grey",
}


@dataclass(frozen=True)
class RunRecord:
    """One project's run, as ``run.json`` holds it."""

    project: str
    run_id: str
    started_at: float
    result: Result = Result.RUNNING
    returncode: int | None = None
    duration: float = 0.0
    phases: Mapping[str, float] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    database: str | None = None
    seed: str | None = None
    logs: Mapping[str, str] = field(default_factory=dict)  # server name -> its log file
    junit: str | None = None
    error: str | None = None  # one line, passwords masked
    log_tail: str | None = None  # of the server whose failure ended the run
    kept_database: bool = False
    leftovers: Mapping[str, int] = field(default_factory=dict)  # processes ended after a part
    server_exits: tuple[Mapping[str, Any], ...] = ()  # servers that died during the run
    server_stops: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    resources: Mapping[str, Any] | None = None  # peak_memory_bytes, cpu_seconds, ...
    server_startups: Mapping[str, float] = field(default_factory=dict)  # spawn to healthy, s
    suite_log: str | None = None  # the suite's console output
    playwright_report: str | None = None  # the suite's own HTML report, in the team's folder
    error_log: str | None = None  # the whole output of what failed: a migrate/seed command, a step
    # The template its database came from: name, built (by this run) or not, build_seconds, spare.
    template: Mapping[str, Any] | None = None
    # The earlier attempts, when the project ran again (retries): attempt, result, duration,
    # started_at, error, failed_tests, folder (where its files were moved).
    attempts: tuple[Mapping[str, Any], ...] = ()
    flaky_tests: tuple[str, ...] = ()  # failed, then passed (on a retry of ours or the suite's)
    attached: bool = False  # ran against an environment kept up by `e2e.up`
    # Where it was read from (not part of the JSON): its folder holds its logs and JUnit file.
    path: Path | None = field(default=None, compare=False)

    @property
    def passed(self) -> bool:
        return self.result.ok

    @property
    def timed(self) -> bool:
        return self.result.timed

    @property
    def folder(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    @property
    def slowest_phase(self) -> str | None:
        return max(self.phases, key=lambda k: self.phases[k]) if self.phases else None

    @property
    def peak_memory_bytes(self) -> int | None:
        value = (self.resources or {}).get("peak_memory_bytes")
        return value if isinstance(value, int) and value > 0 else None

    @property
    def cpu_seconds(self) -> float | None:
        value = (self.resources or {}).get("cpu_seconds")
        return float(value) if isinstance(value, (int, float)) else None

    def notes(self) -> list[str]:
        """One line per server that died and per part that left processes behind."""
        lines = []
        for ended in self.server_exits:
            how = (
                f"killed by {ended.get('signal')}"
                if ended.get("signal")
                else f"exited with status {ended.get('returncode')}"
            )
            lines.append(f"server {ended.get('server')} {how} during the {ended.get('during')}")
        if self.leftovers:
            parts = ", ".join(f"{part} {count}" for part, count in self.leftovers.items())
            lines.append(f"leftover processes ended: {parts}")
        total = len(self.attempts) + 1
        for earlier in self.attempts:
            result = Result.parse(earlier.get("result"))
            failed = [str(name) for name in earlier.get("failed_tests") or ()]
            why = earlier.get("error") or (
                f"failing: {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}"
                if failed
                else ""
            )
            lines.append(
                f"attempt {earlier.get('attempt')} of {total} {result.label}"
                f"{f': {why}' if why else ''}"
            )
        for name in self.flaky_tests[:10]:
            lines.append(f"flaky test (failed, then passed on a retry): {name}")
        if len(self.flaky_tests) > 10:
            lines.append(f"... and {len(self.flaky_tests) - 10} more flaky tests")
        return lines

    @property
    def attempt_count(self) -> int:
        """How many times the project ran in this run (1 without retries)."""
        return len(self.attempts) + 1

    # --- JSON -------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "project": self.project,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "result": self.result.value,
            "returncode": self.returncode,
            "duration": round(self.duration, 4),
            "phases": {k: round(v, 4) for k, v in self.phases.items()},
            "ports": dict(self.ports),
            "database": self.database,
            "seed": self.seed,
            "logs": dict(self.logs),
            "junit": self.junit,
            "error": self.error,
            "log_tail": self.log_tail,
            "kept_database": self.kept_database,
            "leftovers": dict(self.leftovers),
            "server_exits": [dict(x) for x in self.server_exits],
            "server_stops": {k: dict(v) for k, v in self.server_stops.items()},
            "resources": dict(self.resources) if self.resources is not None else None,
            "server_startups": {k: round(v, 4) for k, v in self.server_startups.items()},
            "suite_log": self.suite_log,
            "playwright_report": self.playwright_report,
            "error_log": self.error_log,
            "template": dict(self.template) if self.template is not None else None,
            "attempts": [dict(x) for x in self.attempts],
            "flaky_tests": list(self.flaky_tests),
            "attached": self.attached,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path | None = None) -> RunRecord:
        """The record ``data`` describes (versions 1 to 3); ``ValueError`` when it is not one."""
        try:
            logs = data.get("logs") or {}
            return cls(
                project=str(data["project"]),
                run_id=str(data["run_id"]),
                started_at=float(data["started_at"]),
                result=Result.parse(data.get("result")),
                returncode=_int_or_none(data.get("returncode")),
                duration=float(data.get("duration") or 0.0),
                phases={str(k): float(v) for k, v in _mapping(data.get("phases")).items()},
                ports={str(k): int(v) for k, v in _mapping(data.get("ports")).items()},
                database=_str_or_none(data.get("database")),
                seed=_str_or_none(data.get("seed")),
                logs={str(k): str(v) for k, v in logs.items()} if isinstance(logs, dict) else {},
                junit=_str_or_none(data.get("junit")),
                # Masked by the writer; masked again in case an older one did not.
                error=mask_secrets(str(data["error"])) if data.get("error") else None,
                log_tail=mask_secrets(str(data["log_tail"])) if data.get("log_tail") else None,
                kept_database=bool(data.get("kept_database", False)),
                leftovers={str(k): int(v) for k, v in _mapping(data.get("leftovers")).items()},
                server_exits=tuple(
                    x for x in data.get("server_exits") or () if isinstance(x, dict)
                ),
                server_stops={
                    str(k): v
                    for k, v in _mapping(data.get("server_stops")).items()
                    if isinstance(v, dict)
                },
                resources=dict(res) if isinstance(res := data.get("resources"), dict) else None,
                server_startups={
                    str(k): float(v) for k, v in _mapping(data.get("server_startups")).items()
                },
                suite_log=_str_or_none(data.get("suite_log")),
                playwright_report=_str_or_none(data.get("playwright_report")),
                error_log=_str_or_none(data.get("error_log")),
                template=dict(tpl) if isinstance(tpl := data.get("template"), dict) else None,
                attempts=tuple(x for x in data.get("attempts") or () if isinstance(x, dict)),
                flaky_tests=tuple(str(x) for x in data.get("flaky_tests") or ()),
                attached=bool(data.get("attached", False)),
                path=path,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a run record: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> RunRecord | None:
        """The record in ``path``; None when it is missing, unreadable or not a record."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                return None
            return cls.from_json(data, path)
        except (OSError, ValueError):
            return None

    def write(self, path: Path) -> RunRecord:
        """Write it to ``path`` atomically (0600: paths and errors are the user's); return it with
        its path. A full or read-only folder is a :class:`~e2e_infra.errors.FolderError` naming
        it (the temporary file removed): a run whose record is lost must not read as passed."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            with os.fdopen(os.open(tmp, flags, 0o600), "w", encoding="utf-8") as out:
                out.write(json.dumps(self.to_json(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise folder_error(path, exc, setting=RESULTS_SETTING, what="write") from None
        return replace(self, path=path)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_or_none(value: object) -> str | None:
    return str(value) if value is not None else None


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    return int(value)


@dataclass
class Draft:
    """The record of a run in progress: what the session (and its watch) fill in as it goes.
    :meth:`freeze` gives the :class:`RunRecord` it becomes."""

    project: str
    run_id: str
    started_at: float
    result: Result = Result.RUNNING
    returncode: int | None = None
    duration: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    database: str | None = None
    seed: str | None = None
    logs: dict[str, str] = field(default_factory=dict)
    junit: str | None = None
    error: str | None = None
    log_tail: str | None = None
    kept_database: bool = False
    leftovers: dict[str, int] = field(default_factory=dict)
    server_exits: list[dict[str, Any]] = field(default_factory=list)
    server_stops: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, Any] | None = None
    server_startups: dict[str, float] = field(default_factory=dict)
    suite_log: str | None = None
    playwright_report: str | None = None
    error_log: str | None = None
    template: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    flaky_tests: list[str] = field(default_factory=list)
    attached: bool = False

    def freeze(self, path: Path | None = None) -> RunRecord:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["phases"] = dict(self.phases)
        values["ports"] = dict(self.ports)
        values["logs"] = dict(self.logs)
        values["leftovers"] = dict(self.leftovers)
        values["server_exits"] = tuple(dict(x) for x in self.server_exits)
        values["server_stops"] = {k: dict(v) for k, v in self.server_stops.items()}
        values["resources"] = dict(self.resources) if self.resources is not None else None
        values["server_startups"] = dict(self.server_startups)
        values["template"] = dict(self.template) if self.template is not None else None
        values["attempts"] = tuple(dict(x) for x in self.attempts)
        values["flaky_tests"] = tuple(self.flaky_tests)
        return RunRecord(**values, path=path)

    def note_error(self, exc: BaseException, secrets: Sequence[str] = ()) -> None:
        """Record how ``exc`` ended the run: interrupted, failed (the suite) or error (the rest)."""
        hidden = tuple(secrets)
        if isinstance(exc, Interrupted | KeyboardInterrupt):
            self.result = Result.INTERRUPTED
            self.error = "interrupted"
        elif isinstance(exc, SuiteFailedError):
            self.result = Result.FAILED
            self.error = mask_secrets(exc.one_line(), hidden)
            if self.returncode is None:
                self.returncode = exc.returncode
        else:
            self.result = Result.ERROR
            message = exc.one_line() if isinstance(exc, E2EInfraError) else repr(exc)
            self.error = mask_secrets(message, hidden)
            tail = getattr(exc, "log_tail", "")
            if tail:
                self.log_tail = mask_secrets(str(tail), hidden)
            where = getattr(exc, "log_path", None)  # a migrate/seed command's, a prepare step's
            if where:
                self.error_log = str(where)

    def add_error(self, message: str) -> None:
        """A problem after the run's own outcome (a release that failed): appended to the error;
        a run that had passed becomes an error."""
        first = self.error if self.result is not Result.INTERRUPTED else None
        self.error = f"{first}; then {message}" if first else message
        if self.result in (Result.PASSED, Result.RUNNING):
            self.result = Result.ERROR

    def finish(self, failed: bool) -> None:
        """A run still ``RUNNING`` at its end: passed, unless something failed on the way."""
        if self.result is Result.RUNNING:
            self.result = Result.ERROR if failed else Result.PASSED
