"""Bad input, property-based: names, seed profiles, config values, registry contents, URLs.

Every hostile value (quotes, SQL, unicode, control characters, 64+ characters, wrong types) is
either rejected with the tool's own error, whose message is one clear line, before any SQL or
process runs, or handled. Never another exception, never a traceback from the CLI (a handful of
real ``invoke`` calls at the end; the admin URL there points at a port nobody listens on, so an
error about the input rather than about the connection proves the input was checked first).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.cli import Cli

import e2e_infra
from e2e_infra.config import NAME_PATTERN, RESERVED_PROJECT_NAMES
from e2e_infra.resources.leases import Registry

# Text that looks like an attack or an accident: SQL, quotes, shell, unicode, control characters.
NASTY = st.sampled_from(
    [
        "",
        " ",
        "x'; DROP DATABASE postgres; --",
        'a"b',
        "a b",
        "a\nb",
        "a\x00b",
        "a\x1b[31mb",
        "$(rm -rf /)",
        "`id`",
        "../../etc/passwd",
        "ÄÖÜ",
        "проект",
        "项目",
        "\u202eevil",
        "a" * 41,
        "a" * 64,
        "a" * 200,
        "Auth",
        "1abc",
        "_abc",
        "abc-def",
        "abc.def",
        "{python}",
        "%s",
        "\\",
    ]
)
TEXT = st.one_of(NASTY, st.text(max_size=80), st.text(alphabet="abc_019'\";- \n\x00", max_size=70))
WRONG_TYPES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.binary(max_size=10),
)


def one_clear_line(exc: e2e_infra.E2EInfraError) -> None:
    line = exc.one_line()
    assert line and "\n" not in line and "\x00" not in line
    assert "Traceback" not in str(exc)


# --- names ---------------------------------------------------------------------------------------


@given(st.one_of(TEXT, WRONG_TYPES))
def test_a_name_is_valid_exactly_when_it_matches_the_pattern(value: Any) -> None:
    valid = isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None
    for kind in ("project", "seed profile", "port"):
        if valid:
            assert e2e_infra.validate_name(value, kind) == value
            assert len(value.encode()) <= 40
            continue
        with pytest.raises(e2e_infra.InvalidNameError) as caught:
            e2e_infra.validate_name(value, kind)
        one_clear_line(caught.value)
        assert caught.value.exit_code == 2 and caught.value.kind == kind
        assert len(str(caught.value)) < 400  # a 200-character value is cut, not echoed whole


# --- config files --------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # lone surrogates make invalid TOML: a ConfigError too
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


TOML_VALUES = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(),
        TEXT,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=5,
)

KEYS = [
    ("", "port_range"),
    ("", "port_names"),
    ("", "lock_timeout"),
    ("", "lease_ttl"),
    ("", "keep_on_failure"),
    ("", "state_dir"),
    ("database", "name_base"),
    ("database", "default_seed"),
    ("database", "max_databases"),
    ("database", "clone_strategy"),
    ("database", "admin_url"),
    ("database", "seed_commands"),
    ("postgres", "startup_timeout"),
    ("servers.web", "startup_timeout"),
    ("servers.web", "depends_on"),
    ("servers.web", "env"),
    ("servers.web", "port"),
    ("projects.demo", "seed"),
    ("projects.demo", "timeout"),
    ("projects.demo", "servers"),
    ("projects.demo", "env"),
    ("projects.demo", "command"),
]


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def write_config(folder: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for table, values in tables.items():
        lines.append(f"[tool.e2e_infra{'.' + table if table else ''}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path = folder / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    return path


def base_tables() -> dict[str, dict[str, Any]]:
    return {
        "": {"port_range": "18900-18910"},
        "servers.web": {"command": "{python} -m http.server {port}", "port": "backend"},
        "projects.demo": {"command": "{python} -c pass"},
    }


def load(path: Path, environ: dict[str, str] | None = None) -> e2e_infra.Config | None:
    """The config, or None after a ConfigError with one clear line; anything else fails."""
    try:
        return e2e_infra.load_config(path, environ=environ or {})
    except e2e_infra.ConfigError as exc:
        one_clear_line(exc)
        assert exc.exit_code == 2
        return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(KEYS), st.one_of(TOML_VALUES, WRONG_TYPES.filter(lambda v: v is not None)))
def test_any_config_value_loads_or_is_a_config_error(
    folder: Path, key: tuple[str, str], value: Any
) -> None:
    tables = base_tables()
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    tables.setdefault(key[0], {})[key[1]] = value
    config = load(write_config(folder, tables))
    if config is not None:
        assert all(NAME_PATTERN.fullmatch(name) for name in config.projects)
        assert all(NAME_PATTERN.fullmatch(p.seed) for p in config.projects.values())
        assert 1 <= config.port_range.low <= config.port_range.high <= 65535


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT, TEXT)
def test_any_project_or_seed_name_in_the_config_loads_only_if_valid(
    folder: Path, project: str, seed: str
) -> None:
    tables = base_tables()
    del tables["projects.demo"]
    tables[f"projects.{json.dumps(project)}"] = {"command": "{python} -c pass", "seed": seed}
    config = load(write_config(folder, tables))
    valid = (
        NAME_PATTERN.fullmatch(project)
        and project not in RESERVED_PROJECT_NAMES  # "postgres": the cluster's own port lease
        and NAME_PATTERN.fullmatch(seed)
    )
    assert (config is not None) == bool(valid)


ENV_KEYS = [
    "E2E_PORT_RANGE",
    "E2E_LOCK_TIMEOUT",
    "E2E_LEASE_TTL",
    "E2E_KEEP_ON_FAILURE",
    "E2E_PORT_NAMES",
    "E2E_DB_NAME_BASE",
    "E2E_DEFAULT_SEED",
    "E2E_MAX_DATABASES",
    "E2E_CLONE_STRATEGY",
    "E2E_ADMIN_DATABASE_URL",
    "E2E_RUN_ID",
    "E2E_OWNER_PID",
    "E2E_PG_STARTUP_TIMEOUT",
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(ENV_KEYS), TEXT)
def test_any_environment_value_loads_or_is_a_config_error(
    folder: Path, key: str, value: str
) -> None:
    path = write_config(folder, base_tables())
    config = load(path, {key: value})
    if config is not None and config.database.admin_url is not None:
        # Whatever the URL held, its password never shows.
        url = config.database.admin_url
        if url.password:
            assert url.password not in repr(url) and url.password not in str(url)


# --- the registry --------------------------------------------------------------------------------

# Wrong types that JSON can hold (bytes cannot).
JSON_WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
LEASE_FIELDS = st.fixed_dictionaries(
    {
        "id": st.one_of(TEXT, JSON_WRONG),
        "kind": st.one_of(st.sampled_from(["port", "server", "database"]), TEXT, JSON_WRONG),
        "resource": st.one_of(st.sampled_from(["18900", "e2e_db_x"]), TEXT, JSON_WRONG),
        "project": st.one_of(TEXT, JSON_WRONG),
        "created_at": st.one_of(st.floats(), JSON_WRONG),
        "owner": st.one_of(
            st.fixed_dictionaries(
                {
                    "pid": st.one_of(st.integers(), JSON_WRONG),
                    "start_time": st.one_of(st.floats(), JSON_WRONG),
                    "host": st.one_of(TEXT, JSON_WRONG),
                    "run_id": st.one_of(TEXT, JSON_WRONG),
                }
            ),
            JSON,
        ),
        "data": st.one_of(st.dictionaries(st.text(max_size=5), JSON, max_size=3), JSON),
    }
)
DOCUMENTS = st.one_of(
    JSON,
    st.fixed_dictionaries({"version": st.one_of(st.just(1), JSON), "leases": JSON}),
    st.fixed_dictionaries({"version": st.just(1), "leases": st.lists(LEASE_FIELDS, max_size=4)}),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(DOCUMENTS.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)))
def test_any_registry_file_is_read_or_set_aside_never_a_crash(folder: Path, raw: bytes) -> None:
    state = folder / "state"
    registry = Registry(state, host="here", lock_timeout=5)
    registry.snapshot()
    registry.path.write_bytes(raw)
    leases = registry.snapshot()
    for lease in leases:
        assert isinstance(lease.owner.pid, int) and lease.owner.pid > 0
        assert isinstance(lease.resource, str) and lease.resource
    # And the registry stays usable: a transaction can add and write.
    with registry.transaction() as txn:
        txn.add(
            e2e_infra.Lease(
                kind="port", resource="18999", project="p", owner=e2e_infra.Owner.current()
            )
        )
    assert any(lease.resource == "18999" for lease in registry.snapshot())
    for leftover in state.iterdir():
        leftover.unlink()


# --- connection URLs -----------------------------------------------------------------------------

SECRET = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789!$&()*+,;=~", min_size=6, max_size=30)
PLAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


@given(PLAIN, SECRET, PLAIN, st.integers(1, 65535), PLAIN)
def test_a_url_password_never_shows_in_repr_str_masked_or_mask_secrets(
    user: str, password: str, host: str, port: int, dbname: str
) -> None:
    url = f"postgresql://{user}:{quote(password)}@{host}:{port}/{dbname}"
    info = e2e_infra.ConnInfo.parse(url)
    assert info.password == password
    for shown in (repr(info), str(info), info.masked, e2e_infra.mask_secrets(url)):
        assert password not in shown and quote(password) not in shown
    assert e2e_infra.ConnInfo.parse(info.url) == info


@given(SECRET, TEXT)
def test_a_malformed_url_error_never_shows_its_password(password: str, junk: str) -> None:
    assume(password not in junk)  # the junk (a port, say) may be echoed; the password never
    for text in (
        f"postgresql://u:{password}@h:notaport/db",
        f"postgresql://u:{password}@h:{junk}/db",
        f"host=h password={password} port={junk}",
        f"password='{password}' {junk}",
    ):
        try:
            info = e2e_infra.ConnInfo.parse(text)
        except e2e_infra.ConfigError as exc:
            one_clear_line(exc)
            assert password not in str(exc)
        else:
            assert password not in repr(info) and password not in str(info)


def quote(text: str) -> str:
    from urllib.parse import quote as _quote

    return _quote(text, safe="")


# --- the CLI: a few real calls, never a traceback ------------------------------------------------


@pytest.fixture(scope="module")
def cli_config(folder: Path) -> Path:
    cli = folder / "cli"
    cli.mkdir()
    tables = base_tables()
    tables[""]["state_dir"] = str(cli / "state")
    tables[""]["results_dir"] = str(cli / "results")
    return write_config(cli, tables)


CLI_CASES = [
    (("db.allocate", "--project", "x'; DROP DATABASE postgres; --"), "invalid project name"),
    (("db.allocate", "--project", "a" * 64), "invalid project name"),
    (("db.allocate", "--project", "проект"), "invalid project name"),
    (("db.seed", "--project", "demo", "--seed", "../../etc"), "invalid seed profile name"),
    (("db.release", "--project", "Robert'); --"), "invalid project name"),
    (("ports.allocate", "--project", "a b", "--names", "backend"), "invalid project name"),
    (("ports.allocate", "--project", "ok", "--names", "back;end"), "invalid port name"),
    (("e2e.run", "--project", "nope\x1b[2J"), "invalid project name"),
    # Numbers and durations: invoke's own int()/float() would end in a traceback.
    (("e2e.run", "--project", "demo", "--retries", "x"), "--retries must be a whole number"),
    (("e2e.all", "--retries", "-1"), "--retries must be 0 or more"),
    (("e2e.list", "--runs", "ten"), "--runs must be a whole number"),
    (("e2e.flaky", "--runs", "0"), "--runs must be 1 or more"),
    (("e2e.matrix", "--shards", "2.5"), "--shards must be a whole number"),
    (("e2e.up", "demo", "--hours", "nan"), "--hours must be a duration > 0"),
    (("db.allocate", "--project", "demo", "--ttl", "10 minutes"), "--ttl must be a duration > 0"),
    (("db.allocate", "--project", "demo", "--ttl", "-5m"), "such as 90s, 10m or 2h"),
    (("ports.allocate", "--project", "ok", "--owner-pid", "me"), "--owner-pid must be a whole"),
]


@pytest.mark.parametrize(("args", "expected"), CLI_CASES)
def test_the_cli_rejects_bad_input_with_one_line_and_no_traceback(
    cli_config: Path, args: tuple[str, ...], expected: str, cli: Cli
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "E2E_CONFIG": str(cli_config),
        # Nothing listens there: reaching the server would be a different error.
        "E2E_ADMIN_DATABASE_URL": "postgresql://postgres:CliSecret99@127.0.0.1:1/postgres",
    }
    proc = cli.invoke(*args, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "cannot connect" not in proc.stderr and "CliSecret99" not in proc.stderr


def test_every_task_option_is_text_or_a_flag() -> None:
    """invoke converts an int or float option itself while it parses, before any task code runs,
    so a bad value would end in its ValueError traceback: tasks read numbers from text instead
    (``int_arg``, ``seconds_arg``), and a new numeric option fails here."""
    from invoke.collection import Collection

    from e2e_infra.cli import namespace

    def tasks(collection: Collection, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for name, task in collection.tasks.items():
            yield prefix + name, task
        for name, child in collection.collections.items():
            yield from tasks(child, f"{prefix}{name}.")

    found = list(tasks(namespace))
    assert len(found) > 20
    offenders = [
        f"{name} --{argument.name}: {argument.kind.__name__}"
        for name, task in found
        for argument in task.get_arguments()
        if argument.kind not in (str, bool)
    ]
    assert offenders == []


# Without an admin URL the db tasks would start the embedded cluster: bad input must be rejected
# before that (no cluster folder, no postmaster).
NO_CLUSTER_CASES = [
    (("db.url", "--project", ""), "pass --project NAME"),
    (("db.url", "--project", "a b"), "invalid project name"),
    (("db.migrate", "--project", ""), "pass --project NAME"),
    (("db.release", "--project", "Robert'); --"), "invalid project name"),
    (("db.seed", "--project", "demo", "--seed", "../../etc"), "invalid seed profile name"),
    (("db.seed", "--project", "demo", "--seed", "no_such_profile"), "does not exist"),
    (("db.allocate", "--project", "demo", "--seed", "no_such_profile"), "does not exist"),
    (("db.template", "--seed", "Bad Seed"), "invalid seed profile name"),
    (("db.allocate", "--project", "demo", "--ttl", "1 hour"), "--ttl must be a duration > 0"),
]


@pytest.mark.parametrize(("args", "expected"), NO_CLUSTER_CASES)
def test_bad_input_to_db_tasks_is_rejected_before_any_cluster_starts(
    tmp_path: Path, args: tuple[str, ...], expected: str, cli: Cli
) -> None:
    from e2e_infra.postgres import LocalCluster
    from e2e_infra.resources.ports import PortAllocator

    tables = base_tables()
    tables[""].update(
        state_dir=str(tmp_path / "state"),
        results_dir=str(tmp_path / "results"),
        port_range="15690-15699",  # ours, should anything bind by mistake
    )
    config_file = write_config(tmp_path, tables)
    env = {"PATH": "/usr/bin:/bin", "E2E_CONFIG": str(config_file)}
    proc = cli.invoke(*args, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    config = e2e_infra.load_config(config_file, environ={})
    registry = Registry(config.state_dir, host=config.host_id)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    assert not cluster.cluster_dir.exists() and not (config.state_dir / "pg").exists()
    assert not (cluster.data_dir / "postmaster.pid").exists()


@pytest.mark.parametrize(
    ("value", "unit", "seconds"),
    [
        ("600", "s", 600.0),
        ("90s", "s", 90.0),
        ("10m", "s", 600.0),
        ("2h", "s", 7200.0),
        ("1d", "s", 86400.0),
        (" 1.5H ", "s", 5400.0),
        ("12", "h", 43200.0),
        ("30m", "h", 1800.0),
    ],
)
def test_a_duration_option_reads_a_bare_number_in_its_unit_or_its_own(
    value: str, unit: str, seconds: float
) -> None:
    from e2e_infra.cli._output import seconds_arg

    assert seconds_arg("ttl", value, unit=unit) == seconds


@given(st.text(max_size=12))
def test_a_number_option_is_a_number_or_a_usage_error(text: str) -> None:
    from e2e_infra.cli._output import int_arg, seconds_arg

    for parse in (lambda v: int_arg("runs", v, minimum=1), lambda v: seconds_arg("ttl", v)):
        try:
            value = parse(text)
        except e2e_infra.UsageError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("--")
        else:
            assert math.isfinite(value) and value > 0
