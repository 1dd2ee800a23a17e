"""Embedded PostgreSQL clusters for tests, with a record that lets the next run clean up.

:func:`running_cluster` starts a cluster for a config and always stops it and removes its folders.
A test run that dies without teardown (SIGKILL, power cut of the CI job) leaves a record in
``/tmp/e2e-infra-test-clusters-<uid>/``; :func:`sweep_leftover_clusters` (the next run) stops those
clusters once the pytest process that recorded them is provably gone (pid + start time), and
removes their folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from e2e_infra.config import Config
from e2e_infra.conninfo import ConnInfo
from e2e_infra.postgres import LocalCluster
from e2e_infra.resources.leases import Owner, Registry
from e2e_infra.resources.ports import PortAllocator
from e2e_infra.run.workspace import make_registry


@dataclass(frozen=True)
class PgCluster:
    """The session cluster (the ``pg_cluster`` fixture) and what tests use of it."""

    admin: ConnInfo  # unix socket, fast: for the tool's own connections
    tcp: ConnInfo  # 127.0.0.1 with the password: what servers and suites get
    config: Config
    registry: Registry
    ports: PortAllocator
    cluster: LocalCluster


def _records_dir() -> Path:
    path = Path("/tmp") / f"e2e-infra-test-clusters-{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _record(cluster: LocalCluster) -> Path:
    me = Owner.current()
    record = _records_dir() / f"{me.pid}-{abs(hash(str(cluster.data_dir)))}.json"
    record.write_text(
        json.dumps(
            {
                "pid": me.pid,
                "start_time": me.start_time,
                "data_dir": str(cluster.data_dir),
                "cluster_dir": str(cluster.cluster_dir),
                "socket_dir": str(cluster.socket_dir),
            }
        ),
        encoding="utf-8",
    )
    return record


def _kill_cluster_processes(data_dir: Path) -> None:
    """SIGKILL every postgres process working in ``data_dir``; wait (bounded) for them to go."""
    procs = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.info["name"] or "").startswith("postgres") and Path(proc.cwd()) == data_dir:
                proc.send_signal(signal.SIGKILL)
                procs.append(proc)
    psutil.wait_procs(procs, timeout=10)


def _remove_cluster_folders(cluster_dir: Path, socket_dir: Path, inside: Path | None) -> None:
    for folder in (cluster_dir, socket_dir):
        # Folders under the test's own tmp dir are pytest's to remove; the others are ours.
        if inside is not None and folder.is_relative_to(inside):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def sweep_leftover_clusters() -> list[str]:
    """Stop the clusters of test runs that died without teardown; return their data folders."""
    swept = []
    for record in sorted(_records_dir().glob("*.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            owner = Owner(pid=data["pid"], start_time=data["start_time"], host="", run_id="")
        except (OSError, ValueError, KeyError):
            record.unlink(missing_ok=True)
            continue
        if owner.is_alive():
            continue  # another test run, still going (other engineers share this machine)
        _kill_cluster_processes(Path(data["data_dir"]))
        _remove_cluster_folders(Path(data["cluster_dir"]), Path(data["socket_dir"]), None)
        record.unlink(missing_ok=True)
        swept.append(data["data_dir"])
    return swept


@contextlib.contextmanager
def running_cluster(config: Config, *, start: bool = True) -> Iterator[LocalCluster]:
    """A LocalCluster for ``config``, started (unless ``start=False``), then stopped and removed."""
    registry = make_registry(config)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    record = _record(cluster)
    try:
        if start:
            cluster.ensure_running()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            _kill_cluster_processes(cluster.data_dir)  # whatever a failed stop left
            _remove_cluster_folders(cluster.cluster_dir, cluster.socket_dir, config.state_dir)
            record.unlink(missing_ok=True)
