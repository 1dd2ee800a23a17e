"""What the summary and ``report.html`` show besides the table: the run's prepare steps, its merged
Playwright reports, the end of a failed suite's console output, and links that wrap or fold.

Functions of their own, so :mod:`.summary` and :mod:`.html` stay a table and a page: each takes
a run record (or the run's config) and returns lines or an HTML fragment, every text escaped and
every log text masked (:func:`~e2e_infra.conninfo.mask_secrets`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from ..conninfo import mask_secrets
from ..results.record import RunRecord
from .blob import strip_ansi

__all__ = [
    "CONSOLE_TAIL_LINES",
    "DETAILS_CSS",
    "console_html",
    "console_tail",
    "fold_links",
    "merged_reports_html",
    "prepare_html",
    "prepare_lines",
]

CONSOLE_TAIL_LINES = 15  # of a failed suite's console output, in the terminal
_HTML_TAIL_LINES = 40
_TAIL_BYTES = 64 * 1024
FOLD_AFTER = 8  # links shown before the rest fold into "+N more"

DETAILS_CSS = """
td.files { max-width: 26em; overflow-wrap: anywhere; }
td.files a, td.files .missing { white-space: normal; }
details.more { display: inline; } details.more summary { display: inline; font-size: 13px; }
details.more[open] summary { margin-bottom: .2em; }
.prepare { margin: -.2em 0 .8em; font-size: 13px; color: #57606a; }
.prepare li { margin: .15em 0; } .prepare .failed { color: #b71c1c; font-weight: 600; }
.location { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; color: #57606a;
  margin-left: .6em; }
"""


def console_tail(run: RunRecord, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of ``run``'s console output (its suite's, as kept in
    ``suite.log``), colour codes removed and secrets masked; [] when there is none."""
    if not run.suite_log:
        return []
    try:
        with open(run.suite_log, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(size - _TAIL_BYTES, 0))
            data = handle.read()
    except OSError:
        return []
    text = strip_ansi(data.decode("utf-8", "replace")).replace("\r\n", "\n")
    # A progress line redrawn with \r: keep what it said last.
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    while shown and not shown[-1].strip():
        shown.pop()
    return mask_secrets("\n".join(shown[-lines:])).splitlines() if shown else []


def console_html(run: RunRecord) -> str:
    """The end of a failed run's console output, folded open, as an HTML fragment."""
    tail = console_tail(run, _HTML_TAIL_LINES)
    if not tail:
        return ""
    return (
        '<details open class="console"><summary>last lines of the suite\'s console output'
        f'</summary><pre class="log">{html.escape(chr(10).join(tail))}</pre></details>'
    )


def fold_links(links: Sequence[str], *, after: int = FOLD_AFTER) -> str:
    """``links`` (HTML fragments) separated so that they wrap; beyond ``after`` of them the rest
    fold into a "+N more" that opens on a click (no script: ``<details>``)."""
    shown = [link for link in links if link]
    if len(shown) <= after + 1:
        return " ".join(shown)
    rest = shown[after:]
    return (
        " ".join(shown[:after])
        + f' <details class="more"><summary>+{len(rest)} more</summary>'
        + " ".join(rest)
        + "</details>"
    )


def _href(path: Path, base: Path) -> str:
    return html.escape(Path(os.path.relpath(path, base)).as_posix())


def merged_reports_html(reports: Sequence[Path], base: Path, root: Path | None = None) -> str:
    """The links to the run's merged Playwright reports: one for a run of one test directory,
    one per test directory otherwise (``playwright merge-reports`` merges only those)."""
    if not reports:
        return ""
    if len(reports) == 1:
        return (
            '<div class="merged"><a class="playwright-report" href="'
            f'{_href(reports[0], base)}">Playwright HTML report of the whole run</a> (every '
            "Playwright Test project's tests, traces and screenshots, merged)</div>"
        )
    links = []
    for index in reports:
        label = index.parent.name.removeprefix("playwright-report-")
        links.append(
            f'<a class="playwright-report" href="{_href(index, base)}">{html.escape(label)}</a>'
        )
    return (
        '<div class="merged">Playwright HTML reports of the run, one per test directory '
        f"(Playwright merges only blobs of one): {', '.join(links)}</div>"
    )


def prepare_lines(config: Config) -> list[str]:
    """One line per prepare step of the run: what it did, how long, its log."""
    from ..run.prepare import read_prepared

    record = read_prepared(config)
    if record is None:
        return []
    lines = []
    for step in record.steps:
        took = f" in {step.seconds:.2f}s" if step.seconds else ""
        lines.append(f"prepare {step.name} (`{step.command}`): {step.reason}{took}")
    return lines


def prepare_html(config: Config, base: Path) -> str:
    """The run's prepare steps as a list under the title: status, seconds, reason, log."""
    from ..run.prepare import StepStatus, read_prepared

    record = read_prepared(config)
    if record is None:
        return ""
    items = []
    for step in record.steps:
        failed = step.status is StepStatus.FAILED
        took = f", {step.seconds:.2f} s" if step.seconds else ""
        log = ""
        if step.log and Path(step.log).is_file():
            log = f' <a href="{_href(Path(step.log), base)}">log</a>'
        css = ' class="failed"' if failed else ""
        items.append(
            f'<li data-step="{html.escape(step.name)}" data-status="{step.status.value}">'
            f"<span{css}>prepare {html.escape(step.name)}</span> "
            f"<code>{html.escape(step.command)}</code>: {html.escape(step.reason)}{took}{log}</li>"
        )
    return f'<ul class="prepare">{"".join(items)}</ul>'
