"""Where a run's wall time went (report/wall.py), from records with known times."""

from __future__ import annotations

import pytest

from e2e_infra.report.wall import wall_time
from e2e_infra.results.record import Result, RunRecord


def _run(project: str, start: float, seconds: float, **extra: object) -> RunRecord:
    return RunRecord(
        project=project,
        run_id="r",
        started_at=1000.0 + start,
        result=Result.PASSED,
        duration=seconds,
        phases={"ports": 0.01, "suite": seconds - 0.01},
        **extra,  # type: ignore[arg-type]
    )


def test_config_order_on_two_lanes_leaves_a_tail_and_a_long_critical_path() -> None:
    # a, b, c take 1 s, d 3 s; two lanes, d started last: lane 2 waits 2 s for d to end.
    runs = [_run("a", 0, 1), _run("b", 0, 1), _run("c", 1, 1), _run("d", 1, 3)]
    spent = wall_time(runs)
    assert spent is not None
    assert spent.lanes == 2 and spent.wall == pytest.approx(4.0)
    assert spent.tail == pytest.approx(2.0)  # the lane of c is idle from 2 s to 4 s
    assert spent.critical == ("a", "d") or spent.critical == ("b", "d")
    assert spent.critical_busy == pytest.approx(4.0)
    assert spent.phases["suite"] == pytest.approx(5.96)


def test_longest_first_on_two_lanes_ends_together() -> None:
    runs = [_run("d", 0, 3), _run("a", 0, 1), _run("b", 1, 1), _run("c", 2, 1)]
    spent = wall_time(runs)
    assert spent is not None
    assert spent.wall == pytest.approx(3.0) and spent.tail == pytest.approx(0.0)
    assert spent.critical in (("d",), ("a", "b", "c"))


def test_the_tools_cpu_and_each_servers_start_up_are_summed_and_shown() -> None:
    runs = [
        _run("a", 0, 2, resources={"tool_cpu_seconds": 0.1}, server_startups={"backend": 0.5}),
        _run("b", 0, 2, resources={"tool_cpu_seconds": 0.2}, server_startups={"backend": 1.5}),
    ]
    spent = wall_time(runs)
    assert spent is not None
    assert spent.tool_cpu == pytest.approx(0.3)
    assert spent.startups == {"backend": [0.5, 1.5]}
    text = "\n".join(spent.lines())
    assert "backend 1.00s (x2, 2.0s in all)" in text and "the tool's own CPU 0.30s" in text


def test_no_timed_record_gives_nothing() -> None:
    assert wall_time([]) is None
    assert wall_time([_run("a", 0, 0)]) is None
