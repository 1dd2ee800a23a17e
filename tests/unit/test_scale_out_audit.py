"""The drop audit of bench/scale_out.py: it must be able to fail. Synthetic server logs, runs
and lock samples; no server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from e2e_infra.databases.names import name_key

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale_out.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_out", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_out"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


so = _load()
DB = "scale_alpha_ab12"
KEY = name_key(DB)
T = 1_800_000_000.0


def run(passed: bool = False, **fields: object) -> object:
    values = {
        "host": "host1",
        "run": "r1",
        "name": DB,
        "start": T - 10,
        "end": T + 10,
        "finished": True,
        "passed": passed,
        "why": "" if passed else "hold lost for good",
        "released": T + 10.2,
        **fields,
    }
    return so.Run(**values)


def samples(start: float, end: float, held: bool = False, every: float = 0.1) -> list:
    out, t = [], start
    while t <= end:
        out.append((t, frozenset({KEY}) if held else frozenset()))
        t += every
    return out


def test_the_log_gives_the_drops_that_did_not_fail() -> None:
    log = "\n".join(
        [
            f'{T:.3f} [101] LOG:  statement: DROP DATABASE "{DB}" WITH (FORCE)',
            f"{T + 0.001:.3f} [202] LOG:  statement: CREATE DATABASE x",
            f"{T + 0.01:.3f} [101] LOG:  statement: DROP ROLE x",
            f'{T + 1:.3f} [303] LOG:  statement: DROP DATABASE "scale_beta_ab12" WITH (FORCE)',
            f'{T + 1.01:.3f} [303] ERROR:  database "scale_beta_ab12" does not exist',
            f'{T + 1.01:.3f} [303] STATEMENT:  DROP DATABASE "scale_beta_ab12" WITH (FORCE)',
            f'{T + 2:.3f} [404] LOG:  statement: DROP DATABASE "scale_tpl_x"',
            "  a continuation line",
        ]
    )
    drops = so.drops_from_log(log)
    assert [(d.name, d.pid) for d in drops] == [(DB, 101), ("scale_tpl_x", 404)]


def verdict(drop_at: float, runs: list, lock_samples: list, **kw: object) -> object:
    [only] = so.audit([so.Drop(DB, drop_at, 7)], runs, lock_samples, grace=5.0, **kw)
    return only


def test_a_drop_while_the_owner_held_its_lock_within_the_grace_is_unexplained() -> None:
    lock = samples(T - 8, T - 3.9, held=True) + samples(T - 3.8, T)
    got = verdict(T, [run()], lock)
    assert got.kind == "unexplained" and "held or asked for its lock" in got.why


def test_a_drop_after_a_whole_grace_without_the_lock_is_the_documented_limit() -> None:
    lock = samples(T - 8, T - 5.2, held=True) + samples(T - 5.1, T)
    assert verdict(T, [run()], lock).kind == "explained"
    silent = verdict(T, [run(passed=True)], lock)  # but a run that passed on it: silent
    assert silent.kind == "unexplained" and "silent" in silent.why


def test_a_hole_in_the_samples_proves_nothing_unless_the_server_was_down() -> None:
    lock = samples(T - 8, T - 4) + samples(T - 2, T)
    assert verdict(T, [run()], lock).kind == "unexplained"
    assert verdict(T, [run()], lock, down=[(T - 4.1, T - 1.9)]).kind == "explained"


def test_drops_outside_any_live_run_are_releases_or_leftovers_and_templates_are_apart() -> None:
    assert verdict(T + 10.1, [run()], []).kind == "released"
    assert verdict(T + 60, [run()], []).kind == "leftover"
    [other] = so.audit([so.Drop("scale_tpl_x_1", T, 1)], [run()], [], grace=5.0)
    assert other.kind == "other"


def test_a_suite_that_saw_its_database_missing_without_a_logged_drop_is_unexplained() -> None:
    [ghost] = so.audit([], [run()], [], grace=5.0, missing_runs=[run()])
    assert ghost.kind == "unexplained" and "no drop of it was logged" in ghost.why
