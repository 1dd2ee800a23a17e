"""A run of a project's suite against its environment kept up (``invoke e2e.run X --attach``).

No ports, database or servers are acquired: the run takes those of the environment ``e2e.up``
keeps (:mod:`.up`), gives its database fresh contents first (unless ``--no-reset``: see
:func:`~.up.reset_up`), and runs the suite exactly as a run does (:meth:`ProjectSession.
run_suite`: its own results folder, containment, the guardian, ``run.json``, the JUnit file and
the report, ``attached: true`` in the record). Releasing ends only what the run itself started;
the environment stays up. When the environment went down, or one of its servers died or was
restarted while the suite ran, the run is an error naming it: its result says nothing about the
suite.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..results.record import Result, RunRecord
from .servers import Placeholders
from .session import ProjectEnv, ProjectSession, run_session
from .up import UpState, live_up, read_up, reset_up

if TYPE_CHECKING:
    from ..databases.reset import ResetReport

__all__ = ["run_attached"]

log = logging.getLogger("e2e_infra")


class _AttachedSession(ProjectSession):
    """A session whose resources are the environment kept up: nothing acquired but its folder."""

    def __init__(
        self, config: Config, project: str, up: UpState, *, reset: bool, **kwargs: Any
    ) -> None:
        super().__init__(config, project, **kwargs)
        self.up = up
        self.reset = reset
        self.reset_report: ResetReport | None = None

    def _acquire(self) -> ProjectEnv:
        up, name = self.up, self.project.name
        self._start_guardian()  # for the suite: reclaimed by its run id if this process dies
        self._watch.open(self.registry, self.owner)
        with self.phase("ports"):
            self.results_dir = self.layout.claim_project_dir(name, self.run_id, others=True)
        result = self.result
        result.attached = True
        result.ports = dict(up.ports)
        result.database, result.seed = up.database, up.seed
        result.logs = {server: str(info.get("log")) for server, info in up.servers.items()}
        url = up.database_url
        if url is not None and url.password:
            self._secrets = (url.password,)
        if self.reset and up.database is not None:
            with self.phase("database"):
                self._engine = self.workspace.databases  # closed last: a spare for next time
                self.reset_report = reset_up(self.config, up, self.workspace)
            log.info("%s: %s", name, self.reset_report.line())
        placeholders = Placeholders(
            project=name,
            run_id=self.run_id,
            root=self.config.root,
            results_dir=self.results_dir,
            ports=dict(up.ports),
            database_url=up.env.get("DATABASE_URL", ""),
        )
        self._placeholders = placeholders
        return ProjectEnv(
            project=name,
            run_id=self.run_id,
            results_dir=self.results_dir,
            ports=dict(up.ports),
            database=up.database,
            env=self._suite_env(placeholders),
        )

    def run_suite(self, posargs: Sequence[str] = ()) -> int:
        returncode = super().run_suite(posargs)
        problem = self._environment_problem()
        if problem is not None:
            self.failed = True
            self.result.result = Result.ERROR
            self.result.error = problem
        return returncode

    def _environment_problem(self) -> str | None:
        """Why the environment did not stay as the suite found it (None: it did)."""
        name = self.project.name
        now = read_up(self.config, name)
        if now is None or now.pid != self.up.pid or not now.alive():
            return (
                f"the environment of {name} went down while the suite ran; its result says "
                f"nothing: start it again with `invoke e2e.up {name}`"
            )
        for server, info in self.up.servers.items():
            later = now.servers.get(server, {})
            if later.get("pid") != info.get("pid") or not later.get("alive", False):
                return (
                    f"server {server} of the environment of {name} died while the suite ran "
                    f"(pid {info.get('pid')}); find why in its log: {info.get('log')}"
                )
        return None


def run_attached(
    config: Config, project: str, posargs: Sequence[str] = (), *, reset: bool = True
) -> RunRecord:
    """Run ``project``'s suite against its environment kept up; return the run's record (see
    the module). Errors are recorded, as by ``run_project``; an interrupt propagates."""
    from .retries import mark_flaky

    up = live_up(config, project)
    return mark_flaky(run_session(_AttachedSession(config, project, up, reset=reset), posargs), [])
