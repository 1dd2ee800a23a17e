"""``invoke ports.*``: lease, release, list and reclaim TCP ports."""

from __future__ import annotations

import time
from typing import Any

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
    workspace,
)


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


def _lease_row(lease: e2e_infra.Lease) -> list[str]:
    return [lease.resource, str(lease.data.get("name", "?")), lease.project, str(lease.owner.pid)]


@task(
    help={
        "project": "project name: [a-z][a-z0-9_]{0,39}",
        "names": "comma-separated port names (default: all port_names of the config)",
        "json": JSON_HELP,
        "owner-pid": OWNER_HELP,
    }
)
@cli
def allocate(
    c: Context, project: str = "", names: str = "", json_: bool = False, owner_pid: str = ""
) -> None:
    """Lease a free port per port name for a project; asking again returns the same ports."""
    project_arg(project)
    config = load()
    wanted = _port_names(config, names)
    owner = cli_owner(config, owner_pid)
    got = workspace(config).ports.allocate(project, wanted, owner)
    if json_:
        document = {"project": project, "ports": got, "run_id": owner.run_id}
        emit_json({**document, "owner_pid": owner.pid})
        return
    print_table(
        f"ports of {project} (owner pid {owner.pid}, run {owner.run_id})",
        ["name", "port"],
        [[name, str(port)] for name, port in got.items()],
    )


@task(
    help={
        "project": "release this project's port leases, whoever owns them",
        "all": "release every port lease",
        "json": JSON_HELP,
    }
)
@cli
def release(c: Context, project: str = "", all_: bool = False, json_: bool = False) -> None:
    """Release a project's port leases (--project NAME) or all of them (--all); idempotent."""
    if bool(project) == all_:
        raise e2e_infra.UsageError("pass either --project NAME or --all")
    if project:
        project_arg(project)
    allocator = workspace().ports
    released = allocator.release_all() if all_ else allocator.release(project)
    if json_:
        now = time.time()
        emit_json({"released": [_lease_json(lease, now) for lease in released]})
    elif not released:
        print(f"no port leases to release{f' for project {project}' if project else ''}")
    else:
        print_table(
            f"released {len(released)} port lease(s)",
            ["port", "name", "project", "owner pid"],
            [_lease_row(lease) for lease in released],
        )


@task(name="list", help={"json": JSON_HELP})
@cli
def list_(c: Context, json_: bool = False) -> None:
    """Show the port leases: port, name, project, owner pid, host, run id, age, live or stale."""
    leases = workspace().ports.leases_with_status()
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
        print_table(
            f"{len(leases)} port lease(s)",
            ["port", "name", "project", "owner pid", "host", "run id", "age", "status"],
            [
                [
                    *_lease_row(lease),
                    lease.owner.host,
                    lease.owner.run_id,
                    age(max(0.0, now - lease.created_at)),
                    "live" if reason is None else f"stale: {reason}",
                ]
                for lease, reason in leases
            ],
        )


@task(help={"json": JSON_HELP})
@cli
def cleanup(c: Context, json_: bool = False) -> None:
    """Reclaim port leases whose owner process is gone, and say why each was reclaimed."""
    reclaimed = workspace().ports.reclaim_stale()
    now = time.time()
    if json_:
        emit_json(
            {"reclaimed": [{**_lease_json(lease, now), "reason": why} for lease, why in reclaimed]}
        )
    elif not reclaimed:
        print("no stale port leases")
    else:
        print_table(
            f"reclaimed {len(reclaimed)} stale port lease(s)",
            ["port", "name", "project", "owner pid", "why"],
            [[*_lease_row(lease), why] for lease, why in reclaimed],
        )


ports = Collection("ports", allocate, release, list_, cleanup)
