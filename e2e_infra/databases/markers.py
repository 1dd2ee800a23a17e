"""The marker on every database the tool made, and the pure policy of what may be dropped.

A marker is ``COMMENT ON DATABASE <name> IS 'e2e-infra {json}'``: the JSON says which tool made the
database (``tool``), for which name base (``base``), what it is (``kind``: :class:`Kind`) and who
owns it. :class:`Marker` is the typed value; :meth:`Marker.parse` and :meth:`Marker.comment` are the
only places that read or write the text. A database without a marker is never ours to drop (see
:mod:`.catalog` for the one exception: the exact name a dead maker's lease records).

The policy here is pure: :func:`decide` turns a marker and the facts observed about its owner
(:class:`Facts`: a lease, whether its owner is gone, the time) into a :class:`Verdict`;
:func:`stale_spares` and :func:`templates_to_prune` choose among marked databases. Observing those
facts (the process table, the registry, advisory locks) is the caller's job.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import sql

from .names import TEMPLATE_FORMAT_VERSION, ident

__all__ = [
    "MARKER_PREFIX",
    "Action",
    "Facts",
    "Kind",
    "MarkedDatabase",
    "Marker",
    "Verdict",
    "count_databases",
    "decide",
    "parse_marker",
    "stale_spares",
    "status",
    "templates_to_prune",
]

MARKER_PREFIX = "e2e-infra "
TOOL = "e2e-infra"


class Kind(enum.StrEnum):
    """What a marked database is. Registry leases of the databases being made use the same
    words (``database``, ``spare``, ``building``)."""

    DATABASE = "database"  # a project's database, in use
    KEPT = "kept"  # a project's database kept after its run, until ``keep_until``
    TEMPLATE = "template"  # a published template (IS_TEMPLATE, no connections)
    BUILDING = "building"  # a template being built, under its builder's advisory lock
    SPARE = "spare"  # a warm spare clone of a template, waiting to be claimed
    UNKNOWN = "unknown"  # a kind this version does not know: never dropped

    @property
    def is_project_database(self) -> bool:
        return self in {Kind.DATABASE, Kind.KEPT}


_KIND_VALUES = {kind.value: kind for kind in Kind}
# The keys each kind always writes (null when unset), as the tool has always written them; any
# other field is written only when set.
_OWNER_KEYS = ("host", "pid", "start", "run", "created_at")
_KEYS: dict[Kind, tuple[str, ...]] = {
    Kind.DATABASE: ("lease", "project", *_OWNER_KEYS, "keep_until", "template", "seed", "hold"),
    Kind.KEPT: ("lease", "project", *_OWNER_KEYS, "keep_until", "template", "seed", "hold"),
    Kind.TEMPLATE: ("fingerprint", "seed", "template", *_OWNER_KEYS),
    Kind.BUILDING: ("fingerprint", "seed", "template", *_OWNER_KEYS),
    Kind.SPARE: ("template", "template_oid", "fingerprint", "seed", "host", "created_at"),
    Kind.UNKNOWN: (),
}


@dataclass(frozen=True, kw_only=True)
class Marker:
    """The typed content of a marker. Fields of the wrong JSON type read as None."""

    kind: Kind
    base: str | None = None  # the name base (``database.name_base``) of the config that made it
    format: int | None = TEMPLATE_FORMAT_VERSION
    lease: str | None = None  # the registry lease (project databases)
    project: str | None = None
    host: str | None = None  # the owner's (or maker's) host id
    pid: int | None = None  # the owner's pid; with ``start``, proof of life on its host
    start: float | None = None  # the owner's process start time
    run: str | None = None  # the run id of the owner (or of the run that built a template)
    created_at: float | None = None
    keep_until: float | None = None  # a kept database lives until then
    template: str | None = None  # the template it was cloned from (or will be published as)
    template_oid: int | None = None  # spares: the OID of the template build they came from
    fingerprint: str | None = None
    seed: str | None = None
    hold: bool | None = None  # shared server: whether the owner holds the name's advisory lock
    # Shared server, an owner that cannot hold the lock (``invoke db.allocate``): it lives until
    # then unless renewed (``invoke db.renew``, or allocating again).
    expires: float | None = None
    last_used: float | None = None  # templates: when a clone was last made from it

    @classmethod
    def parse(cls, comment: str | None) -> Marker | None:
        """The marker in a database comment, or None if it is not an e2e-infra marker."""
        data = parse_marker(comment)
        return None if data is None else cls.from_json(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Marker:
        raw_kind = data.get("kind")
        kind = (
            _KIND_VALUES.get(raw_kind, Kind.UNKNOWN) if isinstance(raw_kind, str) else Kind.UNKNOWN
        )
        return cls(
            kind=kind,
            base=_text(data.get("base")),
            format=_integer(data.get("format")),
            lease=_text(data.get("lease")),
            project=_text(data.get("project")),
            host=_text(data.get("host")),
            pid=_integer(data.get("pid")),
            start=_number(data.get("start")),
            run=_text(data.get("run")),
            created_at=_number(data.get("created_at")),
            keep_until=_number(data.get("keep_until")),
            template=_text(data.get("template")),
            template_oid=_integer(data.get("template_oid")),
            fingerprint=_text(data.get("fingerprint")),
            seed=_text(data.get("seed")),
            hold=data.get("hold") if isinstance(data.get("hold"), bool) else None,
            expires=_number(data.get("expires")),
            last_used=_number(data.get("last_used")),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        keys = {"kind", "base", "format", *_KEYS[self.kind]}
        out = {key: value for key, value in data.items() if key in keys or value is not None}
        out["kind"] = self.kind.value
        out["tool"] = TOOL
        return out

    def comment(self) -> str:
        """The comment text: the prefix and compact JSON with sorted keys."""
        return MARKER_PREFIX + json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def comment_sql(self, name: str) -> sql.Composed:
        """``COMMENT ON DATABASE <name> IS '<marker>'``."""
        return sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            ident(name), sql.Literal(self.comment())
        )

    def is_spare_of(self, base: str, template: str, template_oid: int | None, fp: str) -> bool:
        """A spare made from this very build of ``template`` (same OID: not from before a
        rebuild), by a config of name base ``base``."""
        return (
            self.kind is Kind.SPARE
            and self.base == base
            and self.template == template
            and self.fingerprint == fp
            and template_oid is not None
            and self.template_oid == int(template_oid)
        )


def parse_marker(comment: str | None) -> dict[str, Any] | None:
    """The raw JSON of an e2e-infra marker in ``comment``, else None (see :meth:`Marker.parse`
    for the typed value)."""
    if not comment or not comment.startswith(MARKER_PREFIX):
        return None
    try:
        data = json.loads(comment[len(MARKER_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return None
    return data


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: object) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class MarkedDatabase:
    """A database on the server that carries a marker of our name base."""

    name: str
    marker: Marker
    is_template: bool
    size: int | None = None  # bytes, when asked for
    oid: int | None = None

    @property
    def kind(self) -> Kind:
        return self.marker.kind


# --- the keep / drop policy -----------------------------------------------------------------------


class Action(enum.Enum):
    KEEP = "keep"
    DROP = "drop"
    # A database on a shared server whose owner holds an advisory lock while it lives (a project
    # database's name lock; a half-built template's build lock): drop it only if that lock can be
    # taken (proof that no owner holds it any more).
    DROP_IF_UNLOCKED = "drop if unlocked"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str  # why it may go, or why it stays

    @property
    def drop(self) -> bool:
        return self.action is Action.DROP


def _keep(reason: str) -> Verdict:
    return Verdict(Action.KEEP, reason)


def _drop(reason: str) -> Verdict:
    return Verdict(Action.DROP, reason)


@dataclass(frozen=True)
class Facts:
    """What is known about a marked database besides its marker, observed before deciding."""

    now: float  # epoch seconds
    host: str  # this host's id
    shared: bool = False  # other hosts allocate on this server
    ttl: float | None = None  # lease_ttl: how long an owner nothing can check counts as alive
    # Why the owner named in the marker is proven gone (its pid is dead, or runs another process);
    # only trusted when the marker's host is this host.
    owner_gone: str | None = None
    has_lease: bool = False  # our registry holds the lease the marker names
    lease_keep_until: float | None = None  # that lease's keep
    lease_stale: str | None = None  # why that lease is stale, None while its owner may live
    # Shared server: whether some session holds the database's proof-of-life lock now (its name's;
    # a half-built template's build lock) (None: not looked).
    locked: bool | None = None


def decide(marker: Marker, facts: Facts) -> Verdict:
    """Whether the database of ``marker`` may be dropped, and why: only on proof that its owner
    is gone, or that its keep expired. Templates and spares are never dropped here (see
    :func:`templates_to_prune` and :func:`stale_spares`), nor are kinds this version does not
    know."""
    gone = facts.owner_gone if marker.host == facts.host else None
    if marker.kind.is_project_database:
        keep_until = marker.keep_until
        if facts.has_lease and facts.lease_keep_until is not None:
            keep_until = facts.lease_keep_until
        if keep_until is not None:
            if keep_until > facts.now:
                return _keep(f"kept until {when(keep_until)}")
            return _drop(f"kept until {when(keep_until)}, expired")
        if facts.shared and marker.hold:
            # A pid proves nothing here (another pid namespace may share the host id): only the
            # name's lock, found free twice (see .sweep), proves the owner gone.
            if facts.has_lease and not facts.lease_stale:
                return _keep("its lease is live")
            why = f"lease is stale: {facts.lease_stale}" if facts.has_lease else None
            why = why or (f"{gone}, " if gone else "") + (
                f"its owner on host {marker.host} holds no lock on it any more (gone)"
            )
            return Verdict(Action.DROP_IF_UNLOCKED, why)
        if facts.has_lease:
            if facts.lease_stale:
                return _drop(f"lease is stale: {facts.lease_stale}")
            return _keep("its lease is live")
        if not facts.shared and marker.expires is None:
            return _drop(f"no lease and {gone}") if gone else _keep("its owner may be alive")
        # An owner that is no process to check: a command on a shared server (it cannot hold a
        # lock), or a lease with a time to live (--ttl, whose shell is gone by design): its
        # expiry decides, never a pid.
        if marker.expires is not None:
            if marker.expires > facts.now:
                return _keep(
                    f"allocated by a command on host {marker.host}, until {when(marker.expires)}"
                )
            return _drop(
                f"allocated by a command on host {marker.host} and not renewed: expired "
                f"{when(marker.expires)}"
            )
        created, ttl = marker.created_at, facts.ttl
        if ttl is not None and created is not None and facts.now - created > ttl:
            return _drop(
                f"owner on host {marker.host} cannot be checked (allocated by a command) and it "
                f"is older than lease_ttl ({ttl:g}s)"
            )
        return _keep(f"owner on host {marker.host} cannot be checked")
    if marker.kind is Kind.BUILDING:
        if facts.shared:
            # As for a project database: a pid proves nothing here (another pid namespace may
            # share the host id); only the fingerprint's build lock, which the builder holds
            # for the whole build, found free twice (see .sweep), proves the builder gone.
            return Verdict(
                Action.DROP_IF_UNLOCKED,
                f"half-built template whose builder on host {marker.host} holds no build lock "
                "on it any more (gone)",
            )
        if gone:
            return _drop(f"half-built template whose builder is gone ({gone})")
        return _keep("being built")
    if marker.kind is Kind.TEMPLATE:
        return _keep("templates are pruned by age (keep_templates)")
    if marker.kind is Kind.SPARE:
        return _keep("spares are dropped when their template changes")
    return _keep("of a kind this version does not know")


def status(marker: Marker, facts: Facts) -> str:
    """The one-line status ``invoke db.list`` shows."""
    if marker.kind is Kind.TEMPLATE:
        return "ready"
    if marker.kind is Kind.BUILDING:
        if facts.shared:
            if facts.locked is False:
                return (
                    f"unlocked: its builder on host {marker.host} holds no build lock now "
                    "(cleanup drops it if still so after a grace)"
                )
            return "building"
        gone = facts.owner_gone if marker.host == facts.host else None
        return f"abandoned: {gone}" if gone else "building"
    if marker.kind is Kind.SPARE:
        return f"spare of {marker.template}"
    verdict = decide(marker, facts)
    if verdict.drop:
        return f"stale: {verdict.reason}"
    if marker.keep_until is not None:
        return f"kept until {when(marker.keep_until)}"
    if facts.shared and marker.hold and facts.locked is False:
        return (
            f"unlocked: its owner on host {marker.host} holds no lock on it now (cleanup drops "
            "it if still so after a grace and nobody is connected)"
        )
    if not facts.has_lease:
        if facts.shared and marker.hold:
            return f"live (host {marker.host} holds its lock)"
        if facts.shared:
            until = f", until {when(marker.expires)}" if marker.expires is not None else ""
            return f"live (host {marker.host} allocated by a command{until})"
        return "live (no lease here: another host or state folder)"
    if marker.expires is not None and not facts.shared:
        return f"live until {when(marker.expires)} (a lease with a time to live)"
    return "live"


def _created(item: MarkedDatabase) -> float:
    return item.marker.created_at or 0.0


def stale_spares(marked: Sequence[MarkedDatabase], cap: int) -> list[tuple[MarkedDatabase, str]]:
    """Spares to drop: their template is gone, was rebuilt (another OID), or they are beyond
    ``cap`` (``spares``) for their template (the oldest stay). Several templates of one seed live
    side by side (branches with other migrations): each keeps its own spares."""
    templates = {item.name: item for item in marked if item.kind is Kind.TEMPLATE}
    kept: dict[str, int] = {}
    out = []
    spares = sorted((item for item in marked if item.kind is Kind.SPARE), key=_created)
    for item in spares:
        name = str(item.marker.template)
        template = templates.get(name)
        if template is None:
            out.append((item, f"spare of template {name}, which is gone"))
        elif template.oid != item.marker.template_oid:
            out.append((item, f"spare of an earlier build of {name}"))
        elif kept.get(name, 0) >= cap:
            out.append((item, f"spare beyond spares = {cap} for {name}"))
        else:
            kept[name] = kept.get(name, 0) + 1
    return out


def last_used(item: MarkedDatabase) -> float:
    """When a template was last cloned (or built, if never since)."""
    return max(item.marker.last_used or 0.0, _created(item))


def templates_to_prune(
    marked: Sequence[MarkedDatabase],
    *,
    keep: str | None,
    limit: int,
    now: float,
    max_age: float,
) -> list[tuple[MarkedDatabase, str]]:
    """Templates (one per fingerprint) to drop: not used for ``max_age`` seconds
    (``template_keep_hours``) and not among the ``limit`` (``keep_templates``) most recently used
    of their seed. ``keep`` (the one just built or used) always stays. So branches with other
    migrations used at once each keep their template, however many there are."""
    by_seed: dict[str, list[MarkedDatabase]] = {}
    for item in marked:
        if item.kind is Kind.TEMPLATE:
            by_seed.setdefault(str(item.marker.seed), []).append(item)
    out = []
    for seed, items in by_seed.items():
        items.sort(key=lambda it: (it.name == keep, last_used(it)), reverse=True)
        for item in items[limit:]:
            idle = now - last_used(item)
            if item.name != keep and idle > max_age:
                out.append(
                    (
                        item,
                        f"template of seed {seed} unused for {idle / 3600:.1f}h "
                        f"(template_keep_hours = {max_age / 3600:g}, keep_templates = {limit})",
                    )
                )
    return out


def count_databases(marked: Sequence[MarkedDatabase], host: str) -> tuple[int, int]:
    """(this host's, all hosts') project databases and spares: what the caps count. Templates
    and templates being built do not count."""
    counted = [item for item in marked if item.kind.is_project_database or item.kind is Kind.SPARE]
    return sum(1 for item in counted if item.marker.host == host), len(counted)


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))
