"""ConnInfo: parses libpq URLs and key/value strings; the password shows only where it must."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from e2e_infra.conninfo import MASK, ConnInfo, mask_secrets
from e2e_infra.errors import ConfigError

URL = "postgresql://app:s3cr3t%40pw@db.internal:6543/shop?sslmode=disable"


def test_a_url_is_parsed_into_its_parts() -> None:
    info = ConnInfo.parse(URL)
    assert (info.host, info.port, info.user, info.dbname) == ("db.internal", 6543, "app", "shop")
    assert info.password == "s3cr3t@pw"
    assert info.params == {"sslmode": "disable"}


def test_a_key_value_string_is_parsed_too() -> None:
    info = ConnInfo.parse("host=/run/pg port=5433 user=me password='p w' dbname=x")
    assert (info.host, info.port, info.user, info.dbname) == ("/run/pg", 5433, "me", "x")
    assert info.password == "p w"


def test_missing_parts_get_the_local_defaults() -> None:
    info = ConnInfo.parse("postgresql://")
    assert (info.host, info.port, info.user, info.dbname) == (
        "127.0.0.1",
        5432,
        "postgres",
        "postgres",
    )
    assert info.password is None and info.masked == "postgresql://postgres@127.0.0.1:5432/postgres"


def test_str_repr_and_masked_never_show_the_password() -> None:
    info = ConnInfo.parse(URL)
    for shown in (str(info), repr(info), info.masked, f"{info}", f"{info!r}"):
        assert "s3cr3t" not in shown
    assert info.masked == f"postgresql://app:{MASK}@db.internal:6543/shop?sslmode=disable"


def test_url_and_conninfo_carry_the_password_for_drivers() -> None:
    info = ConnInfo.parse(URL)
    assert ConnInfo.parse(info.url) == info
    assert "password=s3cr3t@pw" in info.conninfo()
    assert "connect_timeout=3" in info.conninfo(connect_timeout=3)


def test_changing_the_database_keeps_the_login() -> None:
    other = ConnInfo.parse(URL).with_dbname("e2e_db_web").with_params(application_name="e2e")
    assert (other.dbname, other.password) == ("e2e_db_web", "s3cr3t@pw")
    assert other.params == {"sslmode": "disable", "application_name": "e2e"}


def test_a_unix_socket_host_goes_into_the_query_and_survives_the_round_trip() -> None:
    info = ConnInfo(host="/tmp/pg sock", port=5499, user="postgres", dbname="t", password="pw")
    assert info.url.startswith("postgresql://postgres:pw@:5499/t?host=")
    assert ConnInfo.parse(info.url) == info
    assert "pw" not in info.masked


def test_an_invalid_url_is_a_config_error_that_hides_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        ConnInfo.parse("postgresql://app:hunter2@db:5432/x?bogus_option=1", source="E2E_URL")
    message = str(caught.value)
    assert "hunter2" not in message
    assert "E2E_URL" in message and "postgresql://USER:PASSWORD@HOST:PORT/DBNAME" in message


@pytest.mark.parametrize("port", ["0", "70000"])
def test_an_invalid_port_is_a_config_error(port: str) -> None:
    with pytest.raises(ConfigError, match="invalid port") as caught:
        ConnInfo.parse(f"postgresql://app:hunter2@db:{port}/x")
    assert "hunter2" not in str(caught.value)


def test_mask_secrets_masks_urls_key_value_pairs_and_given_secrets() -> None:
    text = (
        "connect postgresql://app:hunter2@db/x failed; "
        "dsn: host=db password='it s' user=app; token abc123"
    )
    masked = mask_secrets(text, ("abc123", ""))
    assert "hunter2" not in masked and "it s" not in masked and "abc123" not in masked
    assert "postgresql://app:***@db/x" in masked
    assert "password=***" in masked


_PASSWORDS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=6)


@given(_PASSWORDS)
def test_any_password_round_trips_through_the_url_and_never_shows_masked(password: str) -> None:
    assume(password.strip() == password and "\x00" not in password)
    info = ConnInfo(host="db.internal", user="app", dbname="shop", password=password)
    assert ConnInfo.parse(info.url).password == password
    assert password not in info.masked and password not in repr(info)
