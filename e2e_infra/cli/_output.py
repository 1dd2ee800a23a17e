"""What every task shares: one error line and exit code, JSON, tables, the CLI owner.

The only place that turns the library's exception tree into what a person sees at a terminal:
``error: <one line naming the fix>`` on stderr and the error's exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit

import e2e_infra

F = TypeVar("F", bound=Callable[..., Any])

JSON_HELP = "print one JSON document on stdout"
OWNER_HELP = (
    "pid of the live process that uses the ports; default E2E_OWNER_PID, else the process that "
    "ran the command (your shell or script). The lease lasts while that process lives"
)


def setup_logging() -> None:
    root = logging.getLogger("e2e_infra")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def cli(fn: F) -> F:
    """Turn library errors into one line on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(c: Context, *args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(c, *args, **kwargs)
        except e2e_infra.E2EInfraError as exc:
            print_error_log(exc)
            raise Exit(f"error: {exc.one_line()}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted: everything this command held was released", code=130) from None
        except Exit:
            raise
        except Exception as exc:  # a defect of ours: still one masked line, never a traceback
            message = e2e_infra.mask_secrets(" ".join(f"{type(exc).__name__}: {exc}".split()))
            raise Exit(
                f"error: unexpected {message[:500]} (a bug in e2e-infra: please report it; "
                "run `invoke e2e.cleanup` if anything was left behind)",
                code=1,
            ) from None

    return wrapper  # type: ignore[return-value]


def print_error_log(exc: BaseException) -> None:
    """The last lines of what failed (a migrate or seed command, a prepare step), as lines, and
    where its whole output is: printed before the one error line."""
    tail = str(getattr(exc, "log_tail", "") or "").rstrip()
    where = getattr(exc, "log_path", None)
    if not tail or not where:
        return
    lines = [f"last lines of its output ({where}):", *(f"  {line}" for line in tail.splitlines())]
    print("\n".join(lines), file=sys.stderr)


def exit_code(returncode: int | None) -> int:
    """A process exit status for a child's return code (-N, killed by signal N: 128 + N)."""
    if not returncode:
        return 1
    return 128 - returncode if returncode < 0 else min(returncode, 255)


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout, and nothing else there."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def load() -> e2e_infra.Config:
    return e2e_infra.load_config()


def workspace(config: e2e_infra.Config | None = None) -> e2e_infra.Workspace:
    return e2e_infra.Workspace(config or load())


def cli_owner(config: e2e_infra.Config, owner_pid: str) -> e2e_infra.Owner:
    """The owner of a CLI lease: whoever asked (the command exits as soon as it has printed)."""
    # Without E2E_RUN_ID the run id is fixed per owner, so asking again returns the same ports.
    given = int_arg("owner-pid", owner_pid, minimum=1) if owner_pid else 0
    pid = given or config.owner_pid or os.getppid()
    run_id = config.run_id or f"cli-{pid}"
    try:
        return e2e_infra.Owner.of_pid(pid, host=config.host_id, run_id=run_id)
    except e2e_infra.RegistryError:
        raise e2e_infra.UsageError(
            f"owner process {pid} is not running; pass --owner-pid (or E2E_OWNER_PID) with the pid "
            "of the live process that will use the ports"
        ) from None


def project_arg(project: str) -> str:
    """The --project value, validated: the one place a CLI project name is checked."""
    if not project:
        raise e2e_infra.UsageError("pass --project NAME, e.g. --project auth_tests")
    return e2e_infra.validate_project_name(project)


def int_arg(option: str, value: str, *, minimum: int = 0) -> int:
    """A whole-number option, checked here: invoke's own ``int()`` would print a traceback."""
    try:
        number = int(value.strip())
    except ValueError:
        raise e2e_infra.UsageError(f"--{option} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise e2e_infra.UsageError(f"--{option} must be {minimum} or more, got {number}")
    return number


_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def seconds_arg(option: str, value: str, *, unit: str = "s") -> float:
    """A duration option > 0 in seconds: a number of ``unit`` or one with its own (90s, 10m, 2h)."""
    text = value.strip().lower()
    scale = _SECONDS[unit]
    if text[-1:] in _SECONDS:
        text, scale = text[:-1], _SECONDS[text[-1]]
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        bare = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]
        raise e2e_infra.UsageError(
            f"--{option} must be a duration > 0 such as 90s, 10m or 2h (a bare number counts "
            f"{bare}), got {value!r}"
        )
    return number * scale


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    for unit, step in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if nbytes >= step:
            return f"{nbytes / step:.1f} {unit}"
    return f"{nbytes} B"


def console() -> Any:
    """A rich console for stdout: a fixed wide page when it is not a terminal (CI logs, pipes)."""
    # rich is imported where it prints, not with the module: `invoke --list` does not need it.
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(*columns, box=box.SIMPLE_HEAD)
    for row in rows:
        table.add_row(*row)
    out = console()
    out.print(title, markup=False)
    out.print(table)


def print_run_report(config: e2e_infra.Config, runs: list[e2e_infra.RunRecord]) -> None:
    """After a run: the summary table and failures, the merged JUnit file, the merged Playwright
    report and ``report.html``, on stderr (stdout stays for JSON); then the run folders beyond
    the retention (``keep_runs``, ``keep_run_days``) are removed."""
    e2e_infra.print_summary(config, runs)
    for merged in e2e_infra.merge_playwright_reports(config, runs):
        print(f"Playwright report: {merged}", file=sys.stderr)
    print(f"report: {e2e_infra.write_html_report(config, runs)}", file=sys.stderr)
    from e2e_infra.report.retention import prune_runs

    prune_runs(config)  # keep_runs / keep_run_days: the results folder does not grow forever


def print_tail(what: str, log: Path, lines: int = 15) -> None:
    """The last ``lines`` lines of ``log`` as lines, then where the whole of it is."""
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print("\n".join([f"last lines of {what}:", *tail, f"(all of it: {log})"]), file=sys.stderr)
