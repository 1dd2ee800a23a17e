"""Playwright Test projects: detection, the flags and variables they get, the report link."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from e2e_infra.config import Config, ProjectConfig, load_config
from e2e_infra.errors import ConfigError
from e2e_infra.report.html import write_html_report
from e2e_infra.report.summary import RunSummary
from e2e_infra.run.playwright import (
    merge_playwright_reports,
    runs_playwright_test,
    suite_argv,
    suite_env,
)

RESULTS = Path("/results/run-1/web")
OUTPUT = f"--output={RESULTS / 'test-results'}"
DEMO_NODE = """sh -c 'sh ensure-deps.sh && exec npx playwright test --reporter=list,junit "$@"' b"""


def project(command: str, cwd: Path = Path("/nowhere"), **kw: object) -> ProjectConfig:
    return ProjectConfig("web", command, cwd, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "command",
    [
        "npx playwright test --project=web",
        "pnpm exec playwright test",
        "./node_modules/.bin/playwright test",
        DEMO_NODE,
        "sh -c 'cd e2e; npx playwright test'",
    ],
)
def test_a_command_running_playwright_test_is_detected(command: str) -> None:
    assert runs_playwright_test(project(command))


@pytest.mark.parametrize(
    "command",
    [
        "{python} -m pytest e2e/browser --tracing on",  # pytest-playwright: not Playwright Test
        "npx playwright show-report",
        "npx my-playwright test",
        "npx playwright tests",
        "npm test",
    ],
)
def test_other_commands_are_left_alone(command: str) -> None:
    assert not runs_playwright_test(project(command))
    argv = shlex.split(command)
    assert suite_argv(project(command), argv, RESULTS) == argv
    assert suite_env(project(command), RESULTS) == {}


def test_the_setting_wins_over_detection() -> None:
    assert runs_playwright_test(project("npm test --", playwright=True))
    off = project("npx playwright test", playwright=False)
    assert not runs_playwright_test(off)
    assert suite_argv(off, ["npx", "playwright", "test"], RESULTS) == ["npx", "playwright", "test"]
    assert suite_env(off, RESULTS) == {}


def test_the_flags_go_right_after_playwright_test_so_the_commands_own_flags_win() -> None:
    argv = ["npx", "playwright", "test", "--project=web", "--output=mine"]
    assert suite_argv(project(" ".join(argv)), argv, RESULTS) == [
        "npx",
        "playwright",
        "test",
        OUTPUT,
        "--add-reporter=blob",
        "--project=web",
        "--output=mine",
    ]


def test_inside_a_shell_script_the_flags_are_quoted_for_that_shell() -> None:
    results = Path("/my results/it's/web")
    argv = shlex.split(DEMO_NODE)
    out = suite_argv(project(DEMO_NODE), argv, results)
    assert out[:2] == ["sh", "-c"] and out[3:] == argv[3:]
    script = shlex.split(out[2])  # as the inner sh reads it
    at = script.index("test")
    assert script[at - 1 : at + 4] == [
        "playwright",
        "test",
        f"--output={results / 'test-results'}",
        "--add-reporter=blob",
        "--reporter=list,junit",
    ]


def test_a_forced_project_whose_command_hides_playwright_gets_the_flags_appended() -> None:
    out = suite_argv(project("npm test --", playwright=True), ["npm", "test", "--"], RESULTS)
    assert out == ["npm", "test", "--", OUTPUT, "--add-reporter=blob"]


def _install_playwright(root: Path, version: str) -> None:
    package = root / "node_modules" / "playwright"
    package.mkdir(parents=True)
    (package / "cli.js").write_text("")
    (package / "package.json").write_text(json.dumps({"version": version}))


def test_playwright_older_than_1_63_gets_no_blob_reporter(tmp_path: Path) -> None:
    _install_playwright(tmp_path, "1.62.2")
    (tmp_path / "e2e").mkdir()
    argv = ["npx", "playwright", "test"]
    out = suite_argv(project("npx playwright test", tmp_path / "e2e"), argv, RESULTS)
    assert out == [*argv, OUTPUT]  # --add-reporter would be an unknown option there


def test_the_reporter_variables_point_into_the_projects_results() -> None:
    env = suite_env(project("npx playwright test"), RESULTS)
    assert env == {
        "PLAYWRIGHT_HTML_OUTPUT_DIR": str(RESULTS / "playwright-report"),
        "PLAYWRIGHT_HTML_OPEN": "never",
        "PLAYWRIGHT_JUNIT_OUTPUT_FILE": str(RESULTS / "junit.xml"),
        "PLAYWRIGHT_JUNIT_INCLUDE_RETRIES": "1",
        "PLAYWRIGHT_BLOB_OUTPUT_DIR": str(RESULTS / "blob-report"),
    }


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ('"auto"', None)]
)
def test_the_playwright_setting_is_read(tmp_path: Path, value: str, expected: bool | None) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(f'[tool.e2e_infra.projects.web]\ncommand = "npm test"\nplaywright = {value}\n')
    assert load_config(path, environ={}).projects["web"].playwright is expected


def test_a_wrong_playwright_setting_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.e2e_infra.projects.web]\ncommand = "npm test"\nplaywright = "yes"\n')
    with pytest.raises(ConfigError, match=r"projects\.web\.playwright"):
        load_config(path, environ={})


def _config(tmp_path: Path) -> Config:
    return Config(
        root=tmp_path,
        source=None,
        state_dir=tmp_path / "state",
        results_dir=tmp_path / "results",
        projects={"web": project("npx playwright test", tmp_path)},
    ).for_run("run-1")


def _run(config: Config) -> RunSummary:
    folder = config.layout.project_dir("web")
    folder.mkdir(parents=True)
    record = {"project": "web", "run_id": "run-1", "result": "passed", "started_at": 1.0}
    (folder / "run.json").write_text(json.dumps(record))
    summary = RunSummary.load(folder / "run.json")
    assert summary is not None
    return summary


def test_no_blob_means_no_merge_and_no_link(tmp_path: Path) -> None:
    config = _config(tmp_path)
    run = _run(config)
    assert merge_playwright_reports(config, [run]) == []
    page = write_html_report(config, [run]).read_text()
    assert 'class="merged"' not in page


def test_a_merged_report_is_linked_at_the_top_of_report_html(tmp_path: Path) -> None:
    config = _config(tmp_path)
    run = _run(config)
    merged = config.layout.run_dir / "playwright-report" / "index.html"
    merged.parent.mkdir(parents=True)
    merged.write_text("<html></html>")
    page = write_html_report(config, [run]).read_text()
    link = '<a class="playwright-report" href="playwright-report/index.html">'
    assert link in page
    assert page.index(link) < page.index('<table class="runs">')


def test_a_blob_without_node_modules_is_one_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path)
    run = _run(config)
    (run.folder / "blob-report").mkdir()
    (run.folder / "blob-report" / "report.zip").write_bytes(b"PK")
    assert merge_playwright_reports(config, [run]) == []
    assert [r.getMessage() for r in caplog.records] == [
        "no merged Playwright report for web: no node_modules/playwright found; each project's "
        "own report is in its results folder"
    ]


def test_a_failed_merge_quotes_playwrights_own_message_not_its_last_stack_line() -> None:
    from e2e_infra.run.playwright import playwright_message

    stderr = (
        "Error: Blob reports being merged were recorded with different test directories, and\n"
        "merging cannot proceed. This may happen if you are merging reports from\n"
        "\n"
        'You can force merge by specifying a merge config file with "-c" option.\n'
        "    at mergeConfigureEvents (/x/node_modules/playwright/lib/runner/index.js:8483:15)\n"
    )
    assert playwright_message(stderr) == (
        "Error: Blob reports being merged were recorded with different test directories, and "
        "merging cannot proceed. This may happen if you are merging reports from"
    )
    assert playwright_message("") == "no output"


def test_a_config_used_by_one_project_keeps_its_reports_a_shared_one_does_not() -> None:
    from e2e_infra.run.playwright import Outputs

    kept = Outputs(html=Path("/repo/pkg/html-report"), junit=Path("/repo/pkg/junit.xml"))
    env = suite_env(project("npx playwright test"), RESULTS, keep=kept)
    assert "PLAYWRIGHT_HTML_OUTPUT_DIR" not in env and "PLAYWRIGHT_JUNIT_OUTPUT_FILE" not in env
    assert env["PLAYWRIGHT_BLOB_OUTPUT_DIR"] == str(RESULTS / "blob-report")
    assert env["PLAYWRIGHT_HTML_OPEN"] == "never"
    assert suite_env(project("npx playwright test"), RESULTS, keep=Outputs()) == suite_env(
        project("npx playwright test"), RESULTS
    )


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        (["npx", "playwright", "test", "-c", "e2e/pw.config.ts"], "e2e/pw.config.ts"),
        (["npx", "playwright", "test", "--config=e2e"], "e2e/playwright.config.ts"),
        (
            ["sh", "-c", "npm ci && npx playwright test --config e2e/pw.config.ts"],
            "e2e/pw.config.ts",
        ),
        (["npx", "playwright", "test"], "playwright.config.ts"),
    ],
)
def test_the_config_a_command_uses_is_found_without_running_node(
    tmp_path: Path, argv: list[str], found: str
) -> None:
    from e2e_infra.run.playwright_config import config_file_of

    (tmp_path / "e2e").mkdir()
    for name in ("playwright.config.ts", "e2e/playwright.config.ts", "e2e/pw.config.ts"):
        (tmp_path / name).write_text("export default {};\n")
    assert config_file_of(argv, tmp_path) == (tmp_path / found).resolve()
