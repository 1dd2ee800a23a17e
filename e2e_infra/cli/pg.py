"""``invoke pg.*``: the embedded local PostgreSQL cluster (or the external admin URL's status)."""

from __future__ import annotations

from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

import e2e_infra

from ._output import JSON_HELP, cli, emit_json, load, print_table, workspace


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
    print_table("local PostgreSQL cluster", ["field", "value"], rows)


def _external(config: e2e_infra.Config) -> dict[str, Any] | None:
    """Reachability of the configured admin URL, or None when the embedded cluster is used."""
    info = config.database.admin_url
    if info is None:
        return None
    try:
        e2e_infra.check_reachable(info, external=True)
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
    _print_cluster(workspace(config).cluster.start())


@task(
    name="stop",
    help={"purge": "also remove the cluster folder (its data, socket and log) and its password"},
)
@cli
def pg_stop(c: Context, purge: bool = False) -> None:
    """Stop the local PostgreSQL cluster (fast, then immediate, then SIGKILL); idempotent."""
    config = load()
    if config.database.admin_url is not None:
        print(f"the admin URL is external ({config.database.admin_url.masked}): nothing to stop")
        return
    cluster = workspace(config).cluster
    if purge:
        removed = cluster.purge()
        shown = ", ".join(removed) if removed else f"nothing ({cluster.cluster_dir} was not there)"
        print(f"the local PostgreSQL cluster is stopped; removed {shown}")
        return
    if cluster.stop():
        print(f"stopped the local PostgreSQL cluster in {cluster.data_dir}")
    else:
        print(f"the local PostgreSQL cluster in {cluster.data_dir} was not running")


@task(name="status", help={"json": JSON_HELP})
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
    status = workspace(config).cluster.status()
    if json_:
        emit_json({**status.to_json(), "external": False})
    else:
        _print_cluster(status)


pg = Collection("pg", pg_start, pg_stop, pg_status)
