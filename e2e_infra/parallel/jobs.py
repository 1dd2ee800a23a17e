"""How many projects to run at once: from the cores *and* the memory the projects need.

``nox -j auto`` means one session per CPU. With browsers that is wrong: one Chromium with its
Playwright driver is ~500 MiB, so 16 cores with 8 GiB cannot run 16 browser projects at once.
:func:`choose_jobs` takes the smaller of

- the cores this process may use (``sched_getaffinity``), and
- how many of the largest per-project memory peaks fit into the available memory (the smaller of
  ``psutil.virtual_memory().available`` and what the cgroup still allows), keeping
  :data:`HEADROOM` of it free,

and never more than the number of projects. When every project's CPU use is recorded (``run.json``
``resources.cpu_seconds`` over its duration: the cores its suite and servers kept busy) and the
projects use less than a core each on average, the cores allow more of them at once: ``cores /
their mean share``, at most :data:`CPU_OVERCOMMIT` times the cores (suites that mostly wait on
servers and browsers, as end-to-end suites do, leave cores idle otherwise).

Each project's peak is the newest ``run.json`` ``resources.peak_memory_bytes`` recorded for it
(any run folder); a project never run yet counts with a conservative default:
:data:`BROWSER_PEAK` when its command looks like it drives a browser (playwright, say), else
:data:`DEFAULT_PEAK`.

``invoke e2e.all`` / ``e2e.affected`` (``--jobs auto``, the default) use it and log one line, e.g.
``jobs 2: 2 cores, 21.3 GiB available, largest recorded peak 0.8 GiB``. For nox directly::

    nox -j "$(python -m e2e_infra.parallel.jobs)" -t e2e   # the number on stdout, why on stderr
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import Config, ProjectConfig

__all__ = [
    "BROWSER_PEAK",
    "CPU_OVERCOMMIT",
    "DEFAULT_PEAK",
    "HEADROOM",
    "JobsChoice",
    "available_memory",
    "choose_jobs",
    "cpu_slots",
    "jobs_for",
    "recorded_peaks",
    "recorded_shares",
    "usable_cores",
]

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_PEAK = 200 * MiB  # a project never run yet: servers + suite
BROWSER_PEAK = 600 * MiB  # ... whose command runs Playwright: one browser + its driver on top
HEADROOM = 0.1  # of the available memory kept free (PostgreSQL, page cache, the tool itself)
CPU_OVERCOMMIT = 2  # projects per core at most, however little CPU they were recorded using


def _gib(size: int) -> str:
    return f"{size / GiB:.1f} GiB"


@dataclass(frozen=True)
class JobsChoice:
    """The chosen parallelism and what it was chosen from."""

    jobs: int
    cores: int
    available: int  # bytes
    peaks: Mapping[str, int]  # project -> bytes, recorded or default
    recorded: frozenset[str]  # the projects whose peak was recorded (others: a default)
    shares: Mapping[str, float] = field(default_factory=dict)  # project -> cores it kept busy

    @property
    def by_cpu(self) -> int:
        """How many projects the cores run at once: the cores, or more when every project is
        recorded to use less than a core on average (see the module docstring)."""
        return cpu_slots(self.cores, self.shares, self.peaks)

    @property
    def by_memory(self) -> int:
        """How many of the largest peaks fit into the available memory (less the headroom)."""
        budget = self.available * (1 - HEADROOM)
        fits = 0
        for peak in sorted(self.peaks.values(), reverse=True):
            if budget < peak:
                break
            budget -= peak
            fits += 1
        return fits

    @property
    def reason(self) -> str:
        """One line: ``jobs 2: 2 cores, 21.3 GiB available, largest recorded peak 0.8 GiB``."""
        largest = max(self.peaks, key=lambda p: self.peaks[p], default=None)
        if largest is None:
            peak = "no projects"
        else:
            size = _gib(self.peaks[largest])
            if largest in self.recorded:
                peak = f"largest recorded peak {size} ({largest})"
            else:
                peak = f"largest peak {size} ({largest}: never run, a default)"
        text = f"jobs {self.jobs}: {self.cores} cores, {_gib(self.available)} available, {peak}"
        if self.by_cpu > self.cores:
            mean = sum(self.shares.values()) / len(self.shares)
            text += (
                f"; projects recorded using {mean:.2f} cores each, so the cores run {self.by_cpu}"
            )
        if self.by_memory < min(self.by_cpu, len(self.peaks)):
            text += f"; memory fits {max(1, self.by_memory)} at once"
        elif len(self.peaks) < self.by_cpu:
            text += f"; {len(self.peaks)} projects"
        return text

    def plan(self) -> list[str]:
        """The reason, then one line per project (largest peak first)."""
        lines = [self.reason]
        for project in sorted(self.peaks, key=lambda p: (-self.peaks[p], p)):
            source = "recorded" if project in self.recorded else "default"
            lines.append(f"  {project}: peak {_gib(self.peaks[project])} ({source})")
        return lines


def cpu_slots(cores: int, shares: Mapping[str, float], projects: Mapping[str, object]) -> int:
    """The cores, or ``cores / mean share`` (at most :data:`CPU_OVERCOMMIT` x cores) when the
    share of every project is known and below one core."""
    if not projects or any(p not in shares for p in projects):
        return cores
    mean = sum(shares[p] for p in projects) / len(projects)
    if mean <= 0:
        return cores * CPU_OVERCOMMIT
    return max(cores, min(cores * CPU_OVERCOMMIT, int(cores / mean)))


def choose_jobs(
    peaks: Mapping[str, int],
    *,
    cores: int,
    available: int,
    shares: Mapping[str, float] | None = None,
) -> int:
    """The pure policy: min(what the cores run, peaks that fit, projects), at least 1."""
    choice = JobsChoice(1, cores, available, dict(peaks), frozenset(), dict(shares or {}))
    return max(1, min(choice.by_cpu, choice.by_memory, len(peaks) or 1))


# Words in a suite's command that mean a real browser (pytest-playwright's own options included).
BROWSER_HINTS = ("playwright", "chromium", "--browser", "--screenshot", "--tracing", "cypress")


def default_peak(project: ProjectConfig) -> int:
    """A project never run yet: :data:`BROWSER_PEAK` if its command looks like it drives a
    browser (``-p no:playwright``, which turns the plugin off, does not count), else
    :data:`DEFAULT_PEAK`."""
    command = project.command.lower().replace("no:playwright", "")
    return BROWSER_PEAK if any(hint in command for hint in BROWSER_HINTS) else DEFAULT_PEAK


def recorded_peaks(config: Config, projects: Sequence[str]) -> dict[str, int]:
    """The newest recorded ``resources.peak_memory_bytes`` of each project that has one."""
    found: dict[str, int] = {}
    # Unscoped (no run set): each project's newest run of any run folder.
    for run in replace(config, run=None).layout.collect(projects):
        peak = run.peak_memory_bytes
        if peak is not None:
            found[run.project] = peak
    return found


def recorded_shares(config: Config, projects: Sequence[str]) -> dict[str, float]:
    """The cores each project's newest recorded run kept busy: its suite's and servers' CPU
    seconds over its duration."""
    found: dict[str, float] = {}
    for run in replace(config, run=None).layout.collect(projects):
        cpu = run.cpu_seconds
        if cpu is not None and run.duration > 0 and run.timed:
            found[run.project] = cpu / run.duration
    return found


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes available now: the machine's, or less if this process's cgroup (v2) allows less."""
    import psutil

    available = int(psutil.virtual_memory().available)
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def jobs_for(
    config: Config,
    projects: Sequence[str],
    *,
    cores: int | None = None,
    available: int | None = None,
) -> JobsChoice:
    """Choose the parallelism for ``projects`` on this machine (``cores``/``available`` override
    what is measured, for tests)."""
    recorded = recorded_peaks(config, projects)
    peaks = {p: recorded.get(p, default_peak(config.project(p))) for p in projects}
    cores = usable_cores() if cores is None else cores
    available = available_memory() if available is None else available
    shares = recorded_shares(config, projects)
    jobs = choose_jobs(peaks, cores=cores, available=available, shares=shares)
    return JobsChoice(jobs, cores, available, peaks, frozenset(recorded), shares)


def main() -> int:
    """``python -m e2e_infra.parallel.jobs``: the number on stdout, the reason on stderr."""
    from ..config import load_config
    from ..errors import E2EInfraError

    try:
        config = load_config()
        choice = jobs_for(config, list(config.projects))
    except E2EInfraError as exc:
        print(f"e2e-infra: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    print(f"e2e-infra: {choice.reason}", file=sys.stderr)
    print(choice.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
