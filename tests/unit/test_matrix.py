"""CI shards: every project in exactly one shard, balanced longest-first by recorded durations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.config import load_config
from e2e_infra.errors import UsageError
from e2e_infra.matrix import (
    DEFAULT_DURATION,
    last_durations,
    parse_shard,
    plan_shards,
    shard_projects,
)

names = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), unique=True, max_size=25)


@given(
    projects=names,
    shards=st.integers(min_value=1, max_value=8),
    data=st.data(),
)
def test_every_project_lands_in_exactly_one_shard(
    projects: list[str], shards: int, data: st.DataObject
) -> None:
    durations = {
        p: data.draw(st.floats(min_value=0.1, max_value=1000)) for p in projects if len(p) % 2
    }
    plan = plan_shards(projects, durations, shards)
    assert [s.index for s in plan] == list(range(1, shards + 1))
    assert all(s.total == shards for s in plan)
    placed = [p for s in plan for p in s.projects]
    assert sorted(placed) == sorted(projects)  # all of them, none twice
    # List scheduling bound: no shard exceeds the average load by more than the longest project.
    costs = [s.estimate for s in plan]
    if projects:
        longest = max(durations.values(), default=DEFAULT_DURATION)
        longest = max(longest, *(durations.get(p, 0) for p in projects))
        assert max(costs) <= sum(costs) / shards + max(longest, DEFAULT_DURATION) + 1e-6
    # Who runs where does not depend on the order of the config (only the listing order does).
    again = plan_shards(list(reversed(projects)), durations, shards)
    assert [set(s.projects) for s in plan] == [set(s.projects) for s in again]


def test_longest_first_balances_better_than_round_robin() -> None:
    durations = {"a": 60, "b": 50, "c": 40, "d": 30, "e": 20, "f": 10}
    plan = plan_shards(list(durations), durations, 2)
    assert [round(s.estimate) for s in plan] == [110, 100]
    assert plan[0].projects == ("a", "d", "e") and plan[1].projects == ("b", "c", "f")


def test_unknown_durations_get_the_median_then_the_default() -> None:
    plan = plan_shards(["a", "b", "c", "new"], {"a": 10, "b": 20, "c": 90}, 1)
    assert plan[0].estimate == 10 + 20 + 90 + 20  # "new" counts as the median, 20
    plan = plan_shards(["x", "y"], {}, 2)
    assert [s.estimate for s in plan] == [DEFAULT_DURATION, DEFAULT_DURATION]


def test_more_shards_than_projects_leaves_some_empty_but_valid() -> None:
    plan = plan_shards(["a"], {}, 3)
    assert [s.projects for s in plan] == [("a",), (), ()]
    assert plan[2].to_json() == {
        "shard": "3/3",
        "index": 3,
        "total": 3,
        "projects": "",
        "estimate_seconds": 0.0,
    }


@pytest.mark.parametrize("text", ["", "0/2", "3/2", "1", "a/b", "1/0", "-1/2"])
def test_a_bad_shard_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="i/N"):
        parse_shard(text)


def test_parse_shard() -> None:
    assert parse_shard("2/3") == (2, 3)
    assert parse_shard(" 1 / 1 ") == (1, 1)
    with pytest.raises(UsageError):
        plan_shards(["a"], {}, 0)


def test_durations_come_from_the_latest_passed_or_failed_run(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.e2e_infra]\nresults_dir = "out"\n'
        + "".join(f'[tool.e2e_infra.projects.{p}]\ncommand = "true"\n' for p in "abcd")
    )
    config = load_config(tmp_path / "pyproject.toml", environ={})

    def record(project: str, duration: float, result: str = "passed", sub: str = "") -> None:
        folder = config.project_dir(project) / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(
            json.dumps(
                {
                    "project": project,
                    "run_id": f"r{duration}",
                    "result": result,
                    "duration": duration,
                    "started_at": 1000 + duration,
                    "phases": {"suite": duration},
                }
            )
        )

    record("a", 30)
    record("b", 5, result="failed")
    record("c", 99, result="interrupted")  # says nothing about how long the suite takes
    record("a", 40, sub="runs/x")  # a later concurrent run of a
    assert last_durations(config) == {"a": 40, "b": 5}
    union = [p for i in (1, 2) for p in shard_projects(config, i, 2)]
    assert sorted(union) == ["a", "b", "c", "d"]
