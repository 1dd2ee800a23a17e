"""The package's public surface: every name resolves, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import e2e_infra
from e2e_infra import errors


def test_every_public_name_is_lazy_or_an_error() -> None:
    lazy = set(e2e_infra._LAZY)
    assert lazy | set(errors.__all__) == set(e2e_infra.__all__)
    assert not lazy & set(errors.__all__)


def test_every_public_name_resolves_from_its_module() -> None:
    for name in e2e_infra.__all__:
        assert getattr(e2e_infra, name) is not None, name
    assert set(e2e_infra.__all__) <= set(dir(e2e_infra))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        e2e_infra.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_loading_the_config_does_not_import_heavy_dependencies() -> None:
    # What `invoke --list` and every nox worker do before they run anything.
    code = (
        "import sys, e2e_infra\n"
        "e2e_infra.load_config\n"
        "heavy = {'psycopg', 'rich', 'psutil'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
