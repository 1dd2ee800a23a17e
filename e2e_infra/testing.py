"""Fakes for the edges, and config copies, for the tests and benches (and users' own tests)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FakeClock",
    "FakeHealthCheck",
    "FakePortProbe",
    "config_toml",
    "copy_config",
    "toml_value",
]


class FakeClock:
    """A clock whose sleep advances time instantly; records every sleep."""

    def __init__(self, start: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.now = start
        self.wall = wall
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall + self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeHealthCheck:
    """A health check (``e2e_infra.run.health.HealthCheck``) that answers from a script.

    ``results`` are returned in order, the last one repeated forever (default: never healthy).
    Each probe is recorded with the clock's time, when a clock is given; ``advance`` seconds of
    that clock pass per probe, like a real probe's round trip.
    """

    def __init__(
        self,
        results: list[bool] | None = None,
        *,
        clock: FakeClock | None = None,
        advance: float = 0.0,
        description: str = "fake probe",
    ) -> None:
        self.results = list(results or [False])
        self.clock = clock
        self.advance = advance
        self.description = description
        self.probes: list[float] = []
        self.last_error = ""

    def probe(self) -> bool:
        self.probes.append(self.clock.now if self.clock else float(len(self.probes)))
        if self.clock is not None:
            self.clock.advance(self.advance)
        index = min(len(self.probes) - 1, len(self.results) - 1)
        healthy = self.results[index]
        self.last_error = "" if healthy else "not ready"
        return healthy


class FakePortProbe:
    """A port probe for ``PortAllocator(probe=...)``: ports in ``busy`` are taken; records calls."""

    def __init__(self, busy: set[int] | None = None) -> None:
        self.busy = set(busy or ())
        self.probed: list[int] = []

    def __call__(self, port: int) -> bool:
        self.probed.append(port)
        return port not in self.busy


# --- configs for tests and benches ----------------------------------------------------------------


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (strings, numbers, booleans, paths, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
            + "}"
        )
    raise TypeError(f"cannot write {value!r} as TOML")


def config_toml(section: Mapping[str, Any], prefix: str = "tool.e2e_infra") -> str:
    """A ``[tool.e2e_infra]`` document: nested tables as tables, ``env`` tables inline."""
    lines = [f"[{prefix}]"]
    nested = {}
    for key, value in section.items():
        if isinstance(value, Mapping) and key != "env":
            nested[key] = value
        elif value is not None:
            lines.append(f"{key} = {toml_value(value)}")
    lines.append("")
    for key, value in nested.items():
        lines.append(config_toml(value, f"{prefix}.{key}"))
    return "\n".join(lines)


def copy_config(
    source: Path,
    folder: Path,
    *,
    port_range: str,
    projects: Mapping[str, Any] | None = None,
    extra_servers: Mapping[str, Any] | None = None,
    extra_projects: Mapping[str, Any] | None = None,
    database: Mapping[str, Any] | None = None,
    **top: Any,
) -> Path:
    """Copy ``source``'s ``[tool.e2e_infra]`` to ``folder/pyproject.toml``; return that path.

    State and results go under ``folder``, the ports to ``port_range``, and every relative path
    (migrations, seeds, working folders) is made absolute against ``source``'s folder so that the
    copy runs the same servers and suites. ``projects`` replaces the projects; ``extra_*`` add to
    them; ``database`` and ``top`` override single keys.
    """
    root = source.resolve().parent
    section: dict[str, Any] = tomllib.loads(source.read_text(encoding="utf-8"))["tool"]["e2e_infra"]
    section.update(
        state_dir=str(folder / "state"), results_dir=str(folder / "results"), port_range=port_range
    )
    section.update(top)
    db = section.setdefault("database", {})
    db.update(database or {})
    for key in ("migrations_dir", "seeds_dir"):
        if key in db:
            db[key] = str(root / db[key])
    servers = section.setdefault("servers", {})
    servers.update(extra_servers or {})
    if projects is not None:
        section["projects"] = dict(projects)
    section.setdefault("projects", {}).update(extra_projects or {})
    for table in (*servers.values(), *section["projects"].values()):
        table["cwd"] = str(root / table.get("cwd", "."))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(config_toml(section) + "\n", encoding="utf-8")
    return path
