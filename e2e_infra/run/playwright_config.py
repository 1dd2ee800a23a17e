"""What a Playwright Test config declares, as Playwright itself resolves it.

The tool needs three facts a ``playwright.config.ts`` holds (TypeScript, often computed): which
reporters it names and where they write (an ``html`` reporter's ``outputFolder``, a ``junit``
reporter's ``outputFile``), its projects (names, test and output folders) and its ``webServer``
entries. Only Playwright can read the file, so :func:`resolve` asks it: ``playwright test --list
--pass-with-no-tests --add-reporter=<probe> <a filter matching no file>`` with the tool's probe
reporter (``playwright_probe.cjs``), which writes the resolved config as JSON. No test file is
loaded and no web server started (~1 s, ~0.7 s of CPU here); the reporters the config names run in
list mode with every built-in one's output sent to a scratch folder, so nothing of the team's is
touched. (``--list --reporter=json`` prints a resolved config too, but its ``--reporter``
replaces the declared reporters, so they cannot be read from it.)

The answer is cached in ``<state_dir>/playwright/``, keyed by the config file's path and content,
the working folder and Playwright's version: a run after the first pays nothing. A config whose
result depends on files it imports or on the environment is probed again only when it changes;
remove that folder to force it.

:func:`config_file_of` finds the config a command uses without running anything (``-c``/
``--config``, else Playwright's default names in the working folder): enough to tell which e2e
projects share one config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_NAMES",
    "PwProject",
    "ResolvedConfig",
    "config_file_of",
    "package_dir",
    "playwright_version",
    "resolve",
]

log = logging.getLogger("e2e_infra")

CONFIG_NAMES = tuple(f"playwright.config.{ext}" for ext in ("ts", "js", "mts", "mjs", "cts", "cjs"))
PROBE = Path(__file__).with_name("playwright_probe.cjs")
PROBE_VERSION = 1
_NO_TEST = "__e2e_infra_probe_matches_no_test_file__"
_ADD_REPORTER_SINCE = (1, 63)  # the first Playwright with --add-reporter
_TIMEOUT = 60.0
_SCRATCH_ENV = (  # every built-in reporter's output, sent to the probe's scratch folder
    ("PLAYWRIGHT_HTML_OUTPUT_DIR", "html"),
    ("PLAYWRIGHT_JUNIT_OUTPUT_FILE", "junit.xml"),
    ("PLAYWRIGHT_JSON_OUTPUT_FILE", "report.json"),
    ("PLAYWRIGHT_BLOB_OUTPUT_DIR", "blob"),
)


@dataclass(frozen=True)
class PwProject:
    name: str
    test_dir: Path
    output_dir: Path


@dataclass(frozen=True)
class ResolvedConfig:
    """A Playwright Test config as Playwright resolved it."""

    config_file: Path | None
    root_dir: Path
    version: str
    reporters: tuple[tuple[str, Mapping[str, Any]], ...]
    projects: tuple[PwProject, ...]
    web_servers: tuple[Mapping[str, Any], ...]

    @property
    def config_dir(self) -> Path:
        return self.config_file.parent if self.config_file is not None else self.root_dir

    def reporter(self, name: str) -> Mapping[str, Any] | None:
        """The options of the built-in reporter ``name`` if the config names it."""
        for reporter, options in self.reporters:
            if reporter == name:
                return options
        return None

    def html_folder(self) -> Path | None:
        """Where its ``html`` reporter writes (its ``outputFolder``, else Playwright's default
        ``playwright-report`` next to the config); None without one."""
        options = self.reporter("html")
        if options is None:
            return None
        folder = str(options.get("outputFolder") or "playwright-report")
        return (self.config_dir / folder).resolve()

    def junit_file(self) -> Path | None:
        """Where its ``junit`` reporter writes when the config says (``outputFile``)."""
        options = self.reporter("junit")
        if options is None or not options.get("outputFile"):
            return None
        return (self.config_dir / str(options["outputFile"])).resolve()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResolvedConfig:
        config_file = data.get("configFile")
        return cls(
            config_file=Path(config_file) if config_file else None,
            root_dir=Path(str(data["rootDir"])),
            version=str(data.get("version") or ""),
            reporters=tuple(
                (str(name), dict(options) if isinstance(options, dict) else {})
                for name, options in data.get("reporter") or ()
            ),
            projects=tuple(
                PwProject(str(p.get("name") or ""), Path(p["testDir"]), Path(p["outputDir"]))
                for p in data.get("projects") or ()
            ),
            web_servers=tuple(dict(w) for w in data.get("webServer") or () if isinstance(w, dict)),
        )


def _words(argv: Sequence[str]) -> list[str]:
    """``argv`` with each shell script word (``sh -c '...'``) split into its own words."""
    out: list[str] = []
    for word in argv:
        if any(c.isspace() for c in word) and "playwright" in word:
            try:
                out += shlex.split(word)
                continue
            except ValueError:
                pass
        out.append(word)
    return out


def config_file_of(argv: Sequence[str], cwd: Path) -> Path | None:
    """The config file a ``playwright test`` command in ``cwd`` uses: its ``-c``/``--config``
    (a file, or a folder holding one of :data:`CONFIG_NAMES`), else the first of those names in
    ``cwd``; None when there is none (Playwright then runs without a config)."""
    words = _words(argv)
    given: str | None = None
    for i, word in enumerate(words):
        if word in ("-c", "--config") and i + 1 < len(words):
            given = words[i + 1]
        elif word.startswith("--config="):
            given = word.partition("=")[2]
        elif word.startswith("-c") and len(word) > 2 and not word.startswith("--"):
            given = word[2:]
    if given is not None:
        path = (cwd / given).resolve()
        if path.is_dir():
            return next((path / n for n in CONFIG_NAMES if (path / n).is_file()), None)
        return path
    return next(((cwd / n).resolve() for n in CONFIG_NAMES if (cwd / n).is_file()), None)


def package_dir(cwd: Path) -> Path | None:
    """``node_modules/playwright`` as Node resolves it from ``cwd`` (the nearest one up)."""
    for folder in (cwd.resolve(), *cwd.resolve().parents):
        candidate = folder / "node_modules" / "playwright"
        if (candidate / "cli.js").is_file():
            return candidate
    return None


def playwright_version(package: Path | None) -> tuple[int, int] | None:
    """The (major, minor) version of the ``playwright`` package at ``package``."""
    if package is None:
        return None
    try:
        version = str(json.loads((package / "package.json").read_text("utf-8"))["version"])
        major, minor = (int(part) for part in version.split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return major, minor


def resolve(
    cwd: Path,
    config_file: Path | None,
    *,
    cache_dir: Path,
    env: Mapping[str, str],
    timeout: float = _TIMEOUT,
    problems: list[str] | None = None,
) -> ResolvedConfig | None:
    """The config ``config_file`` as Playwright (found from ``cwd``) resolves it, from the cache
    when it is known; None when it cannot be known (no node or Playwright >= 1.63, a config that
    does not load: the run itself says why), with one warning line (also appended to
    ``problems``)."""
    package = package_dir(cwd)
    version = playwright_version(package)
    node = shutil.which("node", path=env.get("PATH"))
    if package is None or node is None or version is None or version < _ADD_REPORTER_SINCE:
        return None
    key = _cache_key(cwd, config_file, package)
    cached = cache_dir / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return ResolvedConfig.from_json(json.loads(cached.read_text("utf-8")))
    import filelock

    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with filelock.FileLock(str(cache_dir / f"{key}.lock"), mode=0o600, timeout=timeout + 30):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # probed meanwhile
            return ResolvedConfig.from_json(json.loads(cached.read_text("utf-8")))
        data = _probe(node, package, cwd, config_file, env, timeout, problems)
        if data is None:
            return None
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, cached)
    try:
        return ResolvedConfig.from_json(data)
    except (ValueError, KeyError, TypeError):
        return None


def _cache_key(cwd: Path, config_file: Path | None, package: Path) -> str:
    digest = hashlib.sha256(f"probe {PROBE_VERSION}\0{cwd.resolve()}\0".encode())
    with contextlib.suppress(OSError):
        digest.update((package / "package.json").read_bytes())
    if config_file is not None:
        digest.update(str(config_file).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(config_file.read_bytes())
    return digest.hexdigest()[:24]


def _probe(
    node: str,
    package: Path,
    cwd: Path,
    config_file: Path | None,
    env: Mapping[str, str],
    timeout: float,
    problems: list[str] | None = None,
) -> dict[str, Any] | None:
    said = problems if problems is not None else []
    with tempfile.TemporaryDirectory(prefix="e2e-infra-pw-probe-") as scratch:
        out = Path(scratch) / "config.json"
        probe_env = {**env, "E2E_INFRA_PW_PROBE_OUT": str(out), "PLAYWRIGHT_HTML_OPEN": "never"}
        probe_env.update({name: str(Path(scratch) / leaf) for name, leaf in _SCRATCH_ENV})
        argv = [node, str(package / "cli.js"), "test", "--list", "--pass-with-no-tests"]
        argv += [f"--add-reporter={PROBE}"]
        argv += [f"--config={config_file}"] if config_file is not None else []
        argv.append(_NO_TEST)
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=probe_env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            said.append(str(exc))
            log.warning("cannot read the Playwright config of %s (%s)", cwd, exc)
            return None
        try:
            data = json.loads(out.read_text("utf-8"))
        except (OSError, ValueError):
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            first = next((ln.strip() for ln in lines if "Error" in ln), lines[0] if lines else "")
            said.append(first[:300] or f"playwright test --list exited with {proc.returncode}")
            log.warning(
                "cannot read the Playwright config %s: playwright test --list exited with %s (%s)",
                config_file or cwd,
                proc.returncode,
                first[:300] or "no output",
            )
            return None
    return data if isinstance(data, dict) else None
