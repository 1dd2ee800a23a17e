"""How many projects at once: cores and memory against recorded peaks, said in one line."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.config import Config, load_config
from e2e_infra.parallel.jobs import (
    BROWSER_PEAK,
    DEFAULT_PEAK,
    GiB,
    MiB,
    available_memory,
    choose_jobs,
    jobs_for,
)


def _config(tmp_path: Path) -> Config:
    commands = {
        "api": "python -m pytest api -p no:playwright",  # the plugin turned off: no browser
        "ui": "python -m pytest ui --screenshot only-on-failure",  # pytest-playwright
        "node": "npx playwright test",
    }
    (tmp_path / "pyproject.toml").write_text(
        '[tool.e2e_infra]\nresults_dir = "out"\n'
        + "".join(f'[tool.e2e_infra.projects.{p}]\ncommand = "{c}"\n' for p, c in commands.items())
    )
    return load_config(tmp_path / "pyproject.toml", environ={})


def _record(config: Config, project: str, peak: int, *, run: str, started: float) -> None:
    folder = config.results_dir / run / project
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(
        json.dumps(
            {
                "project": project,
                "run_id": run,
                "result": "passed",
                "duration": 1.0,
                "started_at": started,
                "phases": {},
                "resources": {"peak_memory_bytes": peak, "cpu_seconds": 1.5},
            }
        )
    )


def test_first_run_uses_conservative_defaults_and_cores_when_memory_is_plenty(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    choice = jobs_for(config, list(config.projects), cores=2, available=21 * GiB)
    assert choice.peaks == {"api": DEFAULT_PEAK, "ui": BROWSER_PEAK, "node": BROWSER_PEAK}
    assert choice.jobs == 2
    assert choice.reason.startswith("jobs 2: 2 cores, 21.0 GiB available, largest peak 0.6 GiB")


def test_memory_limits_a_many_core_runner_with_browsers(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _record(config, "ui", 900 * MiB, run="r1", started=100)
    _record(config, "node", 700 * MiB, run="r1", started=100)
    _record(config, "api", 150 * MiB, run="r1", started=100)
    # 1.8 GiB less 10% headroom = 1.62 GiB: ui (0.88) + node (0.68) fit, api (0.15) does not.
    choice = jobs_for(config, list(config.projects), cores=16, available=int(1.8 * GiB))
    assert choice.jobs == 2
    assert choice.recorded == {"ui", "node", "api"}
    assert "16 cores, 1.8 GiB available, largest recorded peak 0.9 GiB (ui)" in choice.reason
    assert "memory fits 2 at once" in choice.reason
    plan = choice.plan()
    assert plan[0] == choice.reason and plan[1].startswith("  ui: peak 0.9 GiB (recorded)")


def test_the_newest_recorded_peak_of_each_project_counts(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _record(config, "ui", 3 * GiB, run="old", started=100)
    _record(config, "ui", 400 * MiB, run="new", started=200)
    choice = jobs_for(config, ["ui"], cores=4, available=10 * GiB)
    assert choice.peaks == {"ui": 400 * MiB}


def test_never_less_than_one_job_even_when_nothing_fits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    choice = jobs_for(config, ["ui", "node"], cores=8, available=100 * MiB)
    assert choice.jobs == 1
    assert "memory fits 1 at once" in choice.reason


@given(
    peaks=st.lists(st.integers(min_value=1, max_value=4 * GiB), max_size=30),
    cores=st.integers(min_value=1, max_value=64),
    available=st.integers(min_value=0, max_value=64 * GiB),
)
def test_the_choice_never_exceeds_cores_projects_or_memory(
    peaks: list[int], cores: int, available: int
) -> None:
    named = {f"p{i}": peak for i, peak in enumerate(peaks)}
    jobs = choose_jobs(named, cores=cores, available=available)
    assert 1 <= jobs <= max(1, min(cores, len(named)))
    if jobs > 1:  # the largest `jobs` peaks fit into 90% of what is available
        assert sum(sorted(peaks, reverse=True)[:jobs]) <= available * 0.9


def test_a_cgroup_limit_below_the_machine_memory_wins(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(f"{2 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{GiB // 2}\n")
    assert 0 < available_memory(tmp_path) <= int(1.5 * GiB)
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(tmp_path) > 0


def test_projects_recorded_to_leave_cores_idle_run_more_at_once_up_to_twice_the_cores(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    for project in config.projects:
        _record(config, project, 300 * MiB, run="r1", started=100)
    # Recorded as 1.5 cores each (_record): the cores decide, as before.
    assert jobs_for(config, list(config.projects), cores=2, available=21 * GiB).jobs == 2
    for project in config.projects:  # suites that wait on servers: 0.4 of a core each
        folder = config.results_dir / "r2" / project
        folder.mkdir(parents=True)
        record = {"project": project, "run_id": "r2", "result": "passed", "duration": 10.0}
        record |= {"started_at": 200, "resources": {"peak_memory_bytes": 1, "cpu_seconds": 4.0}}
        (folder / "run.json").write_text(json.dumps(record))
    choice = jobs_for(config, list(config.projects), cores=2, available=21 * GiB)
    assert choice.jobs == 3  # int(2 / 0.4) = 5, at most 4 (2 x 2 cores), and 3 projects
    assert "projects recorded using 0.40 cores each, so the cores run 4" in choice.reason
    assert (
        choose_jobs(
            {f"p{i}": 1 for i in range(9)},
            cores=2,
            available=GiB,
            shares=dict.fromkeys((f"p{i}" for i in range(9)), 0.1),
        )
        == 4
    )
    # One project never run: no share known for all, the cores decide.
    assert choose_jobs({"a": 1, "b": 1, "c": 1}, cores=2, available=GiB, shares={"a": 0.1}) == 2
