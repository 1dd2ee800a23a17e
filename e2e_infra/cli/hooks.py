"""``invoke hooks.*``: the git pre-push hook that runs the projects a push affects."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

import e2e_infra

from ._output import cli


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
    """Install the git pre-push hook: it runs `e2e-infra e2e.affected` for the pushed commits."""
    where = Path(repo or ".").resolve()
    top = e2e_infra.git_toplevel(where)
    config = e2e_infra.find_config_file(start=top)
    change = e2e_infra.install_pre_push_hook(
        top,
        python=sys.executable,
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
