"""Unit tests of e2e_infra.run.servers that need no running server: templates, logs, records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.errors import ConfigError, ServerError
from e2e_infra.run.servers import ProcessRecord, ServerProcess, log_tail, render, render_command
from e2e_infra.testing import FakeHealthCheck

VALUES: dict[str, object] = {
    "port": 16010,
    "ports": {"backend": 16011, "frontend": 16012},
    "database_url": "postgresql://app:s3cret@127.0.0.1:5432/e2e_db_x",
    "python": "/usr/bin/python3",
}

# --- render ---------------------------------------------------------------------------------------


def test_render_fills_port_named_ports_and_database_url() -> None:
    text = render(
        "{python} --port {port} --api http://127.0.0.1:{ports.backend} {database_url}", VALUES
    )
    assert text == (
        "/usr/bin/python3 --port 16010 --api http://127.0.0.1:16011 "
        "postgresql://app:s3cret@127.0.0.1:5432/e2e_db_x"
    )


def test_render_accepts_a_simplenamespace_for_named_ports() -> None:
    values = {"ports": SimpleNamespace(backend=16011, frontend=16012)}
    assert render("{ports.frontend}", values) == "16012"


@pytest.mark.parametrize(
    "template",
    ["{python.__class__}", "{ports.__dict__}", "{python[0]}", "{python.upper}", "{ports}"],
)
def test_render_evaluates_no_attribute_or_index(template: str) -> None:
    values = {"python": "/usr/bin/python3", "ports": SimpleNamespace(frontend=16012)}
    with pytest.raises(ConfigError):
        render(template, values)


def test_render_keeps_doubled_braces_literal() -> None:
    assert render('{{"port": {port}}}', VALUES) == '{"port": 16010}'


def test_unknown_placeholder_names_it_the_key_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        render("--url {databse_url}", VALUES, key="servers.backend.command")
    message = str(info.value)
    assert "unknown placeholder {databse_url}" in message
    assert "servers.backend.command" in message
    assert "{database_url}" in message
    assert "{ports.frontend}" in message
    assert info.value.key == "servers.backend.command"


@pytest.mark.parametrize("template", ["{ports.admin}", "{ports.backend.x}"])
def test_unknown_named_port_is_named(template: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown placeholder \{ports\.(admin|backend\.x)\}"):
        render(template, VALUES)


def test_unknown_attribute_of_a_simplenamespace_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown placeholder \{ports\.admin\}.*ports\.web"):
        render("{ports.admin}", {"ports": SimpleNamespace(web=1)})


@pytest.mark.parametrize("template", ["{}", "{0}"])
def test_positional_placeholders_are_rejected(template: str) -> None:
    with pytest.raises(ConfigError, match="unknown placeholder"):
        render(template, VALUES)


def test_a_group_without_a_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"needs a key, like \{ports.<name>\}"):
        render("{ports}", VALUES)


@pytest.mark.parametrize("template", ["{port", "port}", "{port!x}"])
def test_malformed_template_is_a_config_error(template: str) -> None:
    with pytest.raises(ConfigError):
        render(template, VALUES)


def test_malformed_template_error_masks_a_password() -> None:
    with pytest.raises(ConfigError) as info:
        render("postgresql://app:s3cret@h/db?x={", VALUES)
    assert "s3cret" not in str(info.value)


# --- render_command -------------------------------------------------------------------------------


def test_render_command_splits_before_filling() -> None:
    values = {"url": "postgresql://u:p w@h/db?opt='a b'", "port": 16013}
    argv = render_command("serve --db {url} --port={port} 'two words'", values)
    assert argv == [
        "serve",
        "--db",
        "postgresql://u:p w@h/db?opt='a b'",
        "--port=16013",
        "two words",
    ]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_value_stays_exactly_one_argument(value: str) -> None:
    assert render_command("prog --value={v} end", {"v": value}) == [
        "prog",
        f"--value={value}",
        "end",
    ]


def test_a_braced_value_is_not_rendered_twice() -> None:
    assert render_command("echo {v}", {"v": "{port}"}) == ["echo", "{port}"]


def test_empty_command_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"servers\.api\.command is empty"):
        render_command("   ", VALUES, key="servers.api.command")


def test_command_with_broken_quoting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="check the quoting"):
        render_command("serve 'unclosed", VALUES)


# --- log_tail -------------------------------------------------------------------------------------


def test_log_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    log.write_text("".join(f"line {n}\n" for n in range(1, 31)))
    assert log_tail(log).splitlines() == [f"line {n}" for n in range(11, 31)]
    assert log_tail(log, lines=3) == "line 28\nline 29\nline 30"


def test_log_tail_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    assert log_tail(tmp_path / "missing.log") == ""


def test_log_tail_masks_literal_secrets_and_url_passwords(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    log.write_text(
        "DATABASE_URL=postgresql://app:s3cret@127.0.0.1:5432/db\n"
        "connecting with password=hunter2 host=x\n"
        "API_TOKEN=tok-4242\n"
    )
    tail = log_tail(log, secrets=["tok-4242"])
    for secret in ("s3cret", "hunter2", "tok-4242"):
        assert secret not in tail
    assert tail.count("***") == 3


def test_log_tail_since_skips_an_earlier_start(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    log.write_text("old run\n")
    offset = log.stat().st_size
    with log.open("a") as handle:
        handle.write("new run\n")
    assert log_tail(log, since=offset) == "new run"


def test_log_tail_of_a_huge_log_never_shows_a_cut_line(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    # 4,000 lines of 33 bytes: the 64 KiB window starts in the middle of a line.
    log.write_text("".join(f"{n:06d} password=abcdefghijklmnop\n" for n in range(4000)))
    lines = log_tail(log, lines=10_000).splitlines()
    assert lines[-1].startswith("003999 ")
    assert all(line.endswith("password=***") and len(line.split()[0]) == 6 for line in lines)
    assert "abcdefghijklmnop" not in "".join(lines)


def test_log_tail_survives_undecodable_bytes(tmp_path: Path) -> None:
    log = tmp_path / "bin.log"
    log.write_bytes(b"ok\n\xff\xfe broken\n")
    assert log_tail(log).splitlines() == ["ok", "\ufffd\ufffd broken"]


# --- ProcessRecord --------------------------------------------------------------------------------


def test_process_record_round_trips_through_json() -> None:
    record = ProcessRecord(pid=4242, pgid=4242, start_time=1_800_000_000.25)
    assert ProcessRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "data",
    [
        {"pid": "1", "pgid": 2, "start_time": 1.0},
        {"pid": 1, "pgid": 2, "start_time": 1.0},  # pid 1 is init, never a server of ours
        {"pid": 10, "pgid": True, "start_time": 1.0},
        {"pid": 10, "pgid": 10, "start_time": None},
    ],
)
def test_malformed_process_record_is_rejected(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="bad process record"):
        ProcessRecord.from_json(data)


# --- ServerProcess before anything runs -----------------------------------------------------------


def _server(tmp_path: Path, argv: list[str], cwd: Path | None = None) -> ServerProcess:
    return ServerProcess(
        "api",
        argv,
        cwd=cwd or tmp_path,
        env={},
        log_path=tmp_path / "results" / "api.log",
        health=FakeHealthCheck([True]),
    )


def test_a_server_that_was_never_started_stops_as_a_no_op(tmp_path: Path) -> None:
    server = _server(tmp_path, ["serve"])
    assert server.stop() is None
    assert server.stop() is None
    assert server.record is None
    assert not server.running
    assert not server.port_conflict()


def test_waiting_for_a_server_that_was_never_started_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="api was not started"):
        _server(tmp_path, ["serve"]).wait_healthy()


def test_an_empty_command_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty command"):
        _server(tmp_path, [])


def test_a_missing_working_directory_is_named_with_the_fix(tmp_path: Path) -> None:
    server = _server(tmp_path, ["serve"], cwd=tmp_path / "nope")
    with pytest.raises(ServerError, match=r"working directory .*nope does not exist; fix servers"):
        server.start()
    assert server.record is None


def test_a_missing_executable_is_named_with_the_fix(tmp_path: Path) -> None:
    server = _server(tmp_path, ["./no-such-server", "--db", "postgresql://a:s3cret@h/db"])
    with pytest.raises(ServerError, match=r"'./no-such-server'.*fix servers.api.command") as info:
        server.start()
    assert server.record is None
    log = (tmp_path / "results" / "api.log").read_text()
    assert "s3cret" not in log  # the header line names the command, masked
    assert "--db postgresql://a:***@h/db" in log
    assert "s3cret" not in str(info.value)
