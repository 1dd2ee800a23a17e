"""Connection information as a value object that never shows its password.

``ConnInfo`` keeps the parsed parts of a libpq URL or key/value string. ``str()``, ``repr()`` and
:attr:`ConnInfo.masked` replace the password with ``***``; only :attr:`ConnInfo.url` and
:meth:`ConnInfo.conninfo` carry it, for handing to a driver or a child process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlencode

from .errors import ConfigError

__all__ = ["MASK", "ConnInfo", "mask_secrets"]

MASK = "***"

_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)", re.I
)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.I)


def mask_secrets(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask passwords in URLs and ``password=`` pairs in ``text``, and every literal secret."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


@dataclass(frozen=True)
class ConnInfo:
    """Where a PostgreSQL server is and how to log in; the password is never rendered."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    dbname: str = "postgres"
    password: str | None = field(default=None, repr=False)
    params: Mapping[str, str] = field(default_factory=dict)
    # A server this tool did not start (parsed from an admin URL): its errors must not point at
    # the local cluster's tasks (see pgerrors).
    external: bool = field(default=False, compare=False)

    @classmethod
    def parse(cls, text: str, *, source: str = "admin_url") -> ConnInfo:
        """Parse a ``postgresql://`` URL or a libpq key/value string."""
        # Imported here: psycopg costs ~0.1 s to import, and config (which every nox worker and
        # `invoke --list` loads) only needs it when an admin URL is configured.
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts: dict[str, Any] = conninfo_to_dict(text)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"{source} is not a valid PostgreSQL URL ({mask_secrets(str(exc), (text,))}); "
                "expected postgresql://USER:PASSWORD@HOST:PORT/DBNAME",
                key=source,
            ) from None
        host = str(parts.pop("host", "") or "127.0.0.1")
        port_text = str(parts.pop("port", "") or "5432")
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{source} has an invalid port {port_text!r}", key=source)
        return cls(
            host=host,
            port=int(port_text),
            user=str(parts.pop("user", "") or "postgres"),
            dbname=str(parts.pop("dbname", "") or "postgres"),
            password=(str(parts.pop("password")) if parts.get("password") else None),
            params={str(k): str(v) for k, v in parts.items() if k != "password"},
            external=True,
        )

    def with_dbname(self, dbname: str) -> ConnInfo:
        return replace(self, dbname=dbname)

    def with_params(self, **params: str) -> ConnInfo:
        return replace(self, params={**self.params, **params})

    def conninfo(self, **extra: Any) -> str:
        """The libpq key/value string, password included: for drivers only."""
        from psycopg.conninfo import make_conninfo

        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": self.dbname,
            **self.params,
            **extra,
        }
        if self.password:
            kwargs["password"] = self.password
        return make_conninfo("", **kwargs)

    def _url(self, password: str | None) -> str:
        auth = quote(self.user, safe="")
        if password:
            auth += ":" + (password if password == MASK else quote(password, safe=""))
        if self.host.startswith("/"):
            # A unix socket directory goes into the query string; the netloc stays empty.
            netloc = f"{auth}@:{self.port}"
            query = {"host": self.host, **self.params}
        else:
            netloc = f"{auth}@{self.host}:{self.port}"
            query = dict(self.params)
        url = f"postgresql://{netloc}/{quote(self.dbname, safe='')}"
        if query:
            # quote, not urlencode's default quote_plus: libpq reads "+" as a plus, not a space.
            url += "?" + urlencode(query, quote_via=quote)
        return url

    @property
    def url(self) -> str:
        """The real URL, password included: only for handing over (``db.url``, DATABASE_URL)."""
        return self._url(self.password)

    @property
    def masked(self) -> str:
        """The URL with the password replaced by ``***``: for logs, errors and human output."""
        return self._url(MASK if self.password else None)

    def __str__(self) -> str:
        return self.masked
