"""``invoke db.*``: per-project databases cloned from fingerprinted templates."""

from __future__ import annotations

import dataclasses
import time

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

import e2e_infra

from ._output import (
    JSON_HELP,
    OWNER_HELP,
    age,
    cli,
    cli_owner,
    emit_json,
    load,
    print_table,
    project_arg,
    seconds_arg,
    size,
    workspace,
)


def _nothing_to_read(ws: e2e_infra.Workspace) -> str | None:
    """Why a command that only reads finds nothing: the local cluster does not run (it never
    starts or creates one to answer; None when there is something to read)."""
    if ws.external or ws.cluster_running():
        return None
    return (
        f"no local PostgreSQL cluster runs in {ws.cluster.cluster_dir} (so no e2e database "
        "exists); `invoke pg.start` or any run starts it"
    )


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
        "owner-pid": OWNER_HELP.replace("the ports", "the database"),
        "ttl": "how long the database lives whatever becomes of the calling shell (CI steps: "
        "each a new shell): seconds, or 90s, 10m, 2h; it goes with db.release, or with "
        "db.cleanup once they have passed",
    },
)
@cli
def db_allocate(
    c: Context,
    project: str = "",
    seed: str = "",
    json_: bool = False,
    owner_pid: str = "",
    ttl: str = "",
) -> None:
    """Clone the template into a database of the project's own (built first if missing)."""
    project_arg(project)
    ttl_s = seconds_arg("ttl", ttl) if ttl else None
    config = load()
    owner = cli_owner(config, owner_pid)
    if seed:
        _seed_arg(config, seed)
    with workspace(config) as ws:
        got = ws.databases.allocate(project, owner, seed=seed or None, ttl=ttl_s)
        # On a shared server this owner cannot hold a lock: allocating again renews its others.
        ws.databases.renew(owner=owner)
    expires = got.lease.data.get("expires")
    if json_:
        emit_json(
            {
                "project": project,
                "database": got.name,
                "database_url": got.url.url,
                "template": got.template,
                "seed": got.seed,
                "run_id": owner.run_id,
                "lease": got.lease.id,
                "expires": expires,
            }
        )
        return
    print(f"database {got.name} for {project} (seed {got.seed}, template {got.template})")
    print(f"  url: {got.url.masked}  (real URL: invoke db.url --project {project})")
    if expires is not None:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(expires)))
        print(f"  lease {got.lease.id} lives until {until}, or until `invoke db.release`")


@task(
    name="release",
    help={
        "project": "drop this project's databases",
        "all": "drop every database leased in this state folder",
        "keep": "keep them for debugging for database.keep_hours, then db.cleanup drops them",
        "lease": "drop only the database of this lease (db.allocate --json names it)",
    },
)
@cli
def db_release(
    c: Context, project: str = "", all_: bool = False, keep: bool = False, lease: str = ""
) -> None:
    """Drop a project's databases (--project NAME) or all (--all), or --keep them; idempotent."""
    if bool(project) == all_:
        raise e2e_infra.UsageError("pass either --project NAME or --all")
    if project:
        project_arg(project)  # before the allocator, which may start the local cluster
    with workspace() as ws:
        leases = ws.registry.snapshot()
        if _nothing_to_read(ws) is not None and not any(x.kind == "database" for x in leases):
            print("no databases to release (no local cluster runs, no lease is held)")
            return
        allocator = ws.databases
        names = (
            allocator.release_all(keep=keep)
            if all_
            else allocator.release(project, keep=keep, lease_id=lease or None)
        )
    if not names:
        print(f"no databases to release{f' for project {project}' if project else ''}")
    for name in names:
        if keep:
            url = allocator.catalog.roles.masked_url(name)  # the project's role
            hours = allocator.config.database.keep_hours
            print(f"kept {name} for {hours:g}h: {url}")
        else:
            print(f"dropped {name}")


@task(name="renew", help={"project": "renew only this project's databases (default: all)"})
@cli
def db_renew(c: Context, project: str = "") -> None:
    """Shared server: extend the expiry of databases allocated by `invoke db.allocate`."""
    if project:
        project_arg(project)
    with workspace() as ws:
        names = ws.databases.renew(project or None)
        ttl = ws.config.lease_ttl or max(ws.config.database.keep_hours, 1.0) * 3600
    if not names:
        print("no databases to renew (only command allocations on a shared server expire)")
    for name in names:
        print(f"renewed {name} for {ttl / 3600:g}h")


@task(name="list", help={"json": JSON_HELP})
@cli
def db_list(c: Context, json_: bool = False) -> None:
    """Show e2e databases and templates: kind, project, size, lease status, owner, run, expiry."""
    with workspace() as ws:
        why = _nothing_to_read(ws)
        infos = ws.databases.list() if why is None else []
    if why is not None:
        if json_:
            emit_json({"databases": [], "cluster": "not running", "note": why})
        else:
            print(why)
        return
    if json_:
        emit_json({"databases": [dataclasses.asdict(info) for info in infos]})
        return
    if not infos:
        print("no e2e databases")
        return
    now = time.time()
    print_table(
        f"{len(infos)} e2e database(s)",
        ["name", "kind", "project", "seed", "size", "owner pid", "run id", "age", "status"],
        [
            [
                info.name,
                info.kind,
                info.project or "-",
                info.seed or "-",
                size(info.size),
                str(info.owner_pid or "-"),
                info.run_id or "-",
                age(max(0.0, now - info.created_at)) if info.created_at else "-",
                info.status,
            ]
            for info in infos
        ],
    )


@task(name="cleanup", help={"json": JSON_HELP})
@cli
def db_cleanup(c: Context, json_: bool = False) -> None:
    """Drop marked databases whose owner is gone or whose keep expired, and old templates."""
    with workspace() as ws:
        why = _nothing_to_read(ws)
        dropped = ws.databases.cleanup() if why is None else []
    if why is not None and not json_:
        print(f"nothing to drop: {why}")
        return
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
    project_arg(project)  # before the allocator, which may start the local cluster
    with workspace() as ws:
        got = ws.databases.migrate(project)
    print(f"migrated {got.name}")


@task(
    name="seed",
    help={"project": "the project whose live database to seed", "seed": "the seed profile"},
)
@cli
def db_seed(c: Context, project: str = "", seed: str = "") -> None:
    """Apply a seed profile (default: the project's) to a project's live database."""
    project_arg(project)
    config = load()
    known = config.projects.get(project)
    profile = _seed_arg(config, seed or (known.seed if known else config.database.default_seed))
    with workspace(config) as ws:
        got = ws.databases.seed(project, profile)
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
    with workspace(config) as ws:
        name = ws.databases.ensure_template(profile, rebuild=rebuild)
    print(name)


@task(
    name="url",
    help={
        "project": "the project whose database URL to print",
        "lease": "the database of this lease (db.allocate --json names it)",
        "run-id": "the database allocated in this run (E2E_RUN_ID when it was allocated)",
    },
)
@cli
def db_url(c: Context, project: str = "", lease: str = "", run_id: str = "") -> None:
    """Print the real URL (with password) of a project's live database, and nothing else."""
    project_arg(project)  # before the allocator, which may start the local cluster
    with workspace() as ws:
        why = _nothing_to_read(ws)
        if why is not None:
            raise e2e_infra.DatabaseNotFoundError(
                f"project {project!r} has no live database: {why}", project=project
            )
        got = ws.databases.find(project, lease_id=lease or None, run_id=run_id or None)
    print(got.url.url)


db = Collection(
    "db",
    db_allocate,
    db_release,
    db_renew,
    db_list,
    db_cleanup,
    db_migrate,
    db_seed,
    db_template,
    db_url,
)
