"""Unit tests of e2e_infra.run.health: spec parsing and the polling rhythm (a FakeClock)."""

from __future__ import annotations

import math

import pytest

from e2e_infra.errors import ConfigError, DeadlineExceeded, ServerExitedError
from e2e_infra.run.health import CommandCheck, HttpCheck, TcpCheck, parse_health, wait_healthy
from e2e_infra.testing import FakeClock, FakeHealthCheck

# --- parse_health ---------------------------------------------------------------------------------


def test_empty_spec_is_a_tcp_connect_to_the_servers_port() -> None:
    check = parse_health("", port=16001)
    assert isinstance(check, TcpCheck)
    assert (check.host, check.port) == ("127.0.0.1", 16001)
    assert check.description == "TCP connect 127.0.0.1:16001"


def test_empty_spec_without_a_port_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"no port.*set the server's port"):
        parse_health("  ", port=None, key="servers.worker.health")


def test_http_spec_builds_a_get_of_the_path_and_query() -> None:
    check = parse_health("http://127.0.0.1:16002/health?deep=1", port=None)
    assert isinstance(check, HttpCheck)
    assert (check.host, check.port, check.target) == ("127.0.0.1", 16002, "/health?deep=1")
    assert check.description == "HTTP GET http://127.0.0.1:16002/health?deep=1"


def test_https_spec_defaults_to_port_443() -> None:
    check = parse_health("https://localhost", port=None)
    assert isinstance(check, HttpCheck)
    assert (check.https, check.port, check.target) == (True, 443, "/")


def test_http_description_never_shows_credentials() -> None:
    check = parse_health("http://admin:hunter2@127.0.0.1:16003/health", port=None)
    assert "hunter2" not in check.description
    assert "admin" not in check.description
    assert check.description == "HTTP GET http://127.0.0.1:16003/health"


def test_http_spec_with_a_bad_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid port"):
        parse_health("http://127.0.0.1:99999/", port=None)


def test_tcp_spec_with_host_and_port() -> None:
    check = parse_health("tcp://localhost:16004", port=16999)
    assert isinstance(check, TcpCheck)
    assert (check.host, check.port) == ("localhost", 16004)


def test_tcp_spec_without_port_uses_the_servers_port() -> None:
    check = parse_health("tcp://127.0.0.1", port=16005)
    assert isinstance(check, TcpCheck)
    assert check.port == 16005


@pytest.mark.parametrize("spec", ["tcp://127.0.0.1", "tcp://:16006", "tcp://h:16006/path"])
def test_incomplete_tcp_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"is not tcp://HOST:PORT"):
        parse_health(spec, port=None)


def test_cmd_spec_is_split_without_a_shell() -> None:
    check = parse_health("cmd:./ready --url 'http://x/a b' ; rm -rf /", port=None, env={"A": "1"})
    assert isinstance(check, CommandCheck)
    assert check.argv == ("./ready", "--url", "http://x/a b", ";", "rm", "-rf", "/")
    assert check.env == {"A": "1"}


def test_cmd_description_masks_passwords() -> None:
    check = parse_health("cmd:pg_isready -d postgresql://app:s3cret@localhost/db", port=None)
    assert "s3cret" not in check.description
    assert "***" in check.description


@pytest.mark.parametrize("spec", ["cmd:", "cmd:   "])
def test_empty_cmd_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="has no command"):
        parse_health(spec, port=16007)


def test_cmd_spec_with_broken_quoting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="check the quoting"):
        parse_health("cmd:ready 'unclosed", port=16007)


@pytest.mark.parametrize("spec", ["ftp://127.0.0.1/", "127.0.0.1:16008", "/health"])
def test_unknown_spec_lists_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"not a known health check; use http://") as info:
        parse_health(spec, port=16008, key="servers.api.health")
    assert "servers.api.health" in str(info.value)
    assert info.value.key == "servers.api.health"


def test_unknown_spec_error_masks_a_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_health("postgresql://app:s3cret@localhost/db", port=None)
    assert "s3cret" not in str(info.value)


# --- wait_healthy ---------------------------------------------------------------------------------


def test_first_probe_is_immediate_and_a_healthy_server_costs_no_sleep() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([True], clock=clock)
    assert wait_healthy(check, timeout=5, clock=clock) == 0.0
    assert clock.sleeps == []
    assert len(check.probes) == 1


def test_polls_back_off_from_10ms_doubling() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([False] * 4 + [True], clock=clock)
    took = wait_healthy(check, timeout=5, clock=clock)
    assert clock.sleeps == pytest.approx([0.01, 0.02, 0.04, 0.05])
    assert took == pytest.approx(0.12)


def test_backoff_is_capped_at_50ms_so_a_slow_server_is_seen_soon() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([False] * 12 + [True], clock=clock)
    wait_healthy(check, timeout=60, clock=clock)
    assert max(clock.sleeps) == pytest.approx(0.05)
    assert clock.sleeps[-1] == pytest.approx(0.05)
    gaps = [b - a for a, b in zip(check.probes, check.probes[1:], strict=False)]
    assert all(gap <= 0.05 + 1e-9 for gap in gaps)


def test_a_check_that_is_costly_to_probe_sets_its_own_cap() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([False] * 12 + [True], clock=clock)
    check.poll_cap = 0.25  # type: ignore[attr-defined]  # as CommandCheck does
    wait_healthy(check, timeout=60, clock=clock)
    assert max(clock.sleeps) == pytest.approx(0.25)


def test_a_command_check_is_polled_at_most_every_250ms() -> None:
    assert CommandCheck(["true"]).poll_cap == pytest.approx(0.25)


def test_returned_time_includes_the_probes_own_duration() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([False, True], clock=clock, advance=0.5)
    assert wait_healthy(check, timeout=5, clock=clock) == pytest.approx(1.01)


def test_never_healthy_ends_exactly_at_the_deadline_naming_probe_and_server() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([False], clock=clock, description="HTTP GET http://x:1/")
    with pytest.raises(DeadlineExceeded) as info:
        wait_healthy(check, timeout=2.0, clock=clock, what="server backend")
    assert math.isclose(sum(clock.sleeps), 2.0)
    message = str(info.value)
    assert "timed out after 2s" in message
    assert "server backend (HTTP GET http://x:1/)" in message
    assert "last probe: not ready" in message
    assert info.value.timeout == 2.0


def test_a_process_that_already_exited_is_not_probed() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([True], clock=clock)
    with pytest.raises(ServerExitedError, match="web exited before it became healthy"):
        wait_healthy(check, timeout=5, alive=lambda: False, clock=clock, what="web")
    assert check.probes == []


def test_an_answer_after_the_process_exited_is_a_foreign_server_not_ours() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([True], clock=clock)
    answers = iter([True, False])  # alive before the probe, dead after it
    with pytest.raises(ServerExitedError) as info:
        wait_healthy(check, timeout=5, alive=lambda: next(answers), clock=clock, what="web")
    assert info.value.returncode is None
    assert len(check.probes) == 1


def test_exit_during_polling_ends_the_wait_early() -> None:
    clock = FakeClock()
    check = FakeHealthCheck([False], clock=clock)
    calls = iter([True, True, True, True, False])
    with pytest.raises(ServerExitedError):
        wait_healthy(check, timeout=60, alive=lambda: next(calls), clock=clock)
    assert len(check.probes) == 4
    assert sum(clock.sleeps) == pytest.approx(0.12)
