"""`invoke ports.*` as users run it: a real invoke from the repo root, ports 20400-20599."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import CLI, Cli, config_environ

pytestmark = pytest.mark.integration

LOW, HIGH = 20400, 20599


def write_config(folder: Path, port_range: str = f"{LOW}-{HIGH}") -> Path:
    path = folder / "pyproject.toml"
    path.write_text(
        f'[tool.e2e_infra]\nstate_dir = "state"\nport_range = "{port_range}"\n'
        'port_names = ["backend", "frontend"]\n'
    )
    return path


def invoke(config: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    # No -r: invoke finds the tasks.py of its working folder, the repository's root.
    done = CLI.invoke(*args, env=config_environ(config), search_root=False, timeout=60)
    assert done.returncode == code, (done.stdout, done.stderr)
    return done


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def owner() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to own leases, stopped and reaped afterwards."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def test_invoke_list_shows_every_ports_task_with_its_help(cli: Cli) -> None:
    done = cli.invoke("--list", env=None, search_root=False, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {
        line.split()[0]: line.split(maxsplit=1)[1:]
        for line in done.stdout.splitlines()
        if line.strip().startswith("ports.")
    }
    assert set(lines) == {"ports.allocate", "ports.release", "ports.list", "ports.cleanup"}
    assert all(help_text and len(help_text[0]) > 20 for help_text in lines.values()), lines


def test_allocate_json_prints_one_document_and_asking_again_returns_the_same_ports(
    config: Path, owner: subprocess.Popen[bytes]
) -> None:
    args = ("ports.allocate", "--project", "web", "--json", "--owner-pid", str(owner.pid))
    first = invoke(config, *args)

    document = json.loads(first.stdout)  # the whole of stdout is one JSON document
    assert set(document) == {"project", "ports", "run_id", "owner_pid"}
    assert document["project"] == "web" and document["owner_pid"] == owner.pid
    assert set(document["ports"]) == {"backend", "frontend"}
    assert all(LOW <= port <= HIGH for port in document["ports"].values())
    assert json.loads(invoke(config, *args).stdout) == document


def test_the_default_owner_is_the_process_that_ran_invoke(config: Path) -> None:
    done = invoke(config, "ports.allocate", "--project", "web", "--names", "backend", "--json")
    document = json.loads(done.stdout)
    assert document["owner_pid"] == os.getpid()
    assert list(document["ports"]) == ["backend"]


def test_list_shows_each_lease_as_json_and_as_a_table(
    config: Path, owner: subprocess.Popen[bytes]
) -> None:
    got = json.loads(
        invoke(
            config, "ports.allocate", "--project", "web", "--json", "--owner-pid", str(owner.pid)
        ).stdout
    )["ports"]

    leases = json.loads(invoke(config, "ports.list", "--json").stdout)["leases"]
    assert {lease["name"]: lease["port"] for lease in leases} == got
    assert {(lease["project"], lease["owner_pid"], lease["status"]) for lease in leases} == {
        ("web", owner.pid, "live")
    }

    table = invoke(config, "ports.list").stdout
    for header in ("port", "name", "project", "owner pid", "host", "run id", "age", "status"):
        assert header in table
    assert str(got["backend"]) in table and "live" in table


def test_a_sigkilled_owners_ports_are_shown_stale_and_reclaimed_by_cleanup(config: Path) -> None:
    victim = subprocess.Popen(["sleep", "120"])
    try:
        invoke(config, "ports.allocate", "--project", "web", "--owner-pid", str(victim.pid))
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)

    listed = json.loads(invoke(config, "ports.list", "--json").stdout)["leases"]
    assert [lease["status"] for lease in listed] == ["stale", "stale"]
    reclaimed = json.loads(invoke(config, "ports.cleanup", "--json").stdout)["reclaimed"]
    assert sorted(lease["name"] for lease in reclaimed) == ["backend", "frontend"]
    assert all(f"owner pid {victim.pid} is gone" in lease["reason"] for lease in reclaimed)
    assert invoke(config, "ports.cleanup").stdout.strip() == "no stale port leases"


def test_release_is_idempotent_and_all_releases_everyone(
    config: Path, owner: subprocess.Popen[bytes]
) -> None:
    for project in ("web", "api"):
        invoke(config, "ports.allocate", "--project", project, "--owner-pid", str(owner.pid))

    released = json.loads(invoke(config, "ports.release", "--project", "web", "--json").stdout)
    assert sorted(lease["name"] for lease in released["released"]) == ["backend", "frontend"]
    again = json.loads(invoke(config, "ports.release", "--project", "web", "--json").stdout)
    assert again == {"released": []}
    assert "released 2 port lease(s)" in invoke(config, "ports.release", "--all").stdout
    assert json.loads(invoke(config, "ports.list", "--json").stdout) == {"leases": []}


def test_a_truncated_registry_is_kept_aside_with_a_warning_and_the_command_works(
    config: Path,
) -> None:
    state = config.parent / "state"
    state.mkdir()
    (state / "leases.json").write_text('{"version": 1, "leases": [{"id": "3f0')

    done = invoke(config, "ports.list")

    (aside,) = state.glob("leases.json.corrupt-*")
    assert aside.read_text() == '{"version": 1, "leases": [{"id": "3f0'
    assert "WARNING" in done.stderr and str(aside) in done.stderr
    assert done.stdout.strip() == "no port leases"
    invoke(config, "ports.allocate", "--project", "web")
    assert len(json.loads((state / "leases.json").read_text())["leases"]) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("ports.allocate",), "pass --project NAME"),
        (("ports.allocate", "--project", ""), "pass --project NAME"),
        (("ports.allocate", "--project", "Web-App"), "invalid project name 'Web-App'"),
        (("ports.allocate", "--project", "web", "--names", "backend,admin"), "unknown port name"),
        (("ports.allocate", "--project", "web", "--owner-pid", "999999999"), "is not running"),
        (("ports.release",), "either --project NAME or --all"),
        (("ports.release", "--project", "web", "--all"), "either --project NAME or --all"),
        (("ports.release", "--project", "x" * 41), "invalid project name"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else None,
)
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(
    config: Path, args: tuple[str, ...], needle: str
) -> None:
    done = invoke(config, *args, code=2)
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line
    assert not (config.parent / "state" / "leases.json").exists()


def test_unknown_port_name_error_lists_the_known_names(config: Path) -> None:
    done = invoke(config, "ports.allocate", "--project", "web", "--names", "admin", code=2)
    assert "backend, frontend" in done.stderr


def test_a_range_inside_the_ephemeral_range_is_refused_with_the_fix(tmp_path: Path) -> None:
    config = write_config(tmp_path, "40000-40100")
    done = invoke(config, "ports.allocate", "--project", "web", code=2)
    assert "overlaps the kernel's ephemeral range" in done.stderr
    assert "allow_ephemeral_overlap" in done.stderr
