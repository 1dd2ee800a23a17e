"""The pure parts of e2e_infra.databases.roles: SCRAM verifiers, names and markers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from e2e_infra.databases.markers import parse_marker
from e2e_infra.databases.names import database_name, validate_dbname
from e2e_infra.databases.roles import SCRAM_ITERATIONS, group_name, scram_verifier


def test_a_scram_verifier_is_what_postgresql_stores_for_the_password() -> None:
    verifier = scram_verifier("pw-123")
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert match is not None
    iterations, salt, stored, server = match.groups()
    assert int(iterations) == SCRAM_ITERATIONS
    salted = hashlib.pbkdf2_hmac("sha256", b"pw-123", base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert base64.b64decode(stored) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server) == hmac.new(salted, b"Server Key", "sha256").digest()
    assert "pw-123" not in verifier
    assert scram_verifier("pw-123") != verifier  # a new salt each time


def test_the_group_role_is_never_the_name_of_a_project_database() -> None:
    base = "e2e_db"
    group = validate_dbname(group_name(base))
    assert group.startswith(base + "__")
    # A project name starts with a letter, so <base>_<project> never has "__" after the base.
    assert not database_name(base, "a" * 40, "x1").startswith(base + "__")


def test_role_markers_are_e2e_infra_markers_with_their_kind_and_base() -> None:
    from e2e_infra.databases.roles import Roles

    class _Catalog:
        base = "b1"

    roles = Roles(_Catalog())  # type: ignore[arg-type]
    comment = roles.marker("role")
    assert parse_marker(comment) == {"base": "b1", "kind": "role", "tool": "e2e-infra"}
    assert roles.ours(comment) and not roles.ours(comment, "group")
    assert not roles.ours(None) and not roles.ours("a role made by hand")
