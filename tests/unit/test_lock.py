"""The committed lock (requirements-dev.txt) agrees with the ranges pyproject.toml declares.

The lock is what the README's commands and .ci/run install; `nox -f dev/noxfile.py -s lock` writes
it. A range changed in pyproject.toml without that session fails here, before any install does.
"""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from support import REPO_ROOT

LOCK = REPO_ROOT / "requirements-dev.txt"


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return [Requirement(line) for line in lines]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in LOCK.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"the lock pins exactly: {raw!r}"
        if req.marker is None or req.marker.evaluate({"sys_platform": "linux"}):
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_every_declared_dependency_is_pinned_in_the_lock_within_its_range() -> None:
    pins = _pins()
    wrong = []
    for req in _declared():
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            wrong.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            wrong.append(f"{req}: the lock pins {pinned}")
    assert wrong == [], "run `nox -f dev/noxfile.py -s lock`: " + "; ".join(wrong)


def test_the_lock_pins_the_extras_of_its_dependencies_too() -> None:
    pins = _pins()
    # psycopg[binary]: the C implementation the package declares must be locked as well.
    assert "psycopg-binary" in pins and pins["psycopg-binary"] == pins["psycopg"]
