"""CI shards: every project in exactly one shard, balanced longest-first by recorded durations."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.config import Config, load_config
from e2e_infra.errors import UsageError
from e2e_infra.plan.matrix import (
    DEFAULT_DURATION,
    parse_projects,
    parse_shard,
    plan_shards,
    save_plan,
    shard_projects,
)
from e2e_infra.results.durations import (
    KEEP_DURATIONS,
    durations_for_plan,
    last_durations,
    merge_durations,
    read_durations,
    record_duration,
    record_durations,
)
from e2e_infra.results.layout import DURATIONS

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
        folder = config.layout.project_dir(project) / sub
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


# --- explicit project lists -----------------------------------------------------------------------


def test_a_project_list_is_split_stripped_and_deduplicated() -> None:
    assert parse_projects(" b, a,b ,,") == ["b", "a"]


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_an_explicitly_empty_project_list_is_an_error_naming_the_fix(text: str) -> None:
    with pytest.raises(UsageError, match="names no project") as info:
        parse_projects(text)
    assert "leave --projects out to run every project" in str(info.value)


# --- the durations file ---------------------------------------------------------------------------


def make_config(tmp_path: Path, projects: str = "abcdef") -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.e2e_infra]\nresults_dir = "out"\nstate_dir = "state"\n'
        + "".join(f'[tool.e2e_infra.projects.{p}]\ncommand = "true"\n' for p in projects)
    )
    return load_config(tmp_path / "pyproject.toml", environ={})


def stored(config: Config) -> dict[str, list[float]]:
    data = json.loads((config.results_dir / DURATIONS).read_text())
    return {p: [e["seconds"] for e in items] for p, items in data["projects"].items()}


def test_a_finished_project_adds_to_its_durations_and_keeps_the_last_few(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    for i in range(KEEP_DURATIONS + 2):
        assert record_duration(config, "a", 10.0 + i, at=1000.0 + i)
    assert record_duration(config, "b", 7.0, at=1000.0)
    assert stored(config) == {
        "a": [10.0 + i for i in range(2, KEEP_DURATIONS + 2)],  # the oldest two dropped
        "b": [7.0],
    }
    assert read_durations(config) == {"a": 14.0, "b": 7.0}  # the median of a's last five


def test_a_batch_records_its_projects_in_one_update(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert record_duration(config, "a", 5.0, at=1.0)
    assert record_durations(config, {"a": 6.0, "b": 2.0, "c": 0.0, "d": float("nan")}, at=2.0)
    assert stored(config) == {"a": [5.0, 6.0], "b": [2.0]}  # meaningless ones left out
    data = json.loads((config.results_dir / DURATIONS).read_text())
    assert data["projects"]["b"] == [{"at": 2.0, "seconds": 2.0}]
    assert not record_durations(config, {})
    assert not record_durations(config, {"e": -1.0})


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_a_meaningless_duration_is_not_recorded(tmp_path: Path, seconds: float) -> None:
    config = make_config(tmp_path)
    assert not record_duration(config, "a", seconds)
    assert not (config.results_dir / DURATIONS).exists()


def test_concurrent_recorders_lose_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    projects = "abcdef"

    def record(project: str) -> None:
        for i in range(3):
            assert record_duration(config, project, 1.0 + i, at=float(i))

    threads = [threading.Thread(target=record, args=(p,)) for p in projects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert stored(config) == {p: [1.0, 2.0, 3.0] for p in projects}
    leftovers = [p.name for p in config.results_dir.iterdir() if p.name != DURATIONS]
    assert leftovers == [f".{DURATIONS}.lock"]  # no temp file; the lock is hidden


def test_shard_files_merge_into_the_durations_once_whatever_the_order(tmp_path: Path) -> None:
    main = make_config(tmp_path / "main")
    shard1 = make_config(tmp_path / "s1")
    shard2 = make_config(tmp_path / "s2")
    record_duration(main, "a", 10.0, at=1.0)
    record_duration(shard1, "a", 20.0, at=2.0)
    record_duration(shard2, "b", 5.0, at=2.0)
    files = [shard2.results_dir / DURATIONS, shard1.results_dir / DURATIONS]
    merge_durations(main, [*files, tmp_path / "missing" / DURATIONS])
    merge_durations(main, reversed(files))  # again: nothing doubles
    assert stored(main) == {"a": [10.0, 20.0], "b": [5.0]}


def test_a_broken_durations_file_warns_and_plans_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    config.results_dir.mkdir()
    (config.results_dir / DURATIONS).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="e2e_infra"):
        assert read_durations(config) == {}
    assert "unreadable" in caplog.text
    assert record_duration(config, "a", 3.0)  # and the next record starts it afresh
    assert read_durations(config) == {"a": 3.0}


def test_the_plan_uses_the_durations_file_then_the_latest_run_json(tmp_path: Path) -> None:
    config = make_config(tmp_path, "ab")
    folder = config.layout.project_dir("b")
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(
        json.dumps(
            {"project": "b", "run_id": "r", "result": "passed", "duration": 8.0, "started_at": 1.0}
        )
    )
    assert durations_for_plan(config, ["a", "b"]) == {"b": 8.0}
    record_duration(config, "a", 30.0)
    record_duration(config, "b", 4.0)  # the file wins over run.json
    assert durations_for_plan(config, ["a", "b"]) == {"a": 30.0, "b": 4.0}


# --- `--shard i/N` in one checkout ---------------------------------------------------------------


def test_shards_in_one_checkout_follow_one_plan_whatever_they_record(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    for project, seconds in zip("abcdef", (60, 50, 40, 30, 20, 10), strict=True):
        record_duration(config, project, seconds, at=1.0)
    first = shard_projects(config, 1, 3)
    for project in first:  # shard 1 ran: its projects were much quicker this time
        record_duration(config, project, 1.0, at=2.0)
    replanned = plan_shards(list(config.projects), read_durations(config), 3)
    assert replanned[0].projects != first  # a fresh plan would now differ...
    ran = [*first, *shard_projects(config, 2, 3), *shard_projects(config, 3, 3)]
    assert sorted(ran) == list("abcdef")  # ...but the round follows its plan: each exactly once


def test_a_saved_plan_is_followed_only_for_the_same_projects_and_count(tmp_path: Path) -> None:
    config = make_config(tmp_path, "abcd")
    save_plan(config, plan_shards(["a", "b", "c", "d"], {"a": 1, "b": 1, "c": 1, "d": 100}, 2))
    # No durations are recorded: only the saved plan puts d alone.
    assert [shard_projects(config, i, 2) for i in (1, 2)] == [("d",), ("a", "b", "c")]
    # Another shard count or project set plans anew (by the default duration).
    assert [shard_projects(config, i, 3) for i in (1, 2, 3)] == [("a", "d"), ("b",), ("c",)]
    assert [shard_projects(config, i, 2, ["b", "a"]) for i in (1, 2)] == [("a",), ("b",)]


def test_longest_first_puts_never_timed_projects_first_then_the_longest(tmp_path: Path) -> None:
    from e2e_infra.results.durations import longest_first

    config = make_config(tmp_path, ["quick", "slow", "new", "medium", "other_new"])
    record_durations(config, {"quick": 1.0, "slow": 9.0, "medium": 4.0})
    order = longest_first(config, ["quick", "slow", "new", "medium", "other_new"])
    assert order == ["new", "other_new", "slow", "medium", "quick"]
    # Ties keep the given order.
    record_durations(config, {"new": 4.0, "other_new": 4.0})
    assert longest_first(config, ["other_new", "medium", "new"]) == ["other_new", "medium", "new"]
