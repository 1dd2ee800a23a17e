"""``invoke e2e.*``: run projects (one, all, affected), list, clean up, plan CI shards, doctor."""

from __future__ import annotations

import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

import e2e_infra

from ..processes.interrupts import Interrupts, signals_deferred
from ._output import (
    JSON_HELP,
    cli,
    console,
    emit_json,
    exit_code,
    int_arg,
    load,
    print_run_report,
    print_table,
    print_tail,
    size,
)
from .loop import LOOP_TASKS


def _for_run(config: e2e_infra.Config) -> e2e_infra.Config:
    """The config of a new run: E2E_RUN_ID if set, else a fresh id (results in its folder)."""
    return config.for_run(config.run or config.run_id or e2e_infra.new_run_id())


def _run_projects(
    config: e2e_infra.Config,
    projects: list[str],
    jobs: str,
    dry_run: bool = False,
    in_order: bool = False,
) -> list[str]:
    """Run ``projects`` in parallel with a live status; summary, JUnit, report.html. Returns the
    projects that did not pass.

    ``--jobs auto``: from the cores and the memory against the projects' recorded peaks
    (:mod:`e2e_infra.parallel.jobs`), said in one line; ``dry_run`` prints it and the plan only.
    They start longest first (by recorded duration; never timed ones first), on a pool of warm
    workers (:mod:`e2e_infra.parallel.pool`); each one's
    output goes to ``<run>/<project>.output.log``. Without the live table (a pipe, CI) it is
    printed as one block when the project ends, as ``nox -j`` does; with it, only a failed
    project's last lines are, after the summary.
    """
    from ..parallel.pool import Outcome, ProjectPool
    from ..results.durations import longest_first

    if jobs != "auto" and not (jobs.isdigit() and int(jobs) > 0):
        raise e2e_infra.UsageError(f"--jobs must be a positive number or auto, got {jobs!r}")
    if not in_order:  # the tail of a run is its longest project's
        projects = longest_first(config, projects)
    if jobs == "auto" or dry_run:
        jobs = _choose_jobs(config, projects, jobs, dry_run, in_order)
        if dry_run:
            return []
    started = time.time()
    config = _for_run(config)
    config.layout.make_run_dir()  # a link planted there, a full disk: one line, nothing written
    _prepare(config)  # the run's prepare steps, once, before any project
    live = e2e_infra.use_live_display(sys.stderr)
    printing = threading.Lock()

    def print_block(outcome: Outcome) -> None:
        output = outcome.output
        body = output.read_text(encoding="utf-8", errors="replace").rstrip("\n") if output else ""
        lines = [f"== e2e-{outcome.project}: {outcome.result} ==", body, *outcome.logs]
        lines += [f"error: {outcome.error}"] if outcome.error else []
        with printing:
            print("\n".join(line for line in lines if line), file=sys.stderr, flush=True)

    pool = ProjectPool(config, int(jobs), on_finished=None if live else print_block)
    done = threading.Event()
    outcomes: list[Outcome] = []
    failures: list[e2e_infra.E2EInfraError] = []

    def work() -> None:
        try:
            outcomes.extend(pool.run(projects))
        except e2e_infra.E2EInfraError as exc:  # raised again in this thread, after the join
            failures.append(exc)
        finally:
            done.set()

    # The live table in this (main) thread; the pool waits in another, so that a Ctrl-C reaches
    # this thread, which stops the pool (see ProjectPool) and waits for it to release.
    runner = threading.Thread(target=work, name="e2e-infra pool", daemon=True)
    try:
        with Interrupts().installed():  # SIGTERM and SIGHUP stop the run as Ctrl-C does
            runner.start()
            e2e_infra.follow_run(config, projects, started, done.is_set, live=live, file=sys.stderr)
            runner.join()
    except (KeyboardInterrupt, e2e_infra.Interrupted):
        with signals_deferred():  # a second Ctrl-C must not cut the release short
            pool.interrupt()
            runner.join(timeout=pool.grace + 5.0)
            _summarize(config, started, projects)
        raise
    if failures:
        raise failures[0]
    runs = _summarize(config, started, projects)
    failed = [run.project for run in runs if not run.passed]
    if live:  # the summary showed a failed suite's console tail; the rest ended before one
        shown = {run.project for run in runs if run.suite_log}
        for outcome in outcomes:
            if not outcome.passed and outcome.output is not None and outcome.project not in shown:
                print_tail(outcome.project, outcome.output)
    missing = [p for p in projects if p not in {run.project for run in runs}]
    return sorted({*failed, *missing})


def _prepare(config: e2e_infra.Config) -> None:
    """Run the prepare steps (once per run; each session finds them done); one line per step.
    A failure writes report.html (its step, its log) and raises: no project runs."""
    from ..run.prepare import ensure_prepared, read_prepared

    try:
        ensure_prepared(config)
    except e2e_infra.PrepareError:
        config.layout.point_latest()  # no project claimed the run: latest is this run still
        e2e_infra.write_html_report(config, [])
        raise
    finally:
        record = read_prepared(config)
        for step in record.steps if record is not None else ():
            took = f" in {step.seconds:.2f}s" if step.seconds else ""
            print(f"prepare {step.name}: {step.reason}{took}", file=sys.stderr)


def _summarize(
    config: e2e_infra.Config, started: float, projects: list[str] | None = None
) -> list[e2e_infra.RunRecord]:
    """The run's summary, merged JUnit, Playwright report and report.html; its records (a
    project whose process died without a record gets one naming it first)."""
    from ..report.progress import vanished

    vanished(config, projects if projects is not None else list(config.projects))
    runs = e2e_infra.collect_runs(config, since=started, projects=projects)
    print_run_report(config, runs)
    return runs


def _choose_jobs(
    config: e2e_infra.Config, projects: list[str], jobs: str, dry_run: bool, in_order: bool
) -> str:
    from ..parallel.jobs import jobs_for

    choice = jobs_for(config, projects)
    lines = choice.plan() if dry_run else [choice.reason]
    if dry_run:
        how = (
            "as given (--in-order)"
            if in_order
            else "the longest recorded first (never timed ones before them)"
        )
        lines.append(f"start order, {how}: " + ", ".join(projects))
    if jobs != "auto":
        lines[0] = f"jobs {jobs} (--jobs); auto would choose {lines[0]}"
    print(
        "\n".join(f"e2e-infra: {line}" if i == 0 else line for i, line in enumerate(lines)),
        file=sys.stdout if dry_run else sys.stderr,
    )
    return jobs if jobs != "auto" else str(choice.jobs)


@task(
    name="run",
    auto_shortflags=False,  # so that `-k` is never taken for --keep
    help={
        "project": "the project to run, e.g. auth_tests",
        "args": 'extra arguments for the suite, e.g. "-k login"',
        "keep": "keep the database if the suite fails (E2E_KEEP_ON_FAILURE=1); see db.url",
        "attach": "run the suite against the environment `invoke e2e.up` keeps, its database "
        "reset first",
        "no-reset": "with --attach: keep the database as it is",
        "retries": "run a project that did not pass again, on fresh resources, up to N times "
        "(default: the project's retries setting)",
    },
)
@cli
def e2e_run(
    c: Context,
    project: str,
    args: str = "",
    keep: bool = False,
    attach: bool = False,
    no_reset: bool = False,
    retries: str = "",
) -> None:
    """Run one E2E project: its own ports, database and servers, then its suite."""
    from ..run.retries import with_retries

    tries = int_arg("retries", retries) if retries else None
    config = _for_run(load())
    config.project(project)
    if not attach and no_reset:
        raise e2e_infra.UsageError("--no-reset goes with --attach")
    if attach and (keep or tries is not None):
        raise e2e_infra.UsageError(
            "--keep and --retries do not go with --attach: the environment kept up is not "
            "fresh, and its database stays until `invoke e2e.down`"
        )
    config.layout.make_run_dir()  # a link planted there, a full disk: one line, nothing written
    try:
        suite_args = shlex.split(args)
    except ValueError as exc:
        raise e2e_infra.UsageError(f"--args {args!r} cannot be split: {exc}") from None
    if attach:
        from ..run.attach import run_attached

        result = run_attached(config, project, suite_args, reset=not no_reset)
    else:
        config = with_retries(config, tries)
        result = e2e_infra.run_project(config, project, suite_args, keep_on_failure=keep or None)
    print_run_report(config, e2e_infra.collect_runs(config, since=result.started_at))
    if not result.passed:
        detail = f": {result.error}" if result.error else ""
        raise Exit(f"error: {project} {result.result}{detail}", code=exit_code(result.returncode))


@task(
    name="all",
    help={
        "jobs": "how many projects at once: a number or auto (from the cores and the memory the "
        "projects' recorded peaks need); default auto",
        "dry-run": "print the parallelism chosen, why, and the projects; run nothing",
        "projects": "comma-separated projects to run instead of all (an empty list is an error)",
        "shard": "run only shard i of N (e.g. 2/3) of the plan e2e.matrix saved, or of a new one "
        "from the recorded durations; CI passes each shard's --projects instead",
        "retries": "run a project that did not pass again, on fresh resources, up to N times "
        "(default: each project's retries setting)",
        "in-order": "start the projects in the order given (or configured) instead of the "
        "longest recorded first",
    },
)
@cli
def e2e_all(
    c: Context,
    jobs: str = "auto",
    projects: str | None = None,
    shard: str = "",
    dry_run: bool = False,
    retries: str = "",
    in_order: bool = False,
) -> None:
    """Run every E2E project in parallel, with a live status; then a summary.

    The projects run on a pool of warm worker processes, each taking one after another (no
    interpreter per project).
    """
    from ..plan.matrix import parse_projects
    from ..run.retries import with_retries

    config = with_retries(load(), int_arg("retries", retries) if retries else None)
    # None: --projects not given (all); "" given explicitly is refused, never taken for "all".
    selected = parse_projects(projects) if projects is not None else None
    for name in selected or ():
        config.project(name)
    chosen = selected if selected is not None else list(config.projects)
    if shard:
        index, total = e2e_infra.parse_shard(shard)
        chosen = list(e2e_infra.shard_projects(config, index, total, chosen))
        print(f"shard {index}/{total}: {', '.join(chosen) or 'no projects'}", file=sys.stderr)
    if not chosen:
        print("no projects to run", file=sys.stderr)
        return
    failed = _run_projects(config, chosen, jobs, dry_run, in_order=in_order)
    if failed:
        what = f"{len(failed)} of {len(chosen)} projects did not pass: {', '.join(failed)}"
        raise Exit(f"error: {what}", code=1)


@task(
    name="list",
    help={"json": JSON_HELP, "runs": "how many of each project's last runs to show (default 10)"},
)
@cli
def e2e_list(c: Context, json_: bool = False, runs: str = "10") -> None:
    """List the configured E2E projects: servers, database, last results, which are up."""
    from ..report.history import history
    from .loop import up_summary, up_text

    count = int_arg("runs", runs, minimum=1)
    config = load()
    last = {run.project: run for run in e2e_infra.collect_runs(config)}
    rows: list[dict[str, Any]] = []
    histories = {name: history(config, name, count) for name in config.projects}
    for name, project in config.projects.items():
        run = last.get(name)
        rows.append(
            {
                "project": name,
                "servers": list(project.servers),
                "database": project.database,
                "seed": project.seed if project.database else None,
                "nox_session": f"e2e-{name}",
                "last_result": run.result.label if run else None,
                "last_duration": round(run.duration, 3) if run else None,
                "history": histories[name].to_json(),
                "flips": histories[name].flips,
                "up": up_summary(config, name),
            }
        )
    if json_:
        emit_json({"projects": rows})
        return
    print_table(
        f"E2E projects (history: the last {count} runs, oldest first: ✓ passed, ~ flaky, "
        "✗ failed, E error)",
        ["project", "servers", "database", "last result", "history", "trend", "up"],
        [
            [
                row["project"],
                ", ".join(row["servers"]) or "-",
                row["seed"] or "none",
                f"{row['last_result']} ({row['last_duration']}s)" if row["last_result"] else "-",
                histories[row["project"]].rich_strip() or "-",
                histories[row["project"]].trend,
                up_text(row["up"]),
            ]
            for row in rows
        ],
    )


@task(name="cleanup", help={"json": JSON_HELP})
@cli
def e2e_cleanup(c: Context, json_: bool = False) -> None:
    """Reclaim everything stale on this host: orphan server groups, databases, ports, the
    cluster folders of checkouts that are gone (when their server is not running), and run
    folders beyond keep_runs / keep_run_days."""
    from ..postgres.folders import remove_orphans, scan_cluster_folders
    from ..report.retention import prune_runs

    config = load()
    report = e2e_infra.reclaim(config)
    clusters, cluster_errors = remove_orphans(scan_cluster_folders())
    report.errors.extend(cluster_errors)
    runs = prune_runs(config)
    if json_:
        emit_json(
            {
                **report.to_json(),
                "clusters": [f.to_json() for f in clusters],
                "runs": [str(folder) for folder in runs],
            }
        )
    else:
        rows = [
            [kind, what, why]
            for kind, items in (
                ("server", report.servers),
                ("database", report.databases),
                ("port", report.ports),
                ("cluster", [(str(f.path), f"{f.why}; {size(f.size)} freed") for f in clusters]),
                ("run", [(str(folder), "beyond keep_runs / keep_run_days") for folder in runs]),
            )
            for what, why in items
        ]
        if rows:
            print_table(f"reclaimed {len(rows)} item(s)", ["kind", "what", "why"], rows)
        else:
            print("nothing stale to reclaim")
    for error in report.errors:
        print(f"warning: {error}", file=sys.stderr)
    if report.errors:
        raise Exit(code=1)


@task(
    name="affected",
    help={
        "base": "compare from this revision (default: the merge-base of --head with the "
        "remote's default branch; none: every project)",
        "head": "compare up to this revision (default HEAD)",
        "json": "print the affected projects and why as one JSON document; run nothing",
        "dry-run": "show the affected projects and why; run nothing",
        "jobs": "how many projects at once: a number or auto; default auto",
        "pre-push": "read git's pre-push lines ('<local ref> <sha> <remote ref> <sha>') on stdin",
        "remote": "the remote pushed to (its default branch is the base of a new branch)",
    },
)
@cli
def e2e_affected(
    c: Context,
    base: str = "",
    head: str = "",
    json_: bool = False,
    dry_run: bool = False,
    jobs: str = "auto",
    pre_push: bool = False,
    remote: str = "origin",
) -> None:
    """Run the projects a change affects: their paths changed, or migrations/seeds, or the tool."""
    config = load()
    repo = config.root
    remote = remote or "origin"
    if pre_push:
        if base or head:
            raise e2e_infra.UsageError(
                "--pre-push reads the revisions on stdin: drop --base/--head"
            )
        refs = e2e_infra.parse_pre_push(sys.stdin.read())
        ranges, everything = e2e_infra.push_ranges(repo, refs, remote)
        if not ranges:
            print("e2e-infra: this push sends no commits (deleted refs only)", file=sys.stderr)
            return
    else:
        head = head or "HEAD"
        start = base or e2e_infra.default_branch_base(repo, head, remote)
        ranges, everything = [(start, head)], None
    found = e2e_infra.affected_by_ranges(config, repo, ranges, everything)
    if json_:
        emit_json(found.to_json())
        return
    out = sys.stderr if not dry_run else sys.stdout
    if not found.projects:
        print(f"e2e-infra: no project affected ({len(found.changed)} file(s) changed)", file=out)
        return
    print(f"e2e-infra: {len(found.projects)} project(s) affected:", file=out)
    for name in found.projects:
        reasons = found.reasons.get(name, ())
        shown = ", ".join(reasons[:3]) + (
            f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
        )
        print(f"  {name}: {shown}", file=out)
    if dry_run:
        return
    failed = _run_projects(config, list(found.projects), jobs)
    if failed:
        hint = " (push aborted; E2E_SKIP=1 git push to skip)" if pre_push else ""
        raise Exit(f"error: affected E2E projects failed: {', '.join(failed)}{hint}", code=1)


@task(
    name="matrix",
    help={
        "shards": "how many CI jobs to spread the projects over (default 2)",
        "json": 'print the GitHub Actions matrix {"include": [...]} as one JSON document '
        "(shards with no project left out)",
    },
)
@cli
def e2e_matrix(c: Context, shards: str = "2", json_: bool = False) -> None:
    """Spread the projects over N CI shards by their recorded durations (longest first)."""
    from ..plan.matrix import save_plan
    from ..results.durations import durations_for_plan

    count = int_arg("shards", shards, minimum=1)
    config = load()
    names = list(config.projects)
    durations = durations_for_plan(config, names)
    plan = e2e_infra.plan_shards(names, durations, count)
    save_plan(config, plan)  # what `e2e.all --shard i/N` follows here from now on
    if json_:
        # Each entry's "projects" is what its job passes to `e2e.all --projects`; a job with an
        # empty list would be refused, so empty shards are not jobs at all.
        emit_json({"include": [shard.to_json() for shard in plan if shard.projects]})
        return
    unknown = [name for name in names if name not in durations]
    print_table(
        f"{len(names)} project(s) over {count} shard(s) "
        f"(run each with: invoke e2e.all --projects <its projects>, or --shard i/{count})",
        ["shard", "projects", "estimate"],
        [[s.label, ", ".join(s.projects) or "-", f"{s.estimate:.1f}s"] for s in plan],
    )
    if unknown:
        print(f"no recorded duration yet (median assumed): {', '.join(unknown)}")


@task(name="doctor", help={"json": JSON_HELP})
@cli
def e2e_doctor(c: Context, json_: bool = False) -> None:
    """Check binaries, PostgreSQL, ports, registry, stale leases, free ports: what to fix."""
    try:
        config = load()
    except e2e_infra.ConfigError as exc:
        report = e2e_infra.DoctorReport(
            (e2e_infra.Check("config", "fail", exc.one_line(), "fix the configuration"),)
        )
    else:
        report = e2e_infra.run_doctor(config)
    if json_:
        emit_json(report.to_json())
    else:
        from rich import box
        from rich.table import Table

        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        table = Table("", "check", "detail", "fix", box=box.SIMPLE_HEAD)
        for check in report.checks:
            table.add_row(
                marks.get(check.status, check.status), check.name, check.detail, check.fix
            )
        out = console()
        out.print(table)
        verdict = (
            f"{len(report.failures)} problem(s) to fix"
            if report.failures
            else f"ready ({len(report.warnings)} warning(s))"
        )
        out.print(verdict, markup=False)
    if report.exit_code:
        raise Exit(code=report.exit_code)


@task(
    name="init",
    help={
        "dry-run": "print what would be written; write nothing",
        "root": "the repository to set up (default: the current folder)",
    },
)
@cli
def e2e_init(c: Context, dry_run: bool = False, root: str = "") -> None:
    """Set up a repository: tasks.py, noxfile.py, [tool.e2e_infra], .env.example, .gitignore."""
    from .. import scaffold

    where = Path(root or ".").resolve()
    changes = scaffold.plan(where)
    for change in changes:
        verb = {"create": "create", "append": "append to", "skip": "skip"}[change.action]
        prefix = "would " if dry_run and change.writes else ""
        print(f"{prefix}{verb} {change.path.relative_to(where)}: {change.why}")
        if dry_run and change.writes:
            print("".join(f"    {line}\n" for line in change.text.strip("\n").splitlines()))
        for line in change.advice.splitlines():
            print(f"  note: {line}")
        if dry_run and change.suggested:
            print("".join(f"    {line}\n" for line in change.suggested.strip("\n").splitlines()))
    if dry_run:
        return
    scaffold.apply(changes)
    if any(change.writes for change in changes):
        print("next: edit [tool.e2e_infra] in pyproject.toml, then `e2e-infra e2e.doctor`")
    else:
        print("nothing to do: this repository is set up already")


e2e = Collection(
    "e2e",
    e2e_run,
    e2e_all,
    e2e_list,
    e2e_cleanup,
    e2e_affected,
    e2e_matrix,
    e2e_doctor,
    e2e_init,
    *LOOP_TASKS,  # up, down, env, reset, flaky: see cli/loop.py
)
