"""The daily loop: ``invoke e2e.up``, ``e2e.env``, ``e2e.reset``, ``e2e.down``, ``e2e.flaky``.

Keep a project's environment up (its servers running), point another shell at it, give it a
fresh database in milliseconds between reruns, take it down; and see which projects and tests
flipped lately. The library side is :mod:`e2e_infra.run.up` and :mod:`e2e_infra.report.history`.
"""

from __future__ import annotations

import sys
from typing import Any

from invoke.context import Context
from invoke.tasks import task

import e2e_infra

from ._output import JSON_HELP, cli, emit_json, int_arg, load, print_table, seconds_arg

__all__ = ["LOOP_TASKS", "up_summary"]


@task(
    name="up",
    help={
        "project": "the project whose environment to keep up, e.g. auth_tests",
        "seed": "the seed profile of its database (default: the project's)",
        "restart": "start a server that dies again (at most 3 times a minute)",
        "hours": "release everything after this many hours at the latest (default 12)",
    },
)
@cli
def e2e_up(
    c: Context, project: str, seed: str = "", restart: bool = False, hours: str = "12"
) -> None:
    """Keep a project's ports, database and servers up for reruns, until Ctrl-C or e2e.down.

    Prints the environment its suite would get and writes it to e2e-results/up/<project>.env;
    a server that dies is named at once (and started again with --restart).
    """
    from ..run.up import keep_up

    limit = seconds_arg("hours", hours, unit="h") / 3600
    keep_up(load(), project, seed=seed or None, restart=restart, hours=limit)


@task(name="down", help={"project": "the project kept up by `invoke e2e.up`"})
@cli
def e2e_down(c: Context, project: str) -> None:
    """Take a project's environment down (from any shell): its servers, database and ports."""
    from ..run.up import take_down

    print(take_down(load(), project))


@task(name="env", help={"project": "the project kept up by `invoke e2e.up`", "json": JSON_HELP})
@cli
def e2e_env(c: Context, project: str, json_: bool = False) -> None:
    """Print `export ...` lines for a project kept up: eval "$(invoke e2e.env auth_tests)".

    The values include DATABASE_URL with its password: handing it over is the point.
    """
    from ..run.up import export_lines, live_up

    config = load()
    state = live_up(config, project)
    if json_:
        emit_json(
            {
                "project": project,
                "pid": state.pid,
                "env": dict(state.env),
                "ports": dict(state.ports),
                "database": state.database,
                "env_file": str(config.layout.up_env(project)),
            }
        )
        return
    sys.stdout.write(export_lines(state.env))


@task(name="reset", help={"project": "the project kept up by `invoke e2e.up`", "json": JSON_HELP})
@cli
def e2e_reset(c: Context, project: str, json_: bool = False) -> None:
    """Give a project kept up a fresh database (same name and URL); its servers keep running."""
    from ..run.up import live_up, reset_up

    config = load()
    state = live_up(config, project)
    workspace = e2e_infra.Workspace(config)
    try:
        report = reset_up(config, state, workspace)
        if json_:
            emit_json(report.to_json())
        else:
            print(f"{report.line()}; the servers kept running", flush=True)
    finally:
        workspace.close()  # waits for the warm spare of the next reset


@task(
    name="flaky",
    help={
        "runs": "how many of each project's last runs to look at (default 10)",
        "json": JSON_HELP,
    },
)
@cli
def e2e_flaky(c: Context, runs: str = "10", json_: bool = False) -> None:
    """List the projects and tests that flipped (failed and passed) in their last N runs."""
    from ..report.history import flaky_report

    count = int_arg("runs", runs, minimum=1)
    report = flaky_report(load(), runs=count)
    if json_:
        emit_json(report.to_json())
        return
    if not report.projects and not report.tests:
        print(f"nothing flipped in the last {count} run(s) of any project")
        return
    if report.projects:
        print_table(
            f"projects that flipped in their last {count} run(s) (oldest first: ✓ passed, "
            "~ flaky, ✗ failed, E error)",
            ["project", "history", "flips", "flaky runs"],
            [
                [
                    item.project,
                    item.rich_strip(),
                    str(item.flips),
                    str(sum(1 for r in item.runs if r.result is e2e_infra.Result.FLAKY)),
                ]
                for item in report.projects
            ],
        )
    if report.tests:
        print_table(
            "tests that flipped",
            ["project", "test", "failed", "passed", "flaky", "last"],
            [
                [t.project, t.name, str(t.failed), str(t.passed), str(t.flaky), t.last]
                for t in report.tests
            ],
        )


def up_summary(config: e2e_infra.Config, project: str) -> dict[str, Any] | None:
    """What ``e2e.list`` says of a project kept up (None: it is not)."""
    from ..run.up import read_up

    state = read_up(config, project)
    if state is None or not state.alive():
        return None
    return {
        "pid": state.pid,
        "since": state.started_at,
        "until": state.until,
        "ports": dict(state.ports),
        "database": state.database,
        "servers": {name: bool(info.get("alive")) for name, info in state.servers.items()},
        "env_file": str(config.layout.up_env(project)),
    }


def up_text(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "-"
    dead = [name for name, alive in summary["servers"].items() if not alive]
    ports = ", ".join(f"{name} {port}" for name, port in summary["ports"].items())
    return f"up (pid {summary['pid']}; {ports})" + (f"; {', '.join(dead)} died" if dead else "")


LOOP_TASKS = (e2e_up, e2e_down, e2e_env, e2e_reset, e2e_flaky)
