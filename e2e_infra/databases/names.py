"""Database names, host tags, lock keys and template fingerprints.

Every name the tool creates matches ``[a-z][a-z0-9_]*`` and fits PostgreSQL's 63 bytes (longer
names would be truncated silently); SQL gets a name only through :func:`ident`, which validates it
and quotes it with :class:`psycopg.sql.Identifier`.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from psycopg import sql

from ..errors import InvalidNameError
from .migrations import Runner

__all__ = [
    "TEMPLATE_FORMAT_VERSION",
    "FingerprintCache",
    "build_name",
    "build_prefix",
    "database_name",
    "fingerprint",
    "host_tag",
    "ident",
    "spare_name",
    "spare_prefix",
    "template_name",
    "validate_dbname",
]

# 2: grants to the project roles' group (see .roles); 3: built by a role of its own, objects owned
# by the group, the bookkeeping in the admin's schema e2e_infra.
TEMPLATE_FORMAT_VERSION = 3
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
MAX_IDENTIFIER = 63  # bytes; PostgreSQL truncates longer names silently
# Input files changed less than this long ago are hashed again on every allocation (see
# FingerprintCache): longer than any filesystem's timestamp tick.
_RACY_SECONDS = 2


def validate_dbname(name: str) -> str:
    """Return ``name`` if it is a database name we may create (``[a-z][a-z0-9_]*``, <= 63)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > MAX_IDENTIFIER:
        raise InvalidNameError(
            f"invalid database name {str(name)[:80]!r}: use at most 63 characters, a lowercase "
            "letter first, then lowercase letters, digits or '_'",
            kind="database",
            value=name,
        )
    return name


def ident(name: str) -> sql.Identifier:
    """The SQL identifier of database ``name``, validated first."""
    return sql.Identifier(validate_dbname(name))


def join_name(*parts: str) -> str:
    return "_".join(part for part in parts if part)


def template_name(base: str, seed: str, fp: str) -> str:
    """``<base>_tpl_<seed>_<fp[:12]>``; the seed part is shortened to fit 63 bytes (the
    fingerprint covers the full seed name, so names stay unique)."""
    room = MAX_IDENTIFIER - len(base) - len("_tpl__") - 12
    return validate_dbname(f"{base}_tpl_{seed[: max(room, 1)]}_{fp[:12]}")


def database_name(base: str, project: str, suffix: str = "") -> str:
    """``<base>_<project>`` or, with a suffix, ``<base>_<project>_<suffix>`` within 63 bytes."""
    name = f"{base}_{project}"
    if suffix:
        name = f"{name[: MAX_IDENTIFIER - len(suffix) - 1]}_{suffix}"
    return validate_dbname(name)


def spare_name(base: str, fp: str) -> str:
    """``<base>_spare_<fp[:12]>_<random>``: unique without coordination, findable by prefix."""
    return validate_dbname(f"{spare_prefix(base, fp)}{os.urandom(3).hex()}")


def spare_prefix(base: str, fp: str) -> str:
    return f"{base}_spare_{fp[:12]}_"


def build_name(base: str, fp: str, pid: int) -> str:
    """``<base>_build_<fp[:12]>_<pid>``: a template while it is being built."""
    return validate_dbname(f"{build_prefix(base, fp)}{pid}")


def build_prefix(base: str, fp: str) -> str:
    return f"{base}_build_{fp[:12]}_"


def host_tag(host_id: str) -> str:
    """Four hex digits of the host id: the part of a name that keeps hosts apart on a shared
    server (a clash of two hosts' tags only costs a suffix: a name in use is never taken)."""
    return hashlib.sha256(host_id.encode("utf-8")).hexdigest()[:4]


# --- advisory lock keys ---------------------------------------------------------------------------


def name_key(name: str) -> int:
    """The advisory lock key that a live owner holds (shared) for database ``name``."""
    digest = hashlib.sha256(b"e2e-infra database " + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def build_key(fp: str) -> int:
    """The advisory lock key under which the template of fingerprint ``fp`` is built."""
    return int.from_bytes(bytes.fromhex(fp[:16]), "big", signed=True)


def spare_key(fp: str) -> int:
    """The advisory lock key under which spares of fingerprint ``fp`` are made (not the build's)."""
    return build_key(fp) ^ 0x5350415245  # "SPARE"


# --- fingerprints ---------------------------------------------------------------------------------


def fingerprint(migrations: Runner, seed: Runner, seed_profile: str, server_major: int) -> str:
    """sha256 hex of everything that shapes a template's data."""
    digest = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        head = label.encode("utf-8")
        digest.update(len(head).to_bytes(4, "big") + head + len(data).to_bytes(8, "big") + data)

    put("format", str(TEMPLATE_FORMAT_VERSION).encode())
    put("server_major", str(server_major).encode())
    put("seed_profile", seed_profile.encode())
    for role, runner in (("migrations", migrations), ("seed", seed)):
        # The kind of runner is part of the data: the same files run by other code may differ.
        put(f"{role}.runner", type(runner).__name__.encode())
        for name, content in runner.inputs():
            put(f"{role}:{name}", content)
    return digest.hexdigest()


class FingerprintCache:
    """:func:`fingerprint`, remembered by the inputs' file stamps (name, size, mtime, ctime,
    inode: ``stat`` instead of reading and hashing every file on each allocation).

    A long-lived allocator must never hand out a stale template, so the stamps are taken on every
    call (a file added, removed, rewritten or replaced changes them), and a result is remembered
    only when every input is older than :data:`_RACY_SECONDS`: a second write within one timestamp
    tick, of the same size, would leave the stamp as it was (git's "racy clean" rule). A runner
    without ``stamp`` is hashed every time."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.known: dict[tuple[object, ...], str] = {}

    def get(self, migrations: Runner, seeds: Runner, seed: str, major: int) -> str:
        stamps = []
        for runner in (migrations, seeds):
            stamp = getattr(runner, "stamp", None)
            if stamp is None:
                return fingerprint(migrations, seeds, seed, major)
            stamps.append((type(runner).__name__, stamp()))
        key = (*stamps, seed, major)
        known = self.known.get(key)
        if known is not None:
            return known
        fp = fingerprint(migrations, seeds, seed, major)
        times = [
            t
            for _kind, stamp in stamps
            for part in stamp
            if isinstance(part, tuple)
            for t in part[2:4]
        ]
        settled = time.time_ns() - _RACY_SECONDS * 1_000_000_000
        if all(t < settled for t in times):
            if len(self.known) >= self.size:
                self.known.clear()  # inputs changed many times: forget the old ones
            self.known[key] = fp
        return fp
