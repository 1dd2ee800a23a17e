"""invoke tasks for e2e-infra: ``invoke --list`` shows them all.

Thin adapters: each task parses its arguments, calls the ``e2e_infra`` library and prints the
result (a table for people, one JSON document with ``--json``). Errors from the library become one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from invoke import Collection, Context, task
from invoke.exceptions import Exit

import e2e_infra

F = TypeVar("F", bound=Callable[..., Any])


# --- plumbing shared by every namespace ---------------------------------------------------------


def _setup_logging() -> None:
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
        _setup_logging()
        try:
            return fn(c, *args, **kwargs)
        except e2e_infra.E2EInfraError as exc:
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


def _exit_code(returncode: int | None) -> int:
    """A process exit status for a child's return code (-N, killed by signal N: 128 + N)."""
    if not returncode:
        return 1
    return 128 - returncode if returncode < 0 else min(returncode, 255)


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout, and nothing else there."""
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def load() -> e2e_infra.Config:
    return e2e_infra.load_config()


# --- ports ----------------------------------------------------------------------------------------

_OWNER_HELP = (
    "pid of the live process that uses the ports; default E2E_OWNER_PID, else the process that "
    "ran invoke (your shell or script). The lease lasts while that process lives"
)


def _port_allocator(config: e2e_infra.Config) -> e2e_infra.PortAllocator:
    registry = e2e_infra.make_registry(config)
    return e2e_infra.PortAllocator.from_config(config, registry)


def _cli_owner(config: e2e_infra.Config, owner_pid: int) -> e2e_infra.Owner:
    # invoke exits as soon as it has printed, so the lease belongs to whoever asked: its parent.
    # Without E2E_RUN_ID the run id is fixed per owner, so asking again returns the same ports.
    pid = owner_pid or config.owner_pid or os.getppid()
    run_id = config.run_id or f"cli-{pid}"
    try:
        return e2e_infra.Owner.of_pid(pid, host=config.host_id, run_id=run_id)
    except e2e_infra.RegistryError:
        raise e2e_infra.UsageError(
            f"owner process {pid} is not running; pass --owner-pid (or E2E_OWNER_PID) with the pid "
            "of the live process that will use the ports"
        ) from None


def _port_names(config: e2e_infra.Config, names: str) -> list[str]:
    if not names.strip():
        return list(config.port_names)
    wanted = [e2e_infra.validate_name(name.strip(), "port") for name in names.split(",")]
    for name in wanted:
        if name not in config.port_names:
            raise e2e_infra.UsageError(
                f"unknown port name {name!r}: the configured port names are "
                f"{', '.join(config.port_names)} (port_names in {config.source})"
            )
    return wanted


def _lease_json(lease: e2e_infra.Lease, now: float) -> dict[str, Any]:
    return {
        "port": int(lease.resource) if lease.resource.isdigit() else lease.resource,
        "name": lease.data.get("name"),
        "project": lease.project,
        "owner_pid": lease.owner.pid,
        "host": lease.owner.host,
        "run_id": lease.owner.run_id,
        "created_at": lease.created_at,
        "age_seconds": round(max(0.0, now - lease.created_at), 1),
    }


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    # rich is imported where it prints, not with the module: `invoke --list` does not need it.
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=box.SIMPLE_HEAD)
    for row in rows:
        table.add_row(*row)
    # Not a terminal (a pipe, CI logs): a fixed wide page instead of folding run ids at 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(title, markup=False)
    console.print(table)


def _lease_row(lease: e2e_infra.Lease) -> list[str]:
    return [lease.resource, str(lease.data.get("name", "?")), lease.project, str(lease.owner.pid)]


@task(
    help={
        "project": "project name: [a-z][a-z0-9_]{0,39}",
        "names": "comma-separated port names (default: all port_names of the config)",
        "json": "print one JSON document on stdout",
        "owner-pid": _OWNER_HELP,
    }
)
@cli
def allocate(
    c: Context, project: str = "", names: str = "", json_: bool = False, owner_pid: int = 0
) -> None:
    """Lease a free port per port name for a project; asking again returns the same ports."""
    if not project:
        raise e2e_infra.UsageError("pass --project NAME, e.g. --project auth_tests")
    e2e_infra.validate_project_name(project)
    config = load()
    wanted = _port_names(config, names)
    owner = _cli_owner(config, owner_pid)
    got = _port_allocator(config).allocate(project, wanted, owner)
    if json_:
        document = {"project": project, "ports": got, "run_id": owner.run_id}
        emit_json({**document, "owner_pid": owner.pid})
        return
    _print_table(
        f"ports of {project} (owner pid {owner.pid}, run {owner.run_id})",
        ["name", "port"],
        [[name, str(port)] for name, port in got.items()],
    )


@task(
    help={
        "project": "release this project's port leases, whoever owns them",
        "all": "release every port lease",
        "json": "print one JSON document on stdout",
    }
)
@cli
def release(c: Context, project: str = "", all_: bool = False, json_: bool = False) -> None:
    """Release a project's port leases (--project NAME) or all of them (--all); idempotent."""
    if bool(project) == all_:
        raise e2e_infra.UsageError("pass either --project NAME or --all")
    if project:
        e2e_infra.validate_project_name(project)
    allocator = _port_allocator(load())
    released = allocator.release_all() if all_ else allocator.release(project)
    if json_:
        now = time.time()
        emit_json({"released": [_lease_json(lease, now) for lease in released]})
    elif not released:
        print(f"no port leases to release{f' for project {project}' if project else ''}")
    else:
        _print_table(
            f"released {len(released)} port lease(s)",
            ["port", "name", "project", "owner pid"],
            [_lease_row(lease) for lease in released],
        )


@task(name="list", help={"json": "print one JSON document on stdout"})
@cli
def list_(c: Context, json_: bool = False) -> None:
    """Show the port leases: port, name, project, owner pid, host, run id, age, live or stale."""
    leases = _port_allocator(load()).leases_with_status()
    now = time.time()
    if json_:
        emit_json(
            {
                "leases": [
                    {
                        **_lease_json(lease, now),
                        "status": "live" if reason is None else "stale",
                        "stale_reason": reason,
                    }
                    for lease, reason in leases
                ]
            }
        )
    elif not leases:
        print("no port leases")
    else:
        _print_table(
            f"{len(leases)} port lease(s)",
            ["port", "name", "project", "owner pid", "host", "run id", "age", "status"],
            [
                [
                    *_lease_row(lease),
                    lease.owner.host,
                    lease.owner.run_id,
                    _age(max(0.0, now - lease.created_at)),
                    "live" if reason is None else f"stale: {reason}",
                ]
                for lease, reason in leases
            ],
        )


@task(help={"json": "print one JSON document on stdout"})
@cli
def cleanup(c: Context, json_: bool = False) -> None:
    """Reclaim port leases whose owner process is gone, and say why each was reclaimed."""
    reclaimed = _port_allocator(load()).reclaim_stale()
    now = time.time()
    if json_:
        emit_json(
            {"reclaimed": [{**_lease_json(lease, now), "reason": why} for lease, why in reclaimed]}
        )
    elif not reclaimed:
        print("no stale port leases")
    else:
        _print_table(
            f"reclaimed {len(reclaimed)} stale port lease(s)",
            ["port", "name", "project", "owner pid", "why"],
            [[*_lease_row(lease), why] for lease, why in reclaimed],
        )


ports = Collection("ports", allocate, release, list_, cleanup)

# --- pg -------------------------------------------------------------------------------------------


def _local_cluster(config: e2e_infra.Config) -> e2e_infra.LocalCluster:
    registry = e2e_infra.make_registry(config)
    return e2e_infra.LocalCluster(
        config, registry, e2e_infra.PortAllocator.from_config(config, registry)
    )


def _print_cluster(status: e2e_infra.ClusterStatus) -> None:
    rows = [
        ["running", "yes" if status.running else "no"],
        ["pid", str(status.pid or "-")],
        ["port", str(status.port or "-")],
        ["data dir", str(status.data_dir)],
        ["socket dir", str(status.socket_dir)],
        ["version", status.version or "?"],
        ["user", status.user],
        ["url", status.url or "-"],  # masked
    ]
    _print_table("local PostgreSQL cluster", ["field", "value"], rows)


def _external(config: e2e_infra.Config) -> dict[str, Any] | None:
    """Reachability of the configured admin URL, or None when the embedded cluster is used."""
    info = config.database.admin_url
    if info is None:
        return None
    try:
        e2e_infra.check_reachable(info)
    except e2e_infra.ServerUnreachableError as exc:
        return {"external": True, "running": False, "url": info.masked, "error": exc.one_line()}
    return {"external": True, "running": True, "url": info.masked, "error": None}


@task(name="start")
@cli
def pg_start(c: Context) -> None:
    """Start the local PostgreSQL cluster (initialise it on first use); print its status."""
    config = load()
    external = _external(config)
    if external is not None:
        if external["error"]:
            raise e2e_infra.ServerUnreachableError(external["error"], url=external["url"])
        print(f"the admin URL is external ({external['url']}), and reachable: nothing to start")
        return
    _print_cluster(_local_cluster(config).start())


@task(name="stop")
@cli
def pg_stop(c: Context) -> None:
    """Stop the local PostgreSQL cluster (fast, then immediate, then SIGKILL); idempotent."""
    config = load()
    if config.database.admin_url is not None:
        print(f"the admin URL is external ({config.database.admin_url.masked}): nothing to stop")
        return
    cluster = _local_cluster(config)
    if cluster.stop():
        print(f"stopped the local PostgreSQL cluster in {cluster.data_dir}")
    else:
        print(f"the local PostgreSQL cluster in {cluster.data_dir} was not running")


@task(name="status", help={"json": "print one JSON document on stdout"})
@cli
def pg_status(c: Context, json_: bool = False) -> None:
    """Show whether PostgreSQL runs (the local cluster, or the external admin URL); exit 0."""
    config = load()
    external = _external(config)
    if external is not None:
        if json_:
            emit_json(external)
        else:
            state = "reachable" if external["running"] else f"NOT reachable: {external['error']}"
            print(f"external PostgreSQL at {external['url']}: {state}")
        return
    status = _local_cluster(config).status()
    if json_:
        emit_json({**status.to_json(), "external": False})
    else:
        _print_cluster(status)


pg = Collection("pg", pg_start, pg_stop, pg_status)

# --- db -------------------------------------------------------------------------------------------


def _db_allocator(config: e2e_infra.Config) -> e2e_infra.DatabaseAllocator:
    registry = e2e_infra.make_registry(config)
    ports_ = e2e_infra.PortAllocator.from_config(config, registry)
    return e2e_infra.database_allocator(config, registry, ports_)


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def _project_arg(project: str) -> str:
    if not project:
        raise e2e_infra.UsageError("pass --project NAME")
    return e2e_infra.validate_project_name(project)


def _seed_arg(config: e2e_infra.Config, profile: str) -> str:
    """The seed profile, checked (name and existence) before anything starts a cluster."""
    e2e_infra.seed_runner(config, profile)
    return profile


@task(
    name="allocate",
    help={
        "project": "project name: [a-z][a-z0-9_]{0,39}",
        "seed": "seed profile (default: the project's, else database.default_seed)",
        "json": "print one JSON document on stdout, with the real database_url",
        "owner-pid": _OWNER_HELP.replace("the ports", "the database"),
    },
)
@cli
def db_allocate(
    c: Context, project: str = "", seed: str = "", json_: bool = False, owner_pid: int = 0
) -> None:
    """Clone the template into a database of the project's own (built first if missing)."""
    _project_arg(project)
    config = load()
    owner = _cli_owner(config, owner_pid)
    if seed:
        _seed_arg(config, seed)
    got = _db_allocator(config).allocate(project, owner, seed=seed or None)
    if json_:
        emit_json(
            {
                "project": project,
                "database": got.name,
                "database_url": got.url.url,
                "template": got.template,
                "seed": got.seed,
                "run_id": owner.run_id,
            }
        )
        return
    print(f"database {got.name} for {project} (seed {got.seed}, template {got.template})")
    print(f"  url: {got.url.masked}  (real URL: invoke db.url --project {project})")


@task(
    name="release",
    help={
        "project": "drop this project's databases",
        "all": "drop every database leased in this state folder",
        "keep": "keep them for debugging for database.keep_hours, then db.cleanup drops them",
    },
)
@cli
def db_release(c: Context, project: str = "", all_: bool = False, keep: bool = False) -> None:
    """Drop a project's databases (--project NAME) or all (--all), or --keep them; idempotent."""
    if bool(project) == all_:
        raise e2e_infra.UsageError("pass either --project NAME or --all")
    if project:
        _project_arg(project)  # before _db_allocator, which may start the local cluster
    allocator = _db_allocator(load())
    names = allocator.release_all(keep=keep) if all_ else allocator.release(project, keep=keep)
    if not names:
        print(f"no databases to release{f' for project {project}' if project else ''}")
    for name in names:
        if keep:
            url = allocator.client.with_dbname(name).masked
            hours = allocator.config.database.keep_hours
            print(f"kept {name} for {hours:g}h: {url}")
        else:
            print(f"dropped {name}")


@task(name="list", help={"json": "print one JSON document on stdout"})
@cli
def db_list(c: Context, json_: bool = False) -> None:
    """Show e2e databases and templates: kind, project, size, lease status, owner, run, expiry."""
    infos = _db_allocator(load()).list()
    if json_:
        emit_json({"databases": [dataclasses.asdict(info) for info in infos]})
        return
    if not infos:
        print("no e2e databases")
        return
    now = time.time()
    _print_table(
        f"{len(infos)} e2e database(s)",
        ["name", "kind", "project", "seed", "size", "owner pid", "run id", "age", "status"],
        [
            [
                info.name,
                info.kind,
                info.project or "-",
                info.seed or "-",
                _size(info.size),
                str(info.owner_pid or "-"),
                info.run_id or "-",
                _age(max(0.0, now - info.created_at)) if info.created_at else "-",
                info.status,
            ]
            for info in infos
        ],
    )


@task(name="cleanup", help={"json": "print one JSON document on stdout"})
@cli
def db_cleanup(c: Context, json_: bool = False) -> None:
    """Drop marked databases whose owner is gone or whose keep expired, and old templates."""
    dropped = _db_allocator(load()).cleanup()
    if json_:
        emit_json({"dropped": [{"database": name, "reason": why} for name, why in dropped]})
    elif not dropped:
        print("nothing to drop")
    else:
        for name, why in dropped:
            print(f"dropped {name}: {why}")


@task(name="migrate", help={"project": "the project whose live database to migrate"})
@cli
def db_migrate(c: Context, project: str = "") -> None:
    """Apply pending migrations to a project's live database."""
    _project_arg(project)  # before _db_allocator, which may start the local cluster
    got = _db_allocator(load()).migrate(project)
    print(f"migrated {got.name}")


@task(
    name="seed",
    help={"project": "the project whose live database to seed", "seed": "the seed profile"},
)
@cli
def db_seed(c: Context, project: str = "", seed: str = "") -> None:
    """Apply a seed profile (default: the project's) to a project's live database."""
    _project_arg(project)
    config = load()
    known = config.projects.get(project)
    profile = _seed_arg(config, seed or (known.seed if known else config.database.default_seed))
    got = _db_allocator(config).seed(project, profile)
    print(f"seeded {got.name} with {profile}")


@task(
    name="template",
    help={
        "rebuild": "drop and build the template again even if it exists",
        "seed": "seed profile (default: database.default_seed)",
    },
)
@cli
def db_template(c: Context, rebuild: bool = False, seed: str = "") -> None:
    """Build the template of the current migrations and a seed profile, unless it exists."""
    config = load()
    profile = _seed_arg(config, seed or config.database.default_seed)
    name = _db_allocator(config).ensure_template(profile, rebuild=rebuild)
    print(name)


@task(name="url", help={"project": "the project whose database URL to print"})
@cli
def db_url(c: Context, project: str = "") -> None:
    """Print the real URL (with password) of a project's live database, and nothing else."""
    _project_arg(project)  # before _db_allocator, which may start the local cluster
    got = _db_allocator(load()).find(project)
    print(got.url.url)


db = Collection(
    "db", db_allocate, db_release, db_list, db_cleanup, db_migrate, db_seed, db_template, db_url
)
# --- e2e ------------------------------------------------------------------------------------------


def _nox_argv(config: e2e_infra.Config, *extra: str) -> list[str]:
    noxfile = config.root / "noxfile.py"
    if not noxfile.is_file():  # a config outside this checkout (E2E_CONFIG): our own noxfile
        noxfile = Path(__file__).resolve().parent / "noxfile.py"
    return [sys.executable, "-m", "nox", "-f", str(noxfile), *extra]


def _run_projects(config: e2e_infra.Config, projects: list[str], jobs: str) -> int:
    """Run ``projects`` in parallel through nox with a live status; summary, JUnit, report.html.

    The status line per project comes from the ``status.json`` files the nox sessions write. On a
    terminal (and CI unset) nox's own output goes to ``<results>/nox.log`` so the live table stays
    readable; elsewhere it passes through, between plain status lines.
    """
    if jobs != "auto" and not (jobs.isdigit() and int(jobs) > 0):
        raise e2e_infra.UsageError(f"--jobs must be a positive number or auto, got {jobs!r}")
    started = time.time()
    argv = _nox_argv(config, "-j", jobs, "-s", *(f"e2e-{p}" for p in projects))
    env = {**os.environ, "E2E_SUMMARY": "0"}
    live = e2e_infra.use_live_display(sys.stderr)
    log_path = config.results_dir / "nox.log"
    if live:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                argv, cwd=config.root, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
    else:
        proc = subprocess.Popen(argv, cwd=config.root, env=env)
    try:
        e2e_infra.follow_run(
            config, projects, started, lambda: proc.poll() is not None, live=live, file=sys.stderr
        )
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached nox too: let it release everything before we exit.
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
        raise
    code = proc.wait()
    runs = e2e_infra.collect_runs(config, since=started)
    e2e_infra.print_summary(config, runs)
    report = e2e_infra.write_html_report(config, runs)
    print(f"report: {report}", file=sys.stderr)
    if live and code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        print(
            "\n".join(["last lines of nox's output:", *tail, f"(all of it: {log_path})"]),
            file=sys.stderr,
        )
    return code


@task(
    name="run",
    auto_shortflags=False,  # so that `-k` is never taken for --keep
    help={
        "project": "the project to run, e.g. auth_tests",
        "args": 'extra arguments for the suite, e.g. "-k login"',
        "keep": "keep the database if the suite fails (E2E_KEEP_ON_FAILURE=1); see db.url",
    },
)
@cli
def e2e_run(c: Context, project: str, args: str = "", keep: bool = False) -> None:
    """Run one E2E project: its own ports, database and servers, then its suite."""
    config = load()
    config.project(project)
    try:
        suite_args = shlex.split(args)
    except ValueError as exc:
        raise e2e_infra.UsageError(f"--args {args!r} cannot be split: {exc}") from None
    result = e2e_infra.run_project(config, project, suite_args, keep_on_failure=keep or None)
    runs = e2e_infra.collect_runs(config, since=result.started_at)
    e2e_infra.print_summary(config, runs)
    print(f"report: {e2e_infra.write_html_report(config, runs)}", file=sys.stderr)
    if not result.passed:
        detail = f": {result.error}" if result.error else ""
        raise Exit(f"error: {project} {result.result}{detail}", code=_exit_code(result.returncode))


@task(
    name="all",
    help={
        "jobs": "how many projects at once: a number or auto (one per core); default auto",
        "projects": "comma-separated projects to run instead of all",
        "shard": "run only shard i of N (e.g. 2/3), projects spread by their last durations "
        "(see e2e.matrix)",
    },
)
@cli
def e2e_all(c: Context, jobs: str = "auto", projects: str = "", shard: str = "") -> None:
    """Run every E2E project in parallel through nox (-j), with a live status; then a summary."""
    config = load()
    selected = [p.strip() for p in projects.split(",") if p.strip()]
    for name in selected:
        config.project(name)
    chosen = selected or list(config.projects)
    if shard:
        index, total = e2e_infra.parse_shard(shard)
        chosen = list(e2e_infra.shard_projects(config, index, total, chosen))
        print(f"shard {index}/{total}: {', '.join(chosen) or 'no projects'}", file=sys.stderr)
    if not chosen:
        print("no projects to run", file=sys.stderr)
        return
    started = time.time()
    code = _run_projects(config, chosen, jobs)
    if code != 0:
        runs = e2e_infra.collect_runs(config, since=started, projects=chosen)
        failed = sorted({run.project for run in runs if run.result != "passed"})
        what = f"{len(failed)} of {len(chosen)} projects did not pass: {', '.join(failed)}"
        raise Exit(f"error: {what if failed else f'nox exited with {code}'}", code=code)


@task(name="list", help={"json": "print one JSON document on stdout"})
@cli
def e2e_list(c: Context, json_: bool = False) -> None:
    """List the configured E2E projects: servers, database, seed, last result."""
    config = load()
    last = {run.project: run for run in e2e_infra.collect_runs(config)}
    rows = []
    for name, project in config.projects.items():
        run = last.get(name)
        rows.append(
            {
                "project": name,
                "servers": list(project.servers),
                "database": project.database,
                "seed": project.seed if project.database else None,
                "nox_session": f"e2e-{name}",
                "last_result": run.result if run else None,
                "last_duration": round(run.duration, 3) if run else None,
            }
        )
    if json_:
        emit_json({"projects": rows})
        return
    _print_table(
        "E2E projects",
        ["project", "servers", "database", "last result"],
        [
            [
                row["project"],
                ", ".join(row["servers"]) or "-",
                row["seed"] or "none",
                f"{row['last_result']} ({row['last_duration']}s)" if row["last_result"] else "-",
            ]
            for row in rows
        ],
    )


@task(name="cleanup", help={"json": "print one JSON document on stdout"})
@cli
def e2e_cleanup(c: Context, json_: bool = False) -> None:
    """Reclaim everything stale on this host: orphan server groups, databases, ports."""
    report = e2e_infra.reclaim(load())
    if json_:
        emit_json(report.to_json())
    else:
        rows = [
            [kind, what, why]
            for kind, items in (
                ("server", report.servers),
                ("database", report.databases),
                ("port", report.ports),
            )
            for what, why in items
        ]
        if rows:
            _print_table(f"reclaimed {len(rows)} item(s)", ["kind", "what", "why"], rows)
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
    code = _run_projects(config, list(found.projects), jobs)
    if code != 0:
        hint = " (push aborted; E2E_SKIP=1 git push to skip)" if pre_push else ""
        raise Exit(f"error: affected E2E projects failed{hint}", code=code)


@task(
    name="matrix",
    help={
        "shards": "how many CI jobs to spread the projects over (default 2)",
        "json": 'print the GitHub Actions matrix {"include": [...]} as one JSON document',
    },
)
@cli
def e2e_matrix(c: Context, shards: int = 2, json_: bool = False) -> None:
    """Spread the projects over N CI shards by their last durations (longest first)."""
    config = load()
    names = list(config.projects)
    durations = e2e_infra.last_durations(config, names)
    plan = e2e_infra.plan_shards(names, durations, shards)
    if json_:
        emit_json({"include": [shard.to_json() for shard in plan]})
        return
    unknown = [name for name in names if name not in durations]
    _print_table(
        f"{len(names)} project(s) over {shards} shard(s) "
        f"(run each with: invoke e2e.all --shard i/{shards})",
        ["shard", "projects", "estimate"],
        [[s.label, ", ".join(s.projects) or "-", f"{s.estimate:.1f}s"] for s in plan],
    )
    if unknown:
        print(f"no recorded duration yet (median assumed): {', '.join(unknown)}")


@task(name="doctor", help={"json": "print one JSON document on stdout"})
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
        from rich.console import Console
        from rich.table import Table

        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        table = Table("", "check", "detail", "fix", box=box.SIMPLE_HEAD)
        for check in report.checks:
            table.add_row(
                marks.get(check.status, check.status), check.name, check.detail, check.fix
            )
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        console.print(table)
        verdict = (
            f"{len(report.failures)} problem(s) to fix"
            if report.failures
            else f"ready ({len(report.warnings)} warning(s))"
        )
        console.print(verdict, markup=False)
    if report.exit_code:
        raise Exit(code=report.exit_code)


e2e = Collection(
    "e2e", e2e_run, e2e_all, e2e_list, e2e_cleanup, e2e_affected, e2e_matrix, e2e_doctor
)

# --- hooks ----------------------------------------------------------------------------------------


@task(
    name="install",
    help={
        "force": "replace a pre-push hook e2e-infra did not write (it is kept and restored by "
        "hooks.uninstall)",
        "repo": "the git repository to install into (default: the current one)",
    },
)
@cli
def hooks_install(c: Context, force: bool = False, repo: str = "") -> None:
    """Install the git pre-push hook: it runs `invoke e2e.affected` for the pushed commits."""
    where = Path(repo or ".").resolve()
    top = e2e_infra.git_toplevel(where)
    config = e2e_infra.find_config_file(start=top)
    change = e2e_infra.install_pre_push_hook(
        top,
        python=sys.executable,
        tasks_dir=Path(__file__).resolve().parent,
        config=config,
        force=force,
    )
    if change.backup is not None:
        print(f"kept the previous hook as {change.backup}")
    print(f"installed {change.path} (config {config}); skip once with E2E_SKIP=1 git push")


@task(name="uninstall", help={"repo": "the git repository (default: the current one)"})
@cli
def hooks_uninstall(c: Context, repo: str = "") -> None:
    """Remove the pre-push hook if e2e-infra wrote it (restoring the one it replaced)."""
    change = e2e_infra.uninstall_pre_push_hook(Path(repo or ".").resolve())
    if change is None:
        print("no pre-push hook installed")
    elif change.backup is not None:
        print(f"removed the e2e-infra pre-push hook; restored the previous one at {change.path}")
    else:
        print(f"removed {change.path}")


hooks = Collection("hooks", hooks_install, hooks_uninstall)

# --- the tree -------------------------------------------------------------------------------------

ns = Collection(ports, pg, db, e2e, hooks)
