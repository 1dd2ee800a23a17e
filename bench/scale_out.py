"""Simulation: hosts share one PostgreSQL server while faults past the documented edges hit it,
and every DROP DATABASE the server ran is audited against the runs that were live at that moment.

    python bench/scale_out.py --json                        # 6 hosts, 150 s, each fault once
    python bench/scale_out.py --hosts 8 --seconds 600 --json
    python bench/scale_out.py --same-id --json              # one E2E host id, pid namespaces
    python bench/scale_out.py --bug pid-check --seconds 45 --json   # must fail (self-check)

**Hosts.** Each host is a process with its own state folder and host id (``--same-id``: one id
for all, as CI containers sharing a hostname) and, as root, its own pid namespace (``unshare``).
One of them (the *cut-off host*) also has its own network namespace, joined to the server by a
veth pair that the simulation makes and later cuts. Workers loop: allocate one of three projects,
log the run as live, run a 2-4 s "suite" (a query on the database every 50 ms; a connection that
fails is retried for up to 45 s, one that says "does not exist" or refuses the database's own role
ends the suite), log the release, release. A sweeper host runs ``cleanup`` every second, as
``invoke db.cleanup`` would.

**Faults**, one after another, ``--gap`` seconds apart (``--faults`` picks and orders them):

* ``kill``: a worker host is SIGKILLed mid-run (its whole pid namespace) and started again;
* ``cut``: the cut-off host's link is brought down for ``--cut`` seconds (longer than the grace):
  its TCP connections hang silently (static neighbours, no RST, no "no route"), the server drops
  them by keepalive after ~5 s (``tcp_keepalives_idle = 2``, interval 1, 3 probes), the host sees
  them fail after its own ``tcp_user_timeout``;
* ``terminate``: every session holding an advisory lock is ended (a failover, a proxy);
* ``outage``: the server is stopped for ``--outage`` seconds (10-30 by default), then started;
* ``idle``: ``idle_session_timeout`` shorter than the watcher's interval (``--idle-timeout``,
  0.2 s) for ``--idle-period`` seconds: it reaches the hold connections between two watcher
  queries, and every other idle connection (the sweeper's too);
* ``holdkill``: for ``--idle-period`` seconds, a proxy that ends only the *hold* connections that
  have been idle for ``--idle-timeout`` (what an idle cut in front of the holds does while the
  sweeper's connection survives).

**The audit does not trust the suites.** The server logs every DDL statement with its epoch time
and backend pid (``log_statement = 'ddl'``, ``log_line_prefix = '%n [%p] '``); a DROP DATABASE
whose backend's next line is not an ERROR dropped its database. Each host logs each run's live
interval: from the moment ``allocate`` returned to the moment the release began (a SIGKILLed
host's open run ends at the kill). An auditor thread samples ``pg_locks`` every 0.1 s: which
advisory keys are held in share mode or waited for (an owner's proof of life: it holds its name's
key, or waits for it while re-taking it). Each drop of a project database is then one of:

* *released*: its own run's release (between the release's start and end);
* *leftover*: no run of that name was live at that moment (a killed host's, a half-made one);
* *live, explained*: a run was live, but its owner neither held nor asked for its lock at any
  sample of the ``grace`` before the drop (its proof of life was gone for the whole grace: the
  documented limit), and that run failed loudly (its hold lost for good, its suite saw the
  database missing) or its host was killed before the run ended;
* *unexplained*: a run was live and its owner held or asked for its lock at some sample of the
  grace before the drop, or the samples of that grace have a hole of more than 1 s while the
  server was up (no proof either way), or the run passed anyway (a silent live drop). A suite that
  saw its database missing without a logged drop in its run counts as unexplained too.

Drops of templates, half-built templates and spares are listed (``other_drops``), not matched:
their proof is the subject of ``tests/integration/test_shared_server.py``.

``--bug`` injects a defect into the sweeper only (the library is untouched), so that the audit can
be seen to fail: ``no-second-look`` runs cleanup with no grace; ``pid-check`` drops a database of
this host id whose owner's pid looks dead (implies ``--same-id``). Exit status 1 when
``unexplained_drops`` > 0. The JSON summary: ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import psycopg  # noqa: E402

from e2e_infra.config import load_config  # noqa: E402
from e2e_infra.conninfo import ConnInfo  # noqa: E402
from e2e_infra.databases.names import name_key  # noqa: E402
from e2e_infra.databases.shared import DEATH_GRACE  # noqa: E402
from e2e_infra.postgres import LocalCluster  # noqa: E402
from e2e_infra.resources.leases import Registry  # noqa: E402
from e2e_infra.resources.ports import PortAllocator  # noqa: E402

BASE = "scale"
FAULTS = ("kill", "cut", "terminate", "outage", "idle", "holdkill")
BUGS = ("none", "no-second-look", "pid-check")
SAMPLE_EVERY = 0.1  # seconds between two looks of the auditor at pg_locks
MAX_HOLE = 1.0  # a hole in the samples longer than this, while the server is up, proves nothing
_LOG_TICK = 0.001  # the server log's time stamps are whole milliseconds (``%n``)

HOST = textwrap.dedent(
    """
    import json, os, random, sys, time, uuid
    from pathlib import Path
    import psycopg
    import e2e_infra
    config_path, events, stop_at, role, instance = sys.argv[1:6]
    stop_at = float(stop_at)
    config = e2e_infra.load_config(Path(config_path), environ=dict(os.environ))
    allocator = e2e_infra.Workspace(config).databases
    out = open(events, "a", buffering=1)
    def emit(**data):
        out.write(json.dumps({"t": time.time(), "instance": instance, **data}) + "\\n")
    def one_line(exc):
        return " ".join(str(exc).split())[:300]
    emit(event="start", role=role)
    allocator.holds.on_lost = lambda name, why: emit(event="lost", name=name, why=why[:300])
    bug = os.environ.get("SCALE_OUT_BUG", "none")
    if role == "sweeper" and bug == "pid-check":
        # The defect the lock proof replaced: a dead-looking pid of this host id is enough.
        import e2e_infra.databases.sweep as sweep_module
        from e2e_infra.databases.markers import Action, Verdict
        honest = sweep_module.decide
        def decide(marker, facts):
            if facts.owner_gone and marker.host == facts.host:
                return Verdict(Action.DROP, "BUG pid check: " + facts.owner_gone)
            return honest(marker, facts)
        sweep_module.decide = decide
    def retry(fn, limit):
        end = time.monotonic() + limit
        while True:
            try:
                return fn()
            except e2e_infra.E2EInfraError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.25)
    if role == "sweeper":
        while time.time() < stop_at:
            started = time.time()
            try:
                if bug == "no-second-look":
                    dropped = allocator.sweeper.cleanup(grace=0.0)
                else:
                    dropped = allocator.cleanup()
                for name, why in dropped:
                    emit(event="dropped", name=name, why=why[:300])
            except Exception as exc:  # the server is away, or a fault ended our connection
                emit(event="cleanup_failed", error=one_line(exc))
            time.sleep(max(0.0, 1.0 - (time.time() - started)))
        allocator.close()
        sys.exit(0)
    keep = {"keepalives": "1", "keepalives_idle": "2", "keepalives_interval": "1",
            "keepalives_count": "3", "tcp_user_timeout": "5000", "connect_timeout": "3"}
    while time.time() < stop_at:
        project = random.choice(["alpha", "beta", "gamma"])
        owner = e2e_infra.Owner.current(host=config.host_id)
        t0 = time.monotonic()
        try:
            got = retry(lambda: allocator.allocate(project, owner), 60)
        except e2e_infra.E2EInfraError as exc:
            emit(event="allocate_failed", error=exc.one_line()[:300])
            continue
        run = uuid.uuid4().hex[:8]
        emit(event="live", run=run, name=got.name, alloc=time.monotonic() - t0)
        conninfo = got.url.conninfo(**keep)
        ok = missing = outage = 0
        end = time.monotonic() + random.uniform(2, 4)
        while time.monotonic() < end and not missing:
            given_up = time.monotonic() + 45
            while True:
                try:
                    with psycopg.connect(conninfo) as conn:
                        conn.execute("SELECT count(*) FROM pg_class").fetchone()
                    ok += 1
                    break
                except psycopg.Error as exc:
                    # Its role goes with it: a password refused is a database gone too.
                    if "does not exist" in str(exc) or "authentication failed" in str(exc):
                        missing += 1
                        break
                    if time.monotonic() > given_up:
                        outage += 1
                        break
                    time.sleep(0.2)
            time.sleep(0.05)
        emit(event="releasing", run=run, name=got.name)
        lost = allocator.holds.lost.get(got.name, "")
        try:
            retry(lambda: allocator.release(name=got.name), 60)
        except e2e_infra.E2EInfraError as exc:
            emit(event="release_failed", error=exc.one_line()[:300])
        allocator.holds.release_all()
        emit(event="run", run=run, name=got.name, ok=ok, missing=missing, outage=outage,
             lost=lost[:300], retakes=allocator.holds.retakes)
    allocator.close()
    """
)


# --- the audit (pure: tested by tests/unit/test_scale_out_audit.py) -----------------------------

_LINE = re.compile(r"^(\d+(?:\.\d+)?) \[(\d+)\] ([A-Z]+):  (.*)$")
_DROP = re.compile(r'^statement: DROP DATABASE (?:IF EXISTS )?"?([A-Za-z0-9_]+)"?')


@dataclass(frozen=True)
class Drop:
    name: str
    at: float  # epoch seconds the server logged the statement
    pid: int  # the backend that ran it


@dataclass(frozen=True)
class Run:
    host: str
    run: str
    name: str
    start: float  # allocate returned
    end: float  # the release began, or the host was killed (inf: never ended)
    finished: bool  # False: its host was killed mid-run
    passed: bool
    why: str = ""  # why it did not pass
    released: float | None = None  # the release was done (its own drop came in between)


@dataclass(frozen=True)
class Verdict:
    drop: Drop
    kind: str  # released | leftover | explained | unexplained | other
    why: str
    run: Run | None = None


def drops_from_log(text: str) -> list[Drop]:
    """Every DROP DATABASE the server logged that did not fail: the next line of its backend is
    not an ERROR (a DROP that fails logs its ERROR at once)."""
    pending: dict[int, Drop] = {}
    out: list[Drop] = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        at, pid, level, message = float(match[1]), int(match[2]), match[3], match[4]
        if pid in pending:
            drop = pending.pop(pid)
            if level != "ERROR":
                out.append(drop)
        statement = _DROP.match(message) if level == "LOG" else None
        if statement is not None:
            pending[pid] = Drop(statement[1], at, pid)
    out.extend(pending.values())
    return sorted(out, key=lambda d: d.at)


def is_project_database(name: str, base: str = BASE) -> bool:
    rest = name[len(base) + 1 :] if name.startswith(base + "_") else ""
    return bool(rest) and not rest.startswith(("tpl_", "build_", "spare_"))


def _uncovered(
    times: Sequence[float], start: float, end: float, down: Sequence[tuple[float, float]]
) -> float:
    """The longest stretch of [start, end] with no sample, less what the server was down."""
    points = [start, *[t for t in times if start < t < end], end]
    worst = 0.0
    for a, b in itertools.pairwise(points):
        overlap = sum(max(0.0, min(b, d1) - max(a, d0)) for d0, d1 in down)
        worst = max(worst, b - a - overlap)
    return worst


def audit(
    drops: Iterable[Drop],
    runs: Sequence[Run],
    samples: Sequence[tuple[float, frozenset[int] | None]],
    *,
    grace: float,
    down: Sequence[tuple[float, float]] = (),
    base: str = BASE,
    missing_runs: Sequence[Run] = (),
) -> list[Verdict]:
    """Match every drop against the runs live at its moment (see the module)."""
    verdicts: list[Verdict] = []
    good = [(t, keys) for t, keys in samples if keys is not None]
    times = [t for t, _ in good]
    matched: set[str] = set()
    for drop in drops:
        if not is_project_database(drop.name, base):
            verdicts.append(Verdict(drop, "other", "not a project database"))
            continue
        # The server logs whole milliseconds: a drop logged in the millisecond the release
        # began may be the release's own.
        own = [
            r
            for r in runs
            if r.name == drop.name
            and r.released is not None
            and r.end < drop.at + _LOG_TICK
            and drop.at <= r.released
        ]
        live = [r for r in runs if r.name == drop.name and r.start <= drop.at <= r.end]
        if not live or own:
            if own:
                verdicts.append(Verdict(drop, "released", "its run's own release", own[0]))
            else:
                verdicts.append(Verdict(drop, "leftover", "no run of it was live"))
            continue
        run = live[0]
        matched.add(run.run)
        key = name_key(drop.name)
        window = (drop.at - grace, drop.at)
        held = [t for t, keys in good if window[0] <= t <= window[1] and key in keys]
        hole = _uncovered(times, *window, down)
        if held:
            why = (
                f"its owner held or asked for its lock {drop.at - held[-1]:.2f}s before the "
                f"drop (within the {grace:g}s grace)"
            )
            verdicts.append(Verdict(drop, "unexplained", why, run))
        elif hole > MAX_HOLE:
            why = f"no proof: the lock samples of the grace have a {hole:.1f}s hole"
            verdicts.append(Verdict(drop, "unexplained", why, run))
        elif run.passed:
            why = "its run passed on a database dropped under it (silent)"
            verdicts.append(Verdict(drop, "unexplained", why, run))
        else:
            why = f"no lock for the whole grace; the run did not pass: {run.why}"
            verdicts.append(Verdict(drop, "explained", why, run))
    for run in missing_runs:
        if run.run not in matched:
            ghost = Drop(run.name, run.start, 0)
            why = "its suite saw the database missing, and no drop of it was logged in its run"
            verdicts.append(Verdict(ghost, "unexplained", why, run))
    return verdicts


# --- the server, the network, the hosts --------------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclass
class Net:
    """A network namespace joined to this one by a veth pair, with static neighbours (a cut then
    drops packets silently: no ARP failure, no "no route to host" on the host's side)."""

    name: str
    outside: str
    inside: str
    server_ip: str
    host_ip: str

    @classmethod
    def create(cls) -> Net:
        used = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
        for _ in range(50):
            n = random.randrange(1, 255)
            if f"10.231.{n}." not in used:
                break
        tag = f"{n:02x}{os.getpid() % 0xFFFF:04x}"
        net = cls(f"e2eso-{tag}", f"e2eso{tag}a", f"e2eso{tag}b", f"10.231.{n}.1", f"10.231.{n}.2")
        sh("ip", "netns", "add", net.name)
        try:
            sh("ip", "link", "add", net.outside, "type", "veth", "peer", "name", net.inside)
            sh("ip", "link", "set", net.inside, "netns", net.name)
            sh("ip", "addr", "add", f"{net.server_ip}/30", "dev", net.outside)
            sh("ip", "link", "set", net.outside, "up")
            inside = ["ip", "netns", "exec", net.name]
            sh(*inside, "ip", "addr", "add", f"{net.host_ip}/30", "dev", net.inside)
            sh(*inside, "ip", "link", "set", net.inside, "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            mac_out = Path(f"/sys/class/net/{net.outside}/address").read_text().strip()
            mac_in = subprocess.run(
                [*inside, "cat", f"/sys/class/net/{net.inside}/address"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            sh("ip", "neigh", "replace", net.host_ip, "lladdr", mac_in, "dev", net.outside)
            sh(
                *inside,
                "ip",
                "neigh",
                "replace",
                net.server_ip,
                "lladdr",
                mac_out,
                "dev",
                net.inside,
            )
        except BaseException:
            net.remove()
            raise
        return net

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self, down: bool) -> None:
        sh("ip", "link", "set", self.outside, "down" if down else "up")
        if not down:  # bringing the link up again forgets the neighbour: put it back
            mac_in = subprocess.run(
                [*self.prefix(), "cat", f"/sys/class/net/{self.inside}/address"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            sh("ip", "neigh", "replace", self.host_ip, "lladdr", mac_in, "dev", self.outside)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Auditor(threading.Thread):
    """Samples which advisory keys are held in share mode, or waited for (an owner re-taking its
    lock waits in the queue; nothing else of the tool waits for an advisory lock): the owners'
    proof of life."""

    def __init__(self, admin: ConnInfo) -> None:
        super().__init__(name="scale-out auditor", daemon=True)
        self.admin = admin
        self.samples: list[tuple[float, frozenset[int] | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.halt.is_set():
            before = time.time()
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(
                        self.admin.conninfo(),
                        autocommit=True,
                        connect_timeout=1,
                        application_name="scale-out auditor",
                        options="-c idle_session_timeout=0",
                    )
                rows = conn.execute(
                    "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks "
                    "WHERE locktype = 'advisory' AND objsubid = 1 "
                    "AND (granted AND mode = 'ShareLock' OR NOT granted)"
                ).fetchall()
                keys = frozenset(_signed(int(value)) for (value,) in rows)
                self.samples.append(((before + time.time()) / 2, keys))
            except psycopg.Error:
                self.samples.append((time.time(), None))
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            self.halt.wait(SAMPLE_EVERY)
        if conn is not None:
            conn.close()


def _signed(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class Host:
    label: str
    role: str
    folder: Path
    prefix: list[str]
    env: dict[str, str]
    stop_at: float
    proc: subprocess.Popen[bytes] | None = None
    instances: list[str] = field(default_factory=list)

    @property
    def events(self) -> Path:
        return self.folder / "events.jsonl"

    def start(self) -> None:
        instance = f"{self.label}.{len(self.instances)}"
        self.instances.append(instance)
        argv = [*self.prefix, sys.executable, "-c", HOST, str(self.folder / "pyproject.toml")]
        argv += [str(self.events), str(self.stop_at), self.role, instance]
        log = (self.folder / f"{instance}.log").open("ab")
        self.proc = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=log, stderr=log)
        log.close()

    def kill(self) -> str:
        """SIGKILL the host (its whole pid namespace); the instance killed."""
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(self.proc.pid).children(recursive=True)
            for child in tree:  # the namespace's first process: the kernel kills the rest
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return self.instances[-1]


def start_server(tmp: Path, port_range: str, net: Net | None) -> LocalCluster:
    cfg = tmp / "server" / "pyproject.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        f'[tool.e2e_infra]\nstate_dir = "{tmp / "server" / "state"}"\n'
        f'port_range = "{port_range}"\n',
        encoding="utf-8",
    )
    config = load_config(cfg, environ={})
    registry = Registry(config.state_dir, host=config.host_id)
    cluster = LocalCluster(config, registry, PortAllocator.from_config(config, registry))
    cluster.ensure_running()
    settings = {
        "log_statement": "ddl",
        "log_line_prefix": "%n [%p] ",
        # The server notices a silent peer in ~5 s (2 s idle, 3 probes 1 s apart): a cut-off
        # owner's lock is then gone on the server while the owner still lives.
        "tcp_keepalives_idle": "2",
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "3",
    }
    if net is not None:
        settings["listen_addresses"] = f"127.0.0.1,{net.server_ip}"
    with psycopg.connect(cluster.admin_conninfo().conninfo(), autocommit=True) as conn:
        for key, value in settings.items():
            conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        if net is not None:
            with open(row[0], "a", encoding="utf-8") as hba:
                hba.write(f"host all all {net.host_ip}/32 scram-sha-256\n")
    cluster.stop()
    cluster.ensure_running()
    return cluster


def host_config(folder: Path, host_id: str, url: str) -> None:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.e2e_infra]
            state_dir = "{folder / "state"}"
            results_dir = "{folder / "results"}"
            host_id = "{host_id}"
            [tool.e2e_infra.database]
            admin_url = "{url}"
            name_base = "{BASE}"
            migrations_dir = "{REPO / "demo" / "migrations"}"
            seeds_dir = "{REPO / "demo" / "seeds"}"
            """
        ),
        encoding="utf-8",
    )


# --- the faults ---------------------------------------------------------------------------------


@dataclass
class Injector:
    cluster: LocalCluster
    hosts: list[Host]
    net: Net | None
    args: Any
    rng: random.Random
    done: list[dict[str, Any]] = field(default_factory=list)
    down: list[tuple[float, float]] = field(default_factory=list)
    kills: list[tuple[float, str]] = field(default_factory=list)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.cluster.admin_conninfo().conninfo(),
            autocommit=True,
            options="-c idle_session_timeout=0",
        )

    def run(self, kind: str) -> None:
        started = time.time()
        detail: dict[str, Any] = {}
        if kind == "kill":
            workers = [h for h in self.hosts if h.role == "worker"]
            host = self.rng.choice(workers)
            self.kills.append((time.time(), host.kill()))
            time.sleep(1.0)
            host.start()
            detail["host"] = host.label
        elif kind == "cut":
            assert self.net is not None
            self.net.cut(True)
            try:
                time.sleep(self.args.cut)
            finally:
                self.net.cut(False)
        elif kind == "terminate":
            with self.admin() as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT pid FROM pg_locks "
                    "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()) p"
                ).fetchall()
            detail["ended"] = len(rows)
        elif kind == "outage":
            low, high = self.args.outage
            seconds = self.rng.uniform(low, high)
            self.cluster.stop()
            went = time.time()
            time.sleep(seconds)
            self.cluster.ensure_running()
            self.down.append((went, time.time()))
        elif kind == "idle":
            ms = round(self.args.idle_timeout * 1000)
            with self.admin() as conn:
                conn.execute(f"ALTER SYSTEM SET idle_session_timeout = '{ms}ms'")
                conn.execute("SELECT pg_reload_conf()")
            try:
                time.sleep(self.args.idle_period)
            finally:
                with self.admin() as conn:
                    conn.execute("ALTER SYSTEM RESET idle_session_timeout")
                    conn.execute("SELECT pg_reload_conf()")
        elif kind == "holdkill":
            ended = 0
            until = time.monotonic() + self.args.idle_period
            with self.admin() as conn:
                while time.monotonic() < until:
                    rows = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                        "starts_with(application_name, 'e2e-infra hold ') AND state = 'idle' "
                        "AND now() - state_change > make_interval(secs => %s)",
                        (self.args.idle_timeout,),
                    ).fetchall()
                    ended += len(rows)
                    time.sleep(0.05)
            detail["ended"] = ended
        self.done.append({"kind": kind, "at": started, "seconds": time.time() - started, **detail})


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=6, help="worker hosts (plus one sweeper)")
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--faults", default=",".join(FAULTS), help="in this order, repeated")
    parser.add_argument("--gap", type=float, default=6.0, help="seconds between two faults")
    parser.add_argument("--outage", default="10-30", help="seconds the server is down: LOW-HIGH")
    parser.add_argument("--cut", type=float, default=20.0, help="seconds the host is cut off")
    parser.add_argument("--idle-timeout", type=float, default=0.2)
    parser.add_argument("--idle-period", type=float, default=10.0)
    parser.add_argument("--same-id", action="store_true", help="one host_id for every host")
    parser.add_argument("--no-namespaces", action="store_true")
    parser.add_argument("--bug", choices=BUGS, default="none", help="a defect, to see it caught")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--port-range", default="23900-23949")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--audit", type=Path, help="only audit a run kept with --keep")
    args = parser.parse_args()
    if args.audit is not None:
        summary, verdicts = summarize(args.audit)
        if args.json:
            print(json.dumps(summary))
        else:
            print_report(summary, verdicts)
        return 1 if summary["unexplained_drops"] else 0
    low, _, high = args.outage.partition("-")
    args.outage = (float(low), float(high or low))
    if args.bug == "pid-check":
        args.same_id = True  # a pid is only ever trusted for this host id
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    root = os.geteuid() == 0
    namespaces = bool(not args.no_namespaces and root and shutil.which("unshare"))
    skipped = []
    if "cut" in faults and not (root and shutil.which("ip")):
        faults = [f for f in faults if f != "cut"]
        skipped.append("cut (needs root and ip)")
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="e2e-scale-out-"))
    net = Net.create() if "cut" in faults else None
    hosts: list[Host] = []
    auditor: Auditor | None = None
    cluster: LocalCluster | None = None
    injector: Injector | None = None
    try:
        cluster = start_server(tmp, args.port_range, net)
        tcp = cluster.tcp_conninfo()
        auditor = Auditor(cluster.admin_conninfo())
        auditor.start()
        stop_at = time.time() + args.seconds
        env = {k: v for k, v in os.environ.items() if not k.startswith("E2E_")}
        env["PYTHONPATH"] = str(REPO)
        pid_ns = (
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if namespaces else []
        )
        for i in range(args.hosts + 1):
            role = "sweeper" if i == args.hosts else "worker"
            label = "sweeper" if role == "sweeper" else f"host{i}"
            cut_off = net is not None and i == args.hosts - 1
            url = tcp
            if cut_off and net is not None:
                url = ConnInfo(net.server_ip, tcp.port, tcp.user, tcp.dbname, password=tcp.password)
            host_id = "ci-runner" if args.same_id else label
            host_config(tmp / label, host_id, url.url)
            host_env = dict(env)
            if role == "sweeper":
                host_env["SCALE_OUT_BUG"] = args.bug
            prefix = [*(net.prefix() if cut_off and net else []), *pid_ns]
            hosts.append(Host(label, role, tmp / label, prefix, host_env, stop_at))
        for host in hosts:
            host.start()
            # Apart: every host is pid 1 of its namespace, and a pid with the same start time
            # (to 50 ms) would look like the same process even to a pid check.
            time.sleep(0.2)
        injector = Injector(cluster, hosts, net, args, rng)
        time.sleep(min(8.0, args.seconds / 4))  # the template is built, runs are going
        n = 0
        while faults and time.time() < stop_at - 10:
            injector.run(faults[n % len(faults)])
            n += 1
            time.sleep(args.gap)
        for host in hosts:
            assert host.proc is not None
            host.proc.wait(timeout=max(0.0, stop_at - time.time()) + 180)
    finally:
        for host in hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.kill()
        if auditor is not None:
            auditor.halt.set()
            auditor.join(5)
        if cluster is not None:
            cluster.stop()
        if net is not None:
            net.remove()
    assert cluster is not None and auditor is not None and injector is not None
    save_record(tmp, args, namespaces, skipped, cluster, auditor, injector)
    summary, verdicts = summarize(tmp)
    if args.json:
        print(json.dumps(summary))
    else:
        print_report(summary, verdicts)
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(cluster.cluster_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if summary["unexplained_drops"] else 0


def runs_from(
    rows: Sequence[dict[str, Any]], kills: Sequence[tuple[float, str]]
) -> tuple[list[Run], list[Run]]:
    """(every run, the runs whose suite saw their database missing)."""
    killed = {instance: at for at, instance in kills}
    lost = {(r["instance"], r["name"]): r for r in rows if r["event"] == "lost"}
    live = {r["run"]: r for r in rows if r["event"] == "live"}
    releasing = {r["run"]: r["t"] for r in rows if r["event"] == "releasing"}
    ended = {r["run"]: r for r in rows if r["event"] == "run"}
    runs, missing = [], []
    for key, row in live.items():
        done = ended.get(key)
        end = releasing.get(key, killed.get(row["instance"], float("inf")))
        why = ""
        if done is not None:
            if done["lost"]:
                why = f"hold lost for good: {done['lost']}"
            elif done["missing"]:
                why = "its suite saw the database missing"
            elif done["outage"]:
                why = "its suite could not reach the server for 45 s"
            elif not done["ok"]:
                why = "its suite made no query"
        else:
            gone = lost.get((row["instance"], row["name"]))
            why = "its host was killed before the run ended" + (
                f", after its hold was lost for good: {gone['why']}"
                if gone is not None and gone["t"] >= row["t"]
                else ""
            )
        run = Run(
            host=row["host"],
            run=key,
            name=row["name"],
            start=row["t"],
            end=end,
            finished=done is not None,
            passed=done is not None and not why,
            why=why,
            released=done["t"] if done is not None else None,
        )
        runs.append(run)
        if done is not None and done["missing"]:
            missing.append(run)
    return runs, missing


def save_record(
    tmp: Path,
    args: Any,
    namespaces: bool,
    skipped: list[str],
    cluster: LocalCluster,
    auditor: Auditor,
    injector: Injector,
) -> dict[str, Any]:
    """Everything the audit reads, in ``tmp`` (``--keep`` and ``--audit DIR`` use it)."""
    shutil.copyfile(cluster.log_file, tmp / "server.log")
    record = {
        "args": {k: v for k, v in vars(args).items() if k != "audit"},
        "namespaces": namespaces,
        "skipped": skipped,
        "faults": injector.done,
        "kills": injector.kills,
        "down": injector.down,
        "samples": [[t, None if keys is None else sorted(keys)] for t, keys in auditor.samples],
        "labels": sorted(p.parent.name for p in tmp.glob("*/events.jsonl")),
    }
    (tmp / "record.json").write_text(json.dumps(record), encoding="utf-8")
    return record


def summarize(tmp: Path) -> tuple[dict[str, Any], list[Verdict]]:
    """The summary and the verdicts of the run recorded in ``tmp`` (see :func:`save_record`)."""
    record = json.loads((tmp / "record.json").read_text(encoding="utf-8"))
    args = argparse.Namespace(**record["args"])
    rows = []
    for label in record["labels"]:
        for line in (tmp / label / "events.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rows.append({"host": label, **json.loads(line)})
    kills = [(at, instance) for at, instance in record["kills"]]
    down = [(a, b) for a, b in record["down"]]
    samples = [(t, None if k is None else frozenset(k)) for t, k in record["samples"]]
    faults, skipped, namespaces = record["faults"], record["skipped"], record["namespaces"]
    runs, missing = runs_from(rows, kills)
    log = (tmp / "server.log").read_text(encoding="utf-8", errors="replace")
    drops = drops_from_log(log)
    verdicts = audit(drops, runs, samples, grace=DEATH_GRACE, down=down, missing_runs=missing)
    finished = [r for r in runs if r.finished]
    allocs = sorted(r["alloc"] for r in rows if r["event"] == "live")
    kinds = ("released", "leftover", "explained")
    by = {kind: [v for v in verdicts if v.kind == kind] for kind in kinds}
    unexplained = [v for v in verdicts if v.kind == "unexplained"]
    good = [t for t, keys in samples if keys is not None]

    def longest(kind: str) -> float:
        return round(max((f["seconds"] for f in faults if f["kind"] == kind), default=0.0), 1)

    retakes: dict[str, int] = {}
    for r in rows:
        if r["event"] == "run":
            retakes[r["instance"]] = max(retakes.get(r["instance"], 0), r["retakes"])
    summary = {
        "hosts": args.hosts,
        "seconds": args.seconds,
        "pid_namespaces": namespaces,
        "same_host_id": args.same_id,
        "bug": args.bug,
        "faults": [
            f"{f['kind']} {f['seconds']:.1f}s"
            + "".join(f" {k}={v}" for k, v in f.items() if k not in {"kind", "at", "seconds"})
            for f in faults
        ],
        "skipped_faults": skipped,
        "runs": len(finished),
        "passed": sum(1 for r in finished if r.passed),
        "failed_loudly": sum(1 for r in finished if not r.passed),
        "killed_mid_run": sum(1 for r in runs if not r.finished),
        "live_drops": len(by["explained"]) + sum(1 for v in unexplained if v.drop.pid),
        "unexplained_drops": len(unexplained),
        "released_drops": len(by["released"]),
        "leftover_drops": len(by["leftover"]),
        "other_drops": [v.drop.name for v in verdicts if v.kind == "other"],
        "drops_logged": len(drops),
        "host_kills": len(kills),
        "longest_outage_s": longest("outage"),
        "longest_cut_s": longest("cut"),
        "grace_s": DEATH_GRACE,
        "holds_lost_for_good": sum(1 for r in rows if r["event"] == "lost"),
        "holds_retaken": sum(retakes.values()),
        "suites_saw_missing": len(missing),
        "queries": sum(r["ok"] for r in rows if r["event"] == "run"),
        "allocate_failed": sum(1 for r in rows if r["event"] == "allocate_failed"),
        "release_failed": sum(1 for r in rows if r["event"] == "release_failed"),
        "cleanups_failed": sum(1 for r in rows if r["event"] == "cleanup_failed"),
        "allocate_p50_s": round(allocs[len(allocs) // 2], 3) if allocs else None,
        "allocate_max_s": round(allocs[-1], 3) if allocs else None,
        "lock_samples": len(good),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "explained": [_brief(v) for v in by["explained"]][:10],
        "unexplained": [_brief(v) for v in unexplained][:10],
    }
    return summary, verdicts


def _brief(verdict: Verdict) -> dict[str, Any]:
    out: dict[str, Any] = {"name": verdict.drop.name, "at": round(verdict.drop.at, 2)}
    if verdict.run is not None:
        out["host"], out["run"] = verdict.run.host, verdict.run.run
    out["why"] = verdict.why
    return out


def print_report(summary: dict[str, Any], verdicts: Sequence[Verdict]) -> None:
    keys = [
        "runs",
        "passed",
        "failed_loudly",
        "killed_mid_run",
        "live_drops",
        "unexplained_drops",
        "leftover_drops",
        "host_kills",
        "longest_outage_s",
        "longest_cut_s",
        "grace_s",
        "holds_lost_for_good",
        "holds_retaken",
        "allocate_p50_s",
        "allocate_max_s",
    ]
    print(
        f"{summary['hosts']} hosts, {summary['seconds']:g} s, pid namespaces "
        f"{summary['pid_namespaces']}, same host id {summary['same_host_id']}, bug "
        f"{summary['bug']}; load {summary['load']}"
    )
    print("faults: " + ", ".join(summary["faults"]))
    for key in keys:
        print(f"  {key:<20} {summary[key]}")
    for verdict in verdicts:
        if verdict.kind in {"explained", "unexplained"}:
            print(
                f"  {verdict.kind:<12} {verdict.drop.name} at {verdict.drop.at:.2f}: {verdict.why}"
            )


if __name__ == "__main__":
    sys.exit(main())
