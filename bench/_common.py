"""Helpers the benchmarks share: a private copy of the config, the machine, load, medians.

Every bench runs against its own state: a copy of the repository's ``[tool.e2e_infra]`` whose
``state_dir`` and ``results_dir`` live in a temporary folder and whose port range is 23000-24999
(outside the kernel's ephemeral range), handed to nox and invoke through ``E2E_CONFIG``. The
embedded cluster such a config starts is stopped and its folder removed by :func:`stop_cluster`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e2e_infra.config import Config
    from e2e_infra.conninfo import ConnInfo

REPO = Path(__file__).resolve().parents[1]
BENCH_PORT_RANGE = "23000-24999"


# --- the private config ---------------------------------------------------------------------------


def write_config(
    folder: Path,
    *,
    projects: dict[str, Any] | None = None,
    port_range: str = BENCH_PORT_RANGE,
    **top: Any,
) -> Path:
    """A copy of the repository's [tool.e2e_infra] with state and results under ``folder``.

    ``projects`` replaces the demo's projects when given; ``top`` overrides top-level keys (and
    ``database={...}`` individual keys of the database table).
    """
    sys.path.insert(0, str(REPO))
    from e2e_infra.testing import copy_config

    database = top.pop("database", None)
    return copy_config(
        REPO / "pyproject.toml",
        folder,
        port_range=port_range,
        projects=projects,
        database=database,
        **top,
    )


def bench_env(config_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2E_")}
    env["E2E_CONFIG"] = str(config_path)
    env.update(extra)
    return env


def stop_cluster(config_path: Path) -> str:
    """Stop the embedded cluster the bench config started and remove its folder."""
    sys.path.insert(0, str(REPO))
    from e2e_infra.config import load_config
    from e2e_infra.postgres import LocalCluster
    from e2e_infra.resources.leases import Registry
    from e2e_infra.resources.ports import PortAllocator

    config = load_config(config_path, environ={})
    registry = Registry(config.state_dir, host=config.host_id)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    try:
        cluster.purge()  # its folder, a socket folder in /tmp, its password
    finally:
        shutil.rmtree(cluster.cluster_dir, ignore_errors=True)
    return str(cluster.cluster_dir)


# --- measuring ------------------------------------------------------------------------------------


def load_average() -> float:
    """The 1-minute load average (the machine is shared: every figure is shown next to it)."""
    return os.getloadavg()[0]


def load_averages() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg shows them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def database_server(config: Config) -> Iterator[tuple[ConnInfo, ConnInfo, str]]:
    """(admin, client, description): the configured admin URL, or a fresh embedded cluster,
    purged and removed afterwards."""
    from e2e_infra.postgres import LocalCluster
    from e2e_infra.resources.leases import Registry
    from e2e_infra.resources.ports import PortAllocator

    if config.database.admin_url is not None:
        url = config.database.admin_url
        yield url, url, f"server {url.masked}"
        return
    registry = Registry(config.state_dir, host=config.host_id)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    try:
        admin = cluster.ensure_running()
        yield admin, cluster.tcp_conninfo(), f"embedded cluster {cluster.data_dir}"
    finally:
        try:
            cluster.purge()  # its folder, a socket folder in /tmp, its password
        finally:
            shutil.rmtree(cluster.cluster_dir, ignore_errors=True)


@dataclass
class Timed:
    seconds: float
    load_before: float
    load_after: float
    returncode: int
    output: str
    cpu: float  # user + system seconds of the command and the descendants it reaped

    @property
    def load(self) -> float:
        return max(self.load_before, self.load_after)


_CPUACCT = Path("/sys/fs/cgroup/cpuacct")  # cgroup v1's CPU accounting, where it is mounted


class _CpuGroup:
    """A cgroup (v1 ``cpuacct``) the command starts in: its whole tree's CPU, also what was not
    reaped by the command itself (``invoke e2e.all``'s pool workers are children of
    multiprocessing's fork server, which nobody waits for at exit, so their rusage never reaches
    ``RUSAGE_CHILDREN``). None where it cannot be made (not root, no cpuacct): rusage then."""

    def __init__(self) -> None:
        self.path = _CPUACCT / f"e2e-infra-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.path.mkdir()

    @classmethod
    def make(cls) -> _CpuGroup | None:
        try:
            return cls() if os.geteuid() == 0 and (_CPUACCT / "cpuacct.usage").exists() else None
        except OSError:
            return None

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def seconds(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()  # empty once every process of it ended (a leftover keeps it)


def run_timed(argv: Sequence[str], *, env: dict[str, str], cwd: Path = REPO) -> Timed:
    """Run ``argv`` to its end: wall time, and the CPU of it and all its descendants (a cgroup's
    count when one can be made, else the children's rusage of what was reaped)."""
    before = load_average()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    group = _CpuGroup.make()
    started = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        preexec_fn=group.enter if group is not None else None,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if group is not None:
        time.sleep(0.2)  # the fork server and its workers exit after the command did
        cpu = group.seconds()
        group.remove()
    output = proc.stdout + proc.stderr
    return Timed(seconds, before, load_average(), proc.returncode, output, cpu)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], unit: str = "s", scale: float = 1.0) -> str:
    """``median (min-max)`` of ``values``."""
    if not values:
        return "-"
    fmt = ".0f" if scale >= 1000 else ".2f"
    low, mid, high = (min(values) * scale, median(values) * scale, max(values) * scale)
    return f"{mid:{fmt}}{unit} ({low:{fmt}}-{high:{fmt}})"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pg = shutil.which("postgres") or ""
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}{', ' + pg if pg else ''}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table (also valid Markdown), columns padded."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
