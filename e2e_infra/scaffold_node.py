"""``e2e-infra init`` in a Node repository: a config section read from its Playwright configs.

A repository with a ``package.json`` and a Playwright Test config (at its root, in a workspace
package, or in ``e2e/``/``tests/``) gets a ``[tool.e2e_infra]`` section proposed from what
Playwright itself resolves (:func:`~e2e_infra.run.playwright_config.resolve`, so the
``node_modules`` must be installed):

- one e2e project per Playwright project, ``npx playwright test --project=<name>`` from the
  config's folder (a config without named projects: one e2e project for it, named after its
  folder);
- one server per ``webServer`` entry (its command, its folder, its URL as the health check and
  a port of its own), each config's projects running the servers of their config;
- where migrations could come from (drizzle-kit, knex, node-pg-migrate, Prisma, a folder of
  ``.sql`` files), as commented lines to finish by hand.

Everything proposed is plain TOML the loader accepts; what needs a person's eye is said in
comments next to it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import NAME_PATTERN
from .run.playwright_config import CONFIG_NAMES, ResolvedConfig, package_dir, resolve

__all__ = ["NodePlan", "node_plan"]

_SEARCH = (".", "e2e", "tests", "playwright")  # folders of a config, besides workspace packages


@dataclass
class _Server:
    name: str
    command: str
    cwd: str
    health: str
    was: str  # where it listened under Playwright: "port 3310", "http://localhost:3000/"


@dataclass
class NodePlan:
    """What ``init`` found in a Node repository and the config section it proposes."""

    configs: list[Path] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (config, why)
    projects: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)
    servers: list[_Server] = field(default_factory=list)
    migrations: list[str] = field(default_factory=list)  # commented TOML lines

    def summary(self) -> str:
        found = f"{len(self.projects)} Playwright project(s) in {len(self.configs)} config(s)"
        servers = f", {len(self.servers)} webServer entr(y/ies)" if self.servers else ""
        return f"a Node repository: {found}{servers}"

    def section(self) -> str:
        """The ``[tool.e2e_infra]`` section: real tables for what was found, comments for the
        rest."""
        lines = [
            "",
            "# " + "-" * 75,
            "# e2e-infra: each E2E project gets its own ports, PostgreSQL database and servers.",
            "# Proposed by `e2e-infra init` from your Playwright configs; every key is described",
            '# in the e2e-infra README, "Configuration". `e2e-infra e2e.doctor` checks it.',
            "# " + "-" * 75,
            "[tool.e2e_infra]",
            f"port_names = [{', '.join(_q(s.name) for s in self.servers) or _q('web')}]",
            "",
            "# A one-time build before any project (a reporter plugin, a frontend): skipped",
            "# while its inputs are unchanged.",
            "# [tool.e2e_infra.prepare.build]",
            '# command = "npm run build"',
            '# inputs = ["packages/*/src/**"]',
            "",
            "[tool.e2e_infra.database]",
            *(
                self.migrations
                or ["# no migration tool found: set migrate_command or migrations_dir"]
            ),
            "",
        ]
        for server in self.servers:
            lines += [
                f"# Playwright's webServer ({server.was}): e2e-infra sets PORT (and",
                f"# {server.name.upper()}_URL for the suites); make the server listen on it.",
                f"[tool.e2e_infra.servers.{server.name}]",
                f"command = {_q(server.command)}",
                *([f"cwd = {_q(server.cwd)}"] if server.cwd != "." else []),
                f"port = {_q(server.name)}",
                f"health = {_q(server.health)}",
                "",
            ]
        if self.projects:
            lines += [
                "# Your configs' webServer entries start one server for all projects: skip them",
                "# under e2e-infra (it sets E2E_PROJECT), e.g. `webServer: process.env.E2E_PROJECT",
                "# ? undefined : [...]`, and read the servers' URLs (<NAME>_URL) in `use.baseURL`.",
            ]
        for name, (command, cwd, servers) in self.projects.items():
            lines += [
                f"[tool.e2e_infra.projects.{name}]",
                f"command = {_q(command)}",
                *([f"cwd = {_q(cwd)}"] if cwd != "." else []),
                f"servers = [{', '.join(_q(s) for s in servers)}]",
                "",
            ]
        for config, why in self.unreadable:
            lines.append(f"# {config}: Playwright could not read it: {why}")
        return "\n".join(lines).rstrip("\n") + "\n"


def _q(text: str) -> str:
    return json.dumps(text)  # a TOML basic string is a JSON string for what we write


def _name(text: str, taken: set[str], fallback: str) -> str:
    base = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    if not base or not base[0].isalpha():
        base = f"{fallback}_{base}".strip("_") if base else fallback
    base = base[:36]
    name, n = base, 2
    while name in taken or NAME_PATTERN.fullmatch(name) is None:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name


def _package_json(root: Path) -> Mapping[str, Any] | None:
    try:
        data = json.loads((root / "package.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_configs(root: Path, package: Mapping[str, Any]) -> list[Path]:
    """The Playwright configs of the repository: in its root, ``e2e/``, ``tests/``,
    ``playwright/`` and every workspace package (``workspaces`` of ``package.json``)."""
    folders = [root / f for f in _SEARCH]
    workspaces = package.get("workspaces")
    if isinstance(workspaces, dict):  # yarn's {"packages": [...]}
        workspaces = workspaces.get("packages")
    for pattern in workspaces if isinstance(workspaces, list) else ():
        if isinstance(pattern, str):
            folders += sorted(root / p for p in glob.glob(pattern, root_dir=root))
    found = []
    for folder in folders:
        config = next((folder / n for n in CONFIG_NAMES if (folder / n).is_file()), None)
        if config is not None and config.resolve() not in found:
            found.append(config.resolve())
    return found


def _migrations(root: Path, package: Mapping[str, Any]) -> list[str]:
    deps = {**(package.get("dependencies") or {}), **(package.get("devDependencies") or {})}
    out = []
    drizzle = sorted(root.glob("drizzle.config.*"))
    if drizzle:
        out += [
            f"# {drizzle[0].name}: drizzle-kit applies its migrations with DATABASE_URL",
            'migrate_command = "npx drizzle-kit migrate"',
            'migrate_inputs = ["drizzle/**"]',
        ]
    elif sorted(root.glob("knexfile.*")):
        out += [
            "# knexfile: knex applies its migrations (read DATABASE_URL in the knexfile)",
            'migrate_command = "npx knex migrate:latest"',
            'migrate_inputs = ["migrations/**"]',
        ]
    elif "node-pg-migrate" in deps:
        out += [
            "# node-pg-migrate (package.json) reads DATABASE_URL",
            'migrate_command = "npx node-pg-migrate up"',
            'migrate_inputs = ["migrations/**"]',
        ]
    elif (root / "prisma" / "schema.prisma").is_file():
        out += [
            "# Prisma: `migrate deploy` needs its native schema engine, downloaded on first use",
            'migrate_command = "npx prisma migrate deploy"',
            'migrate_inputs = ["prisma.config.ts", "prisma/schema.prisma", "prisma/migrations/**"]',
        ]
    elif sorted(root.glob("migrations/*.sql")):
        out += ['migrations_dir = "migrations"  # ordered .sql files, one transaction each']
    prisma = package.get("prisma")
    seed = prisma.get("seed") if isinstance(prisma, dict) else None
    scripts = package.get("scripts")
    seeds = (
        [name for name in scripts if "seed" in name.lower()] if isinstance(scripts, dict) else []
    )
    if seed:
        out.append(
            f"# seed_commands = {{ default = {_q(str(seed))} }}  # name its files in seed_inputs"
        )
    elif seeds:
        out.append(f'# seed_commands = {{ default = "npm run {seeds[0]}" }}  # and seed_inputs')
    return out


def _server_name(entry: Mapping[str, Any], cwd: str, taken: set[str]) -> str:
    command = str(entry.get("command") or "")
    match = re.search(r"(?:--workspace(?:=|\s+)|-w\s+)(\S+)", command)
    if match:
        hint = match.group(1).rstrip("/").rsplit("/", 1)[-1]
    elif cwd != ".":
        hint = Path(cwd).name
    else:
        hint = "web"
    return _name(hint, taken, "web")


def _health(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(the health check for e2e-infra, where it listened under Playwright)."""
    url = entry.get("url")
    if url:
        parts = urlsplit(str(url))
        path = parts.path or "/"
        query = f"?{parts.query}" if parts.query else ""
        scheme = parts.scheme or "http"
        return f"{scheme}://127.0.0.1:{{port}}{path}{query}", str(url)
    return "", f"port {entry.get('port')}" if entry.get("port") else "no port or url"


def node_plan(root: Path, env: Mapping[str, str] | None = None) -> NodePlan | None:
    """What ``init`` proposes for the Node repository at ``root``; None when it is none (no
    ``package.json``, or no Playwright config)."""
    package = _package_json(root)
    if package is None:
        return None
    configs = find_configs(root, package)
    if not configs:
        return None
    plan = NodePlan(configs=configs, migrations=_migrations(root, package))
    environ = dict(os.environ if env is None else env)
    environ.pop("E2E_PROJECT", None)  # the configs as the team runs them, webServer included
    taken_servers: set[str] = set()
    taken_projects: set[str] = set()
    known: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="e2e-infra-init-") as cache:
        resolved: list[tuple[Path, ResolvedConfig | None, str]] = []
        for config in configs:
            found, problems = None, ["no node_modules/playwright (run `npm ci`)"]
            if package_dir(config.parent) is not None:
                problems = []
                found = resolve(
                    config.parent, config, cache_dir=Path(cache), env=environ, problems=problems
                )
            resolved.append((config, found, "; ".join(problems) or "no node or Playwright < 1.63"))
    for config, found, why in resolved:
        folder = os.path.relpath(config.parent, root)
        if found is None:
            plan.unreadable.append((os.path.relpath(config, root), why))
            continue
        servers = []
        for entry in found.web_servers:
            where = (config.parent / str(entry.get("cwd") or ".")).resolve()  # as Playwright
            cwd = os.path.relpath(where, root)
            key = (str(entry.get("command") or ""), cwd)
            if key not in known:
                name = _server_name(entry, cwd, taken_servers)
                health, was = _health(entry)
                plan.servers.append(_Server(name, key[0], cwd, health, was))
                known[key] = name
            servers.append(known[key])
        names = [p.name for p in found.projects if p.name]
        if not names:
            hint = Path(folder).name if folder != "." else "e2e"
            plan.projects[_name(hint, taken_projects, "e2e")] = (
                "npx playwright test",
                folder,
                servers,
            )
        for pw_name in names:
            command = f"npx playwright test --project={pw_name}"
            plan.projects[_name(pw_name, taken_projects, "e2e")] = (command, folder, servers)
    return plan


def lines_missing_from(existing: str, template: str) -> list[str]:
    """The ``E2E_*`` settings of ``template`` (commented, with the comment above each) that
    ``existing`` does not mention."""
    out: list[str] = []
    comment: list[str] = []
    for line in template.splitlines():
        match = re.match(r"#\s*(E2E_[A-Z0-9_]+)=", line)
        if match:
            if match.group(1) not in existing:
                out += [*comment, line]
            comment = []
        elif line.startswith("# ") and not line.startswith("# ---"):
            comment.append(line)
        else:
            comment = []
    return out
