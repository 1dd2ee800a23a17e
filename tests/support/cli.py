"""The tool's three entry points as subprocesses, run as a user runs them.

``nox`` with this checkout's noxfile (``-f <root>/noxfile.py``), ``invoke`` with its tasks.py
(``-r <root>``, or the tasks.py of the working folder), and the console script
(``python -m e2e_infra``), each with the interpreter running the tests. Output is captured as text;
the caller says which environment, working folder and timeout. :meth:`Cli.popen` and
:meth:`Cli.start` start one for a test that signals it or reads its output while it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import REPO_ROOT

Invoke = Callable[..., subprocess.CompletedProcess[str]]


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The outer environment without any E2E_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2E_")}
    env.update(extra or {})
    return env


def config_environ(config_path: Path, **extra: str) -> dict[str, str]:
    """:func:`clean_environ` with ``E2E_CONFIG=<config_path>``, plus ``extra``."""
    return clean_environ({"E2E_CONFIG": str(config_path), **extra})


@dataclass(frozen=True)
class Cli:
    """Runs ``nox``, ``invoke`` and the console script of the checkout at ``root``.

    ``env`` is the child's whole environment (``None``: this process's, as is); ``cwd`` defaults
    to ``root``; further keyword arguments go to :func:`subprocess.run` (``umask``...).
    """

    root: Path = REPO_ROOT
    python: str = sys.executable

    def nox_argv(self, *args: str) -> list[str]:
        return [self.python, "-m", "nox", "-f", str(self.root / "noxfile.py"), *args]

    def invoke_argv(self, *args: str, search_root: bool = True) -> list[str]:
        """With ``search_root``, ``-r <root>``: the checkout's tasks.py from any working folder;
        without, invoke finds the tasks.py of the working folder."""
        where = ["-r", str(self.root)] if search_root else []
        return [self.python, "-m", "invoke", *where, *args]

    def console_argv(self, *args: str) -> list[str]:
        return [self.python, "-m", "e2e_infra", *args]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: Path | None = None,
        timeout: float = 120,
        check: bool = False,
        **options: Any,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            cwd=self.root if cwd is None else cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **options,
        )

    def nox(
        self,
        *args: str,
        env: Mapping[str, str] | None,
        cwd: Path | None = None,
        timeout: float = 120,
        **options: Any,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(self.nox_argv(*args), env=env, cwd=cwd, timeout=timeout, **options)

    def invoke(
        self,
        *args: str,
        env: Mapping[str, str] | None,
        cwd: Path | None = None,
        timeout: float = 120,
        search_root: bool = True,
        **options: Any,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.invoke_argv(*args, search_root=search_root)
        return self.run(argv, env=env, cwd=cwd, timeout=timeout, **options)

    def console(
        self,
        *args: str,
        env: Mapping[str, str] | None,
        cwd: Path | None = None,
        timeout: float = 120,
        **options: Any,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(self.console_argv(*args), env=env, cwd=cwd, timeout=timeout, **options)

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: Path | None = None,
        **options: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` (from one of the ``*_argv`` methods) without waiting: ``options`` say
        where its output goes (``stdout=``, ``text=``, ``start_new_session=``...)."""
        return subprocess.Popen(
            list(argv), cwd=self.root if cwd is None else cwd, env=env, **options
        )

    def start(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None, cwd: Path | None = None
    ) -> subprocess.Popen[str]:
        """:meth:`popen` with stdout and stderr piped together, as text (``communicate()[0]``)."""
        return self.popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )


CLI = Cli()
"""The entry points of this checkout, for module-level helpers and module-scoped fixtures (tests
take the ``cli`` fixture)."""
