"""Typed readers of configuration values: one table's keys, overridden by environment variables.

Private to :mod:`e2e_infra.config`. A parser takes ``(value, from_env)``: a value from the
environment is a string to convert, one from the TOML file must already have the right type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import ConfigError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")
_T = TypeVar("_T")


class _Reader:
    """Typed access to one table, with errors that name the key and the file."""

    def __init__(
        self,
        table: Mapping[str, Any],
        prefix: str,
        path: str,
        env: Mapping[str, str],
        env_names: Mapping[str, str | None],
        env_source: Mapping[str, str],
    ) -> None:
        self.table = table
        self.prefix = prefix
        self.path = path
        self.env = env
        self.env_names = env_names
        self.env_source = env_source

    def _where(self, key: str) -> tuple[str, str]:
        var = self.env_names.get(key)
        if var and var in self.env:
            return var, self.env_source.get(var, "the environment")
        return f"{self.prefix}{key}", self.path

    def raw(self, key: str) -> tuple[Any, bool]:
        """(value, from_env): the environment wins over the file."""
        var = self.env_names.get(key)
        if var and var in self.env:
            return self.env[var], True
        return self.table.get(key), False

    def error(self, key: str, problem: str) -> ConfigError:
        name, where = self._where(key)
        return ConfigError(f"{name} in {where}: {problem}", key=name, path=where)

    def get(self, key: str, default: _T, parse: Callable[[Any, bool], _T]) -> _T:
        value, from_env = self.raw(key)
        if value is None or (from_env and value == "" and not isinstance(default, str)):
            return default
        try:
            return parse(value, from_env)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise self.error(key, str(exc)) from None


def _as_str(value: Any, _env: bool) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if any(ord(ch) < 32 and ch not in "\t" for ch in value):
        raise ValueError("control characters are not allowed")
    return value


def _as_opt_str(value: Any, env: bool) -> str | None:
    text = _as_str(value, env).strip()
    return text or None


def _as_bool(value: Any, env: bool) -> bool:
    if isinstance(value, bool):
        return value
    if env and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
    raise TypeError(f"expected true or false, got {value!r}")


def _as_auto_bool(value: Any, env: bool) -> bool | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return _as_bool(value, env)


def _as_number(minimum: float, integer: bool = False) -> Callable[[Any, bool], Any]:
    def parse(value: Any, env: bool) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected a number, got {value!r}")
        if isinstance(value, str):
            if not env:
                raise TypeError(f"expected a number, got the string {value!r}")
            if not value.isascii():  # int() and float() also read other scripts' digits
                raise ValueError(f"expected a number in ASCII digits, got {value!r}")
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if integer and (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value != value or value < minimum or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a number >= {minimum:g}, got {value!r}")
        return int(value) if integer else float(value)

    return parse


def _as_list(value: Any, env: bool) -> tuple[str, ...]:
    if env and isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _as_names(kind: str) -> Callable[[Any, bool], tuple[str, ...]]:
    def parse(value: Any, env: bool) -> tuple[str, ...]:
        names = _as_list(value, env)
        for name in names:
            if NAME_PATTERN.fullmatch(name) is None:
                raise ValueError(f"invalid {kind} name {name!r} (use [a-z][a-z0-9_]{{0,39}})")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate {kind} names in {list(names)}")
        return names

    return parse


def _as_env_table(value: Any, _env: bool) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f'expected a table of NAME = "value", got {value!r}')
    out: dict[str, str] = {}
    for key, item in value.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"invalid environment variable name {key!r}")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise TypeError(f"value of {key} must be a string or number")
        out[key] = str(item)
    return out


#: The placeholders every command, env value and health check may use (README "Placeholders").
COMMON_PLACEHOLDERS = ("python", "database_url", "results_dir", "project", "root", "run_id")


def allowed_placeholders(port_names: Sequence[str], *extra: str) -> tuple[str, ...]:
    """The placeholders a command may use: the common ones, ``{ports.<name>}`` per port, and
    ``extra`` (a server's ``{port}``, ``{fd}``)."""
    return (*COMMON_PLACEHOLDERS, *extra, *(f"ports.{name}" for name in port_names))


def placeholders(text: str) -> list[str]:
    """The ``{name}`` fields of ``text``; ValueError for a spec, conversion or bad braces.

    Only plain names are accepted: ``{name}`` or ``{ports.<name>}``. No format spec, conversion,
    index or other attribute is evaluated (``{python.__class__}`` is an error, not a class name).
    """
    import string

    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    fields = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"placeholder {{{shown}}} takes no format spec or conversion")
        fields.append(name)
    return fields


def check_placeholders(text: str, allowed: Sequence[str]) -> None:
    """ValueError naming the first placeholder of ``text`` that is not in ``allowed``."""
    for name in placeholders(text):
        if name not in allowed:
            known = ", ".join(f"{{{item}}}" for item in allowed)
            raise ValueError(
                f"unknown placeholder {{{name}}} (known: {known}; write {{{{ and }}}} for "
                "literal braces)"
            )
