"""Configuration: pyproject, .env and environment into frozen dataclasses; errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e_infra.config import (
    NAME_PATTERN,
    Config,
    PortRange,
    find_config_file,
    load_config,
    validate_name,
)
from e2e_infra.errors import ConfigError, InvalidNameError

SERVERS = """
[tool.e2e_infra.servers.backend]
command = "python app.py"
port = "backend"

[tool.e2e_infra.projects.auth_tests]
command = "pytest e2e/auth"
"""


def write(tmp_path: Path, body: str = "", env: str | None = None) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.e2e_infra]\n" + body)
    if env is not None:
        (tmp_path / ".env").write_text(env)
    return path


def test_defaults_fill_everything_not_configured(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), environ={})

    assert config.port_range == PortRange(3100, 5500)
    assert config.port_names == ("backend", "frontend")
    assert config.lease_ttl is None
    assert config.allow_ephemeral_overlap is False
    assert config.state_dir == tmp_path / ".e2e-infra"
    assert config.results_dir == tmp_path / "e2e-results"
    assert config.run_id is None and config.owner_pid is None


def test_the_build_timeout_defaults_to_600s_and_comes_from_the_file_or_the_environment(
    tmp_path: Path,
) -> None:
    assert load_config(write(tmp_path), environ={}).database.build_timeout == 600.0
    path = write(tmp_path, "[tool.e2e_infra.database]\nbuild_timeout = 90\n")
    assert load_config(path, environ={}).database.build_timeout == 90.0
    from_env = load_config(path, environ={"E2E_BUILD_TIMEOUT": "1.5"})
    assert from_env.database.build_timeout == 1.5
    with pytest.raises(ConfigError, match="E2E_BUILD_TIMEOUT"):
        load_config(path, environ={"E2E_BUILD_TIMEOUT": "0"})


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port_range = PortRange(1, 2)  # type: ignore[misc]


def test_the_environment_wins_over_dotenv_which_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port_range = "3100-3200"\n', env="E2E_PORT_RANGE=4000-4100\n")

    assert load_config(path, environ={}).port_range == PortRange(4000, 4100)
    from_env = load_config(path, environ={"E2E_PORT_RANGE": "5000-5100"})
    assert from_env.port_range == PortRange(5000, 5100)


def test_port_names_and_ttl_from_the_environment(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path), environ={"E2E_PORT_NAMES": "api, web", "E2E_LEASE_TTL": "3600"}
    )
    assert config.port_names == ("api", "web")
    assert config.lease_ttl == 3600.0


def test_run_id_and_owner_pid_come_from_the_environment(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path), environ={"E2E_RUN_ID": "ci-42.1", "E2E_OWNER_PID": "1234"}
    )
    assert (config.run_id, config.owner_pid) == ("ci-42.1", 1234)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("E2E_OWNER_PID", "abc"), ("E2E_OWNER_PID", "0"), ("E2E_RUN_ID", "a/../b")],
)
def test_bad_run_id_or_owner_pid_is_a_config_error_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path), environ={variable: value})
    assert caught.value.key == variable
    assert variable in str(caught.value) and "the environment" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("colour = 'blue'\n", "colour"),
        ('port_range = "5500-3100"\n', "port_range"),
        ('port_range = "lots"\n', "port_range"),
        ('port_names = ["backend", "backend"]\n', "port_names"),
        ('port_names = ["Back-End"]\n', "port_names"),
        ("port_names = []\n", "port_names"),
        ("lease_ttl = -1\n", "lease_ttl"),
        ("[tool.e2e_infra.database]\nclone_strategy = 'fast'\n", "database.clone_strategy"),
        ("[tool.e2e_infra.database]\nname_base = 'E2E'\n", "database.name_base"),
        (
            "[tool.e2e_infra.servers.web]\ncommand = 'x --fd {fd}'\nlisten_socket = true\n",
            "servers.web.listen_socket",
        ),
        ("[tool.e2e_infra.projects.postgres]\ncommand = 'x'\n", "projects.postgres"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_file(tmp_path: Path, body: str, key: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == key
    assert caught.value.path == str(path)
    assert key in str(caught.value) and str(path) in str(caught.value)


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path), environ={"E2E_PORT_RANGE": "nope"})
    assert caught.value.key == "E2E_PORT_RANGE"
    assert "the environment" in str(caught.value)


def test_an_unknown_e2e_setting_in_dotenv_is_refused_but_app_variables_are_not(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, env="DATABASE_URL=x\nE2E_PORT_RANGES=1-2\n")
    with pytest.raises(ConfigError, match="E2E_PORT_RANGES"):
        load_config(path, environ={})
    (tmp_path / ".env").write_text("DATABASE_URL=x\n")
    load_config(path, environ={})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.e2e_infra\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_servers_and_projects_are_read_with_their_references_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SERVERS), environ={})
    assert config.servers["backend"].port == "backend"
    assert config.project("auth_tests").servers == ("backend",)
    assert config.project("auth_tests").cwd == tmp_path


def test_an_unknown_project_lists_the_configured_ones(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SERVERS), environ={})
    with pytest.raises(ConfigError, match="configured projects are auth_tests"):
        config.project("billing")
    with pytest.raises(InvalidNameError):
        config.project("Billing!")


def test_a_server_port_must_be_a_configured_port_name(tmp_path: Path) -> None:
    body = SERVERS.replace('port = "backend"', 'port = "admin"')
    with pytest.raises(ConfigError, match="'admin' is not one of port_names"):
        load_config(write(tmp_path, body), environ={})


def test_servers_depending_on_each_other_in_a_cycle_are_refused(tmp_path: Path) -> None:
    body = """
[tool.e2e_infra.servers.a]
command = "a"
depends_on = ["b"]
[tool.e2e_infra.servers.b]
command = "b"
depends_on = ["a"]
"""
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, body), environ={})


def test_the_admin_password_never_shows_in_the_config_repr(tmp_path: Path) -> None:
    body = '[tool.e2e_infra.database]\nadmin_url = "postgresql://me:s3cr3t-pw@db:5433/postgres"\n'
    config = load_config(write(tmp_path, body), environ={})
    assert config.database.admin_url is not None
    assert config.database.admin_url.password == "s3cr3t-pw"
    assert "s3cr3t-pw" not in repr(config)


def test_find_config_file_walks_up_to_the_section(tmp_path: Path) -> None:
    path = write(tmp_path)
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (tmp_path / "a" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert find_config_file(nested, environ={}) == path


def test_find_config_file_explains_what_to_do_when_nothing_is_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set E2E_CONFIG"):
        find_config_file(tmp_path, environ={})
    with pytest.raises(ConfigError, match="not a file"):
        find_config_file(tmp_path, environ={"E2E_CONFIG": str(tmp_path / "missing.toml")})


def test_port_range_parsing_and_membership() -> None:
    port_range = PortRange.parse(" 3100 : 3102 ")
    assert (port_range.low, port_range.high, len(port_range)) == (3100, 3102, 3)
    assert 3100 in port_range and 3102 in port_range
    assert 3103 not in port_range and "3100" not in port_range
    assert str(port_range) == "3100-3102"
    for text in ("0-10", "10-70000", "3-1", "3100", "a-b"):
        with pytest.raises(ConfigError):
            PortRange.parse(text)


def test_config_project_dir_is_under_results(tmp_path: Path) -> None:
    config = Config(root=tmp_path, source=None, state_dir=tmp_path, results_dir=tmp_path / "r")
    assert config.layout.project_dir("web") == tmp_path / "r" / "web"


@pytest.mark.parametrize("name", ["a", "auth_tests", "x9", "a" * 40])
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "9a", "_a", "a-b", "a b", "a" * 41, "é", "a\n", None, 7])
def test_malformed_names_are_refused_with_the_rule_and_an_example(name: object) -> None:
    with pytest.raises(InvalidNameError) as caught:
        validate_name(name, "port")
    message = str(caught.value)
    assert message.startswith("invalid port name")
    assert "lowercase letter first" in message and "auth_tests" in message
    assert "\n" not in caught.value.one_line()
    assert caught.value.exit_code == 2


@given(st.text(max_size=50))
def test_validate_name_accepts_exactly_the_name_pattern(text: str) -> None:
    matches = NAME_PATTERN.fullmatch(text) is not None
    try:
        validate_name(text)
    except InvalidNameError:
        assert not matches
    else:
        assert matches


@given(st.from_regex(r"[a-z][a-z0-9_]{0,39}", fullmatch=True))
def test_every_name_of_the_pattern_is_valid(name: str) -> None:
    assert validate_name(name) == name


# --- edges: digits, placeholders, encodings, a file without the section ---------------------------


@pytest.mark.parametrize(
    ("body", "environ"),
    [
        ('port_range = "\uff11\uff12\uff13-\uff14\uff15\uff16"\n', {}),
        ("", {"E2E_PORT_RANGE": "3100-\uff15\uff15\uff10\uff10"}),
        ("", {"E2E_LOCK_TIMEOUT": "\uff13"}),
        ("", {"E2E_LEASE_TTL": "1.\uff15"}),
    ],
)
def test_only_ascii_digits_make_numbers_and_ranges(
    tmp_path: Path, body: str, environ: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), environ=environ)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "command",
    [
        "{python.__class__}",
        "{ports.__dict__}",
        "{python[0]} x",
        "run {nope}",
        "{python!r}",
        "{python:>99999999}",
        "{port}",  # a project has no port of its own
        "{ports.nope}",
        "{fd}",
    ],
)
def test_a_bad_placeholder_in_a_project_command_is_a_config_error_at_load(
    tmp_path: Path, command: str
) -> None:
    body = f"[tool.e2e_infra.projects.p]\ncommand = {command!r}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), environ={})
    assert "projects.p.command" in str(info.value) and str(tmp_path) in str(info.value)


def test_server_placeholders_are_checked_in_command_env_and_health(tmp_path: Path) -> None:
    good = (
        "[tool.e2e_infra.servers.web]\n"
        'command = "{python} -m http.server {port} --root {root}/{project}"\n'
        'port = "backend"\n'
        'health = "http://127.0.0.1:{ports.backend}/"\n'
        'env = { URL = "{database_url}", OUT = "{results_dir}/{run_id}", LIT = "{{x}}" }\n'
    )
    assert load_config(write(tmp_path, good), environ={}).servers["web"].port == "backend"
    for bad, key in (
        (good.replace("{root}", "{root.__class__}"), "servers.web.command"),
        (good.replace("{ports.backend}", "{fd}"), "servers.web.health"),  # no listen_socket
        (good.replace("{run_id}", "{secret}"), "servers.web.env.OUT"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, bad), environ={})
        assert info.value.key == key


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_bytes(b"[tool.e2e_infra]\nport_names = ['caf\xe9']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value) and "not UTF-8" in str(info.value)
    assert find_config_file(tmp_path, environ={}) == path  # found, then judged
    (tmp_path / ".env").write_bytes(b"E2E_PORT_RANGE=\xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path), environ={})
    assert str(tmp_path / ".env") in str(info.value) and "save it as UTF-8" in str(info.value)


def test_a_config_file_without_the_section_is_one_line_naming_it(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text("[tool.black]\nline-length = 100\n")
    with pytest.raises(ConfigError) as info:
        load_config(environ={"E2E_CONFIG": str(other)})
    assert f"{other} has no [tool.e2e_infra] section" in str(info.value)


def test_a_command_with_the_database_url_is_loaded_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = """
[tool.e2e_infra.servers.backend]
command = "python app.py --db {database_url}"
env = { DB = "{database_url}" }

[tool.e2e_infra.servers.quiet]
command = "python app.py --literal {{database_url}}"

[tool.e2e_infra.projects.auth_tests]
command = "pytest e2e/auth --dsn={database_url}"
"""
    with caplog.at_level("WARNING", logger="e2e_infra"):
        load_config(write(tmp_path, body), environ={})
    warned = [r.getMessage() for r in caplog.records if "{database_url}" in r.getMessage()]
    assert len(warned) == 2, warned
    assert warned[0].startswith("servers.backend.command in ") and "DATABASE_URL" in warned[0]
    assert warned[1].startswith("projects.auth_tests.command in ")
