"""Unit tests of e2e_infra.processes: the stop policy against a scripted mechanism (no process)."""

from __future__ import annotations

import signal

import pytest

from e2e_infra.processes import (
    KILL,
    NOT_FOR_CHILDREN,
    Ending,
    ProcessRecord,
    Step,
    Stoppable,
    StopRecord,
    child_environ,
    escalation,
)
from e2e_infra.testing import FakeClock


class Scripted(Stoppable):
    """Processes that end ``after`` seconds past the first of ``ends_on`` they receive."""

    def __init__(
        self,
        clock: FakeClock,
        *,
        ends_on: tuple[signal.Signals, ...] = (),
        after: float = 0.0,
        exited: bool = False,
        returncode: int | None = None,
    ) -> None:
        super().__init__("scripted", clock=clock)
        self.fake = clock
        self.ends_on = ends_on
        self.after = after
        self.exited = exited
        self.code = returncode
        self.sent: list[signal.Signals] = []
        self.ends_at: float | None = None

    def _send(self, signum: signal.Signals) -> None:
        self.sent.append(signum)
        if signum in self.ends_on and self.ends_at is None:
            self.ends_at = self.fake.monotonic() + self.after

    def _gone(self) -> bool:
        return self.exited or (self.ends_at is not None and self.fake.monotonic() >= self.ends_at)

    def _returncode(self) -> int | None:
        return self.code


def test_a_process_that_already_exited_gets_no_signal() -> None:
    target = Scripted(FakeClock(), exited=True, returncode=3)
    record = target.stop(escalation(5.0))
    assert record == StopRecord(Ending.EXITED, None, 3, 0.0)
    assert target.sent == []
    assert record.describe() == "exited with status 3"


def test_one_that_obeys_sigterm_is_terminated_within_the_grace() -> None:
    clock = FakeClock()
    target = Scripted(clock, ends_on=(signal.SIGTERM,), after=0.5)
    record = target.stop(escalation(5.0))
    assert target.sent == [signal.SIGTERM]
    assert record.ending is Ending.TERMINATED and record.signal is signal.SIGTERM
    assert 0.5 <= record.seconds < 5.0
    assert record.describe().startswith("stopped by SIGTERM after")


def test_one_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    clock = FakeClock()
    target = Scripted(clock, ends_on=(signal.SIGKILL,))
    record = target.stop(escalation(2.0))
    assert target.sent == [signal.SIGTERM, signal.SIGKILL]
    assert record.ending is Ending.KILLED and record.signal is signal.SIGKILL
    assert record.seconds == pytest.approx(2.0, abs=0.05)  # the grace, no more


def test_one_that_survives_every_rung_is_reported_not_hidden() -> None:
    target = Scripted(FakeClock())
    record = target.stop(KILL)
    assert record.ending is Ending.SURVIVED and not record.ended
    assert record.describe() == "survived SIGKILL"


def test_stopping_twice_returns_the_same_record_and_sends_nothing_more() -> None:
    target = Scripted(FakeClock(), ends_on=(signal.SIGTERM,))
    first = target.stop(escalation(1.0))
    second = target.stop(escalation(1.0))
    assert first is second and target.stop_record is first
    assert target.sent == [signal.SIGTERM]


def test_begin_signals_at_once_and_the_grace_counts_from_there() -> None:
    clock = FakeClock()
    target = Scripted(clock, ends_on=(signal.SIGKILL,))
    target.begin(escalation(3.0))
    target.begin(escalation(3.0))  # idempotent too
    assert target.sent == [signal.SIGTERM]
    clock.advance(2.0)  # e.g. other servers were being stopped meanwhile
    record = target.stop(escalation(3.0))
    assert target.sent == [signal.SIGTERM, signal.SIGKILL]
    assert record.seconds == pytest.approx(3.0, abs=0.05)


def test_a_custom_ladder_climbs_in_order() -> None:
    # PostgreSQL's own: fast shutdown, immediate shutdown, SIGKILL.
    ladder = (Step(signal.SIGINT, 1.0), Step(signal.SIGQUIT, 1.0), Step(signal.SIGKILL, 1.0))
    target = Scripted(FakeClock(), ends_on=(signal.SIGQUIT,))
    record = target.stop(ladder)
    assert target.sent == [signal.SIGINT, signal.SIGQUIT]
    assert record.ending is Ending.TERMINATED and record.signal is signal.SIGQUIT


def test_a_stop_record_serialises_for_run_records() -> None:
    record = StopRecord(Ending.KILLED, signal.SIGKILL, -9, 2.0004)
    assert record.to_json() == {
        "ending": "killed",
        "signal": "SIGKILL",
        "returncode": -9,
        "seconds": 2.0,
    }
    assert StopRecord(Ending.EXITED, returncode=-11).describe() == "was killed by SIGSEGV"


def test_the_escalation_ladder_is_sigterm_grace_then_sigkill() -> None:
    first, last = escalation(7.5)
    assert (first.signal, first.wait) == (signal.SIGTERM, 7.5)
    assert last.signal is signal.SIGKILL
    assert escalation(-1)[0].wait == 0.0


def test_a_process_record_round_trips_and_rejects_bad_data() -> None:
    record = ProcessRecord(pid=4242, pgid=4242, start_time=1_800_000_000.25)
    assert ProcessRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="pgid"):
        ProcessRecord.from_json({"pid": 4242, "pgid": True, "start_time": 1.0})


def test_a_childs_environment_has_no_tool_secret_nor_plumbing_but_the_users_own_variables() -> None:
    outer = {
        "E2E_ADMIN_DATABASE_URL": "postgresql://postgres:pw@db/postgres",
        "E2E_CONFIG": "/repo/pyproject.toml",
        "E2E_STATE_DIR": "/repo/.e2e-infra",
        "E2E_NOX_RUN_ID": "run-of-the-main-nox-process",
        "E2E_BUILD_TIMEOUT": "600",
        "PGPASSWORD": "pw",
        "PGHOST": "db",
        "PGSSLKEY": "/secret/admin.key",
        "E2E_RUN_ID": "run-1",
        "E2E_INFRA_RUN": "token",
        "E2E_BASE_URL": "an application's own setting",
        "PGTZ": "UTC",
        "PATH": "/usr/bin",
    }
    assert child_environ(outer) == {
        "E2E_RUN_ID": "run-1",
        "E2E_INFRA_RUN": "token",
        "E2E_BASE_URL": "an application's own setting",
        "PGTZ": "UTC",
        "PATH": "/usr/bin",
    }
    assert "E2E_ADMIN_DATABASE_URL" in NOT_FOR_CHILDREN and "E2E_RUN_ID" not in NOT_FOR_CHILDREN
