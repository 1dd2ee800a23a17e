"""``<results>/report.html``: one self-contained page to read a run instead of its logs.

A row per project, in the order they started: its result, its test counts (from its JUnit file),
its duration, its last results and durations (a pass/fail/flaky strip and a trend line, from
the records earlier runs left: :mod:`.history`), a timeline of its phases on a time axis shared
by every project (so parallel runs show side by side; round tick labels; the suite's bar coloured
by the result), and links to its
logs, JUnit file, ``run.json`` and any screenshot, trace or Playwright HTML report its suite
wrote. Under a project that did not pass: the error, each failing test with the first lines of
its message (and its screenshots), and the tail of a failed server's log.

The page has no script and loads nothing from the network: inline CSS, links relative to the
page, so the results folder can be archived as a CI artifact and opened anywhere. Every text is
escaped, and every log text goes through :func:`~e2e_infra.conninfo.mask_secrets`.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..conninfo import mask_secrets
from ..files import RESULTS_SETTING, folder_error
from ..results.record import Result, RunRecord
from .details import DETAILS_CSS, console_html, fold_links, merged_reports_html, prepare_html
from .history import HTML_CSS, History, history, html_history
from .junit import FailedTest
from .summary import (
    artifact_kind,
    collect_runs,
    cpu_text,
    peak_memory_text,
    run_artifacts,
    tests_of,
)
from .wall import wall_time

__all__ = ["latest_per_project", "nice_ticks", "render_html", "write_html_report"]
_LOG_TAIL_LINES = 40
_LOG_TAIL_CHARS = 8000
# Phases before and after the suite in quiet colours; the suite's bar says how the run ended.
_PHASE_COLOURS: Mapping[str, str] = {
    "ports": "#9aa7ba",
    "database": "#5b7fa8",
    "servers": "#8a78b8",
    "health": "#5aa6b0",
    "teardown": "#b9b9b9",
}
_STATUS_COLOURS: Mapping[str, str] = {
    "green": "#2e9d3a",
    "red": "#d32f2f",
    "amber": "#f0a020",
    "grey": "#9e9e9e",
}
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em;
  color: #1f2328; background: #fff; }
h1 { font-size: 1.35em; margin: 0 0 .2em; }
.meta { color: #57606a; margin-bottom: .8em; }
.merged { margin: -.4em 0 .8em; } .merged a { font-weight: 600; }
.meta b.red { color: #d32f2f; } .meta b.green { color: #2e7d32; } .meta b.amber { color: #b26a00; }
.legend { color: #57606a; font-size: 12px; margin-bottom: .6em; }
.wall { color: #24292f; font-size: 13px; margin-bottom: .8em; }
.wall ul { margin: .2em 0; padding-left: 1.2em; color: #57606a; }
.legend span { display: inline-block; margin-right: 1.1em; }
.legend i { display: inline-block; width: .9em; height: .9em; margin-right: .3em;
  vertical-align: -.1em; border-radius: 2px; }
table.runs { border-collapse: collapse; width: 100%; }
table.runs th { text-align: left; font-weight: 600; color: #57606a; font-size: 12px;
  padding: .3em .6em; border-bottom: 2px solid #d0d7de; vertical-align: bottom; }
table.runs td { padding: .45em .6em; vertical-align: middle; }
tr.run td { border-top: 1px solid #d8dee4; }
tr.run td.project { border-left: 5px solid #9e9e9e; font-weight: 600; white-space: nowrap; }
tr.run.status-green td.project { border-left-color: #2e9d3a; }
tr.run.status-red td.project { border-left-color: #d32f2f; }
tr.run.status-amber td.project { border-left-color: #f0a020; }
td.project .extra { font-weight: 400; color: #57606a; font-size: 12px; }
td.result { font-weight: 600; white-space: nowrap; }
.status-green td.result { color: #2e7d32; } .status-red td.result { color: #c62828; }
.status-amber td.result { color: #b26a00; } .status-grey td.result { color: #57606a; }
td.tests { white-space: nowrap; font-size: 13px; }
td.tests .passed { color: #2e7d32; } td.tests .failed, td.tests .errors { color: #c62828;
  font-weight: 600; } td.tests .skipped { color: #b26a00; }
td.tests .none { color: #8c959f; font-style: italic; } td.tests .flaky { color: #b26a00; }
td.duration { white-space: nowrap; font-variant-numeric: tabular-nums; }
th.timeline, td.timeline { width: 46%; min-width: 320px; }
.axis { position: relative; height: 1.3em; margin-top: .2em; font-weight: 400;
  font-variant-numeric: tabular-nums; }
.axis span { position: absolute; top: 0; transform: translateX(-50%); white-space: nowrap; }
.axis span.first { transform: none; } .axis span.last { transform: translateX(-100%); }
.track { position: relative; height: 20px; border-radius: 3px; background-color: #f3f4f6;
  background-repeat: repeat-x; }
.phase { position: absolute; top: 2px; height: 16px; min-width: 4px; border-radius: 2px;
  box-sizing: border-box; border-right: 1px solid #fff; }
.phase:hover { outline: 2px solid #1f2328; z-index: 2; }
td.files { font-size: 13px; }
td.files a, td.files .missing { margin-right: .7em; white-space: nowrap; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
.missing { color: #8c959f; }
tr.detail td { padding: 0 .6em .8em 1.4em; border-left: 5px solid #9e9e9e; }
tr.detail.status-red td { border-left-color: #d32f2f; background: #fff8f8; }
tr.detail.status-amber td { border-left-color: #f0a020; background: #fffaf0; }
.error { color: #b71c1c; font-weight: 500; margin: .3em 0; overflow-wrap: anywhere; }
.note { color: #8a4b00; margin: .2em 0; }
td.resources { white-space: nowrap; text-align: right; color: #57606a; }
ul.failures { margin: .3em 0; padding-left: 1.2em; }
ul.failures li { margin: .35em 0; }
.test { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px;
  font-weight: 600; }
.kind { font-size: 11px; color: #fff; background: #c62828; border-radius: 3px; padding: 0 .35em;
  margin-left: .4em; vertical-align: .1em; }
.test-links a { margin-left: .6em; font-size: 13px; }
pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; background: #f6f8fa;
  border: 1px solid #d8dee4; border-radius: 4px; padding: .4em .6em; margin: .25em 0;
  white-space: pre-wrap; overflow-wrap: anywhere; max-height: 22em; overflow: auto; }
pre.message { border-left: 3px solid #d32f2f; }
details summary { cursor: pointer; color: #57606a; font-size: 13px; margin-top: .3em; }
"""


@dataclass(frozen=True)
class _Row:
    summary: RunRecord
    artifacts: Sequence[Path] = ()
    extra_runs: int = 0
    history: History | None = None  # the project's last runs, this one included


def latest_per_project(runs: Sequence[RunRecord]) -> list[tuple[RunRecord, int]]:
    """The latest run of each project, with how many other runs of it there were, in start
    order."""
    by_project: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_project.setdefault(run.project, []).append(run)
    latest = [
        (max(group, key=lambda r: r.started_at), len(group) - 1) for group in by_project.values()
    ]
    return sorted(latest, key=lambda pair: (pair[0].started_at, pair[0].project))


def nice_ticks(span: float, *, most: int = 6) -> list[float]:
    """Tick positions 0, s, 2s, ... up to the first one at or past ``span``, at most ``most`` + 1
    of them, the step ``s`` being 1, 2 or 5 x 10^n (so labels read 0 s, 2 s, 4 s, never 3.1 s)."""
    span = max(float(span), 1e-3)
    mantissa, exponent = _step(span, most)
    count = math.ceil(span / (mantissa * 10.0**exponent) - 1e-9)
    # From the decimal text: 3 x 0.1 is 0.30000000000000004 in floats, "3e-1" is 0.3.
    return [float(f"{i * mantissa}e{exponent}") for i in range(count + 1)]


def _step(span: float, most: int) -> tuple[int, int]:
    exponent = math.floor(math.log10(span / most))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10.0**exponent * most >= span * (1 - 1e-12):
            return (1, exponent + 1) if mantissa == 10 else (mantissa, exponent)
    return 1, exponent + 1  # not reached: 10 x 10^floor(log10(x)) > x


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")  # 0 s, 0.5 s, 1 s, 1.5 s
    return f"{text} s"


def _status(result: Result) -> str:
    return result.css


def _colour(phase: str) -> str:
    if phase in _PHASE_COLOURS:
        return _PHASE_COLOURS[phase]
    hue = zlib.crc32(phase.encode()) % 360
    return f"hsl({hue}, 35%, 60%)"


def _href(path: Path, base: Path) -> str:
    href = os.path.relpath(path, base) if path.is_absolute() else str(path)
    return html.escape(Path(href).as_posix())


def _link(label: str, target: str | Path | None, base: Path, *, title: str = "") -> str:
    if not target:
        return ""
    path = Path(target)
    if not path.is_file():
        tip = html.escape(f"{label}: {path} (not found)")
        return f'<span class="missing" title="{tip}">{html.escape(label)}</span>'
    tip = f' title="{html.escape(title)}"' if title else ""
    return f'<a href="{_href(path, base)}"{tip}>{html.escape(label)}</a>'


def _artifact_links(paths: Sequence[Path], base: Path, folder: Path | None) -> list[str]:
    seen: dict[str, int] = {}
    links = []
    for path in paths:
        kind = artifact_kind(path) or path.name
        seen[kind] = seen.get(kind, 0) + 1
        label = kind if seen[kind] == 1 else f"{kind} {seen[kind]}"
        try:
            shown = path.relative_to(folder or base).as_posix()
        except ValueError:
            shown = os.path.relpath(path, base)
        links.append(
            f'<a class="artifact" data-kind="{html.escape(kind)}" href="{_href(path, base)}" '
            f'title="{html.escape(shown)}">{html.escape(label)}</a>'
        )
    return links


def _result_phase(run: RunRecord) -> str | None:
    """The phase whose bar shows the result: the suite, or where a run that never got there
    stopped."""
    if "suite" in run.phases:
        return "suite"
    before_teardown = [p for p in run.phases if p != "teardown"]
    return before_teardown[-1] if before_teardown else None


def _timeline(run: RunRecord, t0: float, axis: float) -> str:
    bars = []
    at = run.started_at - t0
    status = _status(run.result)
    shows_result = _result_phase(run)
    for name, seconds in run.phases.items():
        left = 100.0 * at / axis
        width = 100.0 * seconds / axis
        colour = _STATUS_COLOURS[status] if name == shows_result else _colour(name)
        title = f"{name}: {seconds:.2f} s (from +{at:.2f} s)"
        if name == shows_result:
            title += f"; {run.result.label}"
        extra = " result" if name == shows_result else ""
        bars.append(
            f'<div class="phase{extra}" data-phase="{html.escape(name)}" '
            f'data-seconds="{seconds:.3f}" title="{html.escape(title)}" '
            f'style="left:{left:.3f}%;width:{width:.3f}%;background:{colour}"></div>'
        )
        at += seconds
    return f'<div class="track bar-{status}">{"".join(bars)}</div>'


def _counts(run: RunRecord) -> str:
    tests = tests_of(run)
    if tests.problem:
        return f'<span class="none">{html.escape(tests.problem)}</span>'
    parts = [f'<span class="{k}">{n} {k}</span>' for k, n in tests.counts()]
    return ", ".join(parts) or '<span class="none">0 tests</span>'


def _test_artifacts(failure: FailedTest, artifacts: Sequence[Path]) -> list[Path]:
    slug = re.sub(r"[^a-z0-9]+", "-", failure.name.rpartition("::")[2].lower()).strip("-")[:24]
    if len(slug) < 3:
        return []
    return [p for p in artifacts if slug in re.sub(r"[^a-z0-9]+", "-", p.parent.name.lower())]


def _history(row: _Row) -> str:
    return html_history(row.history, row.summary) if row.history is not None else ""


def _detail(row: _Row, base: Path, columns: int) -> str:
    run = row.summary
    failures = tests_of(run).failures
    if run.result is Result.PASSED and not failures and not run.log_tail and not run.notes():
        return ""
    parts = []
    if run.error:
        parts.append(f'<div class="error">{html.escape(mask_secrets(run.error))}</div>')
    elif not run.result.ok and not failures:
        reason = tests_of(run).problem or "no failing test in its JUnit file"
        label = html.escape(run.result.label)
        parts.append(f'<div class="error">{label} ({html.escape(reason)})</div>')
    # A server that died, and what a part left running: one line each.
    parts += [f'<div class="note">{html.escape(note)}</div>' for note in run.notes()]
    if failures:
        items = []
        for failure in failures:
            kind = "" if failure.kind == "failure" else '<span class="kind">error</span>'
            files = [*_test_artifacts(failure, row.artifacts)]
            files += [p for p in map(Path, failure.attachments) if p.is_file() and p not in files]
            links = _artifact_links(files, base, run.folder)
            where = (
                f'<span class="location">{html.escape(failure.location)}</span>'
                if failure.location
                else ""
            )
            items.append(
                f'<li class="failure"><span class="test">{html.escape(failure.name)}</span>{kind}'
                f'{where}<span class="test-links">{fold_links(links)}</span>'
                f'<pre class="message">{html.escape(mask_secrets(failure.message))}</pre></li>'
            )
        parts.append(f'<ul class="failures">{"".join(items)}</ul>')
    if not run.result.ok:
        parts.append(console_html(run))
    if run.log_tail:
        tail = "\n".join(mask_secrets(run.log_tail).rstrip().splitlines()[-_LOG_TAIL_LINES:])
        what = "its output" if run.error_log else "the failed server's log"
        parts.append(
            f"<details open><summary>last lines of {what}</summary>"
            f'<pre class="log">{html.escape(tail[-_LOG_TAIL_CHARS:])}</pre></details>'
        )
    status = _status(run.result)
    return (
        f'<tr class="detail status-{status}" data-project="{html.escape(run.project)}">'
        f'<td colspan="{columns}">{"".join(parts)}</td></tr>'
    )


def _wall_block(runs: Sequence[RunRecord]) -> str:
    """Where the wall time went (:mod:`.wall`), at the top of the page."""
    spent = wall_time(runs)
    if spent is None or len(runs) < 2:
        return ""
    lines = "".join(f"<li>{html.escape(line.strip())}</li>" for line in spent.lines()[1:])
    head = html.escape(spent.lines()[0])
    return f'<div class="wall"><b>{head}</b><ul>{lines}</ul></div>'


def render_html(
    rows: Sequence[_Row],
    *,
    base: Path,
    title: str = "e2e run report",
    playwright_report: Path | Sequence[Path] | None = None,
    prepare: str = "",
) -> str:
    """The page for ``rows`` (shown in start order); links are relative to the folder ``base``;
    ``playwright_report``: the run's merged Playwright HTML reports, linked at the top;
    ``prepare``: the run's prepare steps (an HTML fragment, :func:`.details.prepare_html`)."""
    if isinstance(playwright_report, Path):
        playwright_report = [playwright_report]
    rows = sorted(rows, key=lambda row: (row.summary.started_at, row.summary.project))
    runs = [row.summary for row in rows]
    t0 = min((r.started_at for r in runs), default=0.0)
    end = max((r.started_at + max(r.duration, sum(r.phases.values())) for r in runs), default=t0)
    wall = end - t0
    ticks = nice_ticks(max(wall, 0.01))
    axis = ticks[-1]
    step = ticks[1] - ticks[0]
    counts: dict[Result, int] = {}
    tests: dict[str, int] = {}
    for run in runs:
        counts[run.result] = counts.get(run.result, 0) + 1
        for label, n in tests_of(run).counts():
            tests[label] = tests.get(label, 0) + n
    phases_seen: list[str] = []
    for run in runs:
        phases_seen += [p for p in run.phases if p not in phases_seen and p != "suite"]
    known = list(_PHASE_COLOURS)
    phases_seen.sort(key=lambda p: known.index(p) if p in known else len(known))
    when = dt.datetime.fromtimestamp(t0).strftime("%Y-%m-%d %H:%M:%S") if runs else "no runs"
    columns = 9
    body = []
    for row in rows:
        run = row.summary
        status = _status(run.result)
        links = [_link(f"{name} log", path, base) for name, path in sorted(run.logs.items())]
        links.append(_link("JUnit", run.junit, base))
        links.append(_link("run.json", run.path, base))
        links.append(_link("console", run.suite_log, base))
        links.append(_link("its output", run.error_log, base))  # a migrate/seed command's, a step's
        links.append(_link("own Playwright report", run.playwright_report, base))
        links += _artifact_links(row.artifacts, base, run.folder)
        extra = f'<div class="extra">+{row.extra_runs} other run(s)</div>' if row.extra_runs else ""
        body.append(
            f'<tr class="run status-{status}" data-project="{html.escape(run.project)}" '
            f'data-result="{html.escape(run.result.label)}" data-started="{run.started_at:.3f}">'
            f'<td class="project">{html.escape(run.project)}{extra}</td>'
            f'<td class="result">{html.escape(run.result.label)}</td>'
            f'<td class="tests">{_counts(run)}</td>'
            f'<td class="duration">{run.duration:.2f} s</td>'
            f'<td class="history">{_history(row)}</td>'
            f'<td class="resources">{html.escape(peak_memory_text(run))}</td>'
            f'<td class="resources">{html.escape(cpu_text(run))}</td>'
            f'<td class="timeline">{_timeline(run, t0, axis)}</td>'
            f'<td class="files">{fold_links(links)}</td>'
            "</tr>" + _detail(row, base, columns)
        )
    legend = "".join(
        f'<span><i style="background:{_colour(p)}"></i>{html.escape(p)}</span>' for p in phases_seen
    )
    legend += (
        f'<span><i style="background:{_STATUS_COLOURS["green"]}"></i>'
        f'<i style="background:{_STATUS_COLOURS["red"]}"></i>suite: passed / failed</span>'
        "<span>hover a bar for its phase and duration</span>"
    )
    ranked = sorted(counts.items(), key=lambda kv: kv[0].severity)
    totals = (
        ", ".join(f'<b class="{_status(k)}">{n} {html.escape(k.label)}</b>' for k, n in ranked)
        or "no runs"
    )
    test_totals = ", ".join(f"{n} {k}" for k, n in tests.items())
    test_text = f"; tests: {test_totals}" if test_totals else ""
    labels = []
    for i, tick in enumerate(ticks):
        cls = ' class="first"' if i == 0 else ' class="last"' if i == len(ticks) - 1 else ""
        labels.append(
            f'<span{cls} style="left:{100.0 * tick / axis:.3f}%">{_tick_label(tick, step)}</span>'
        )
    grid = (
        f".track {{ background-image: linear-gradient(90deg, #d5d9de 1px, transparent 1px); "
        f"background-size: {100.0 * step / axis:.4f}% 100%; }}"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}{DETAILS_CSS}{HTML_CSS}{grid}</style>"
        "</head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<div class="meta">started {when} &middot; wall time {wall:.1f} s &middot; '
        f"{len(runs)} project(s): {totals}{html.escape(test_text)}</div>"
        f"{merged_reports_html(playwright_report or (), base)}{prepare}"
        f"{_wall_block(runs)}"
        f'<div class="legend">{legend}</div>'
        '<table class="runs"><thead><tr><th>project</th><th>result</th><th>tests</th>'
        "<th>duration</th><th>history</th><th>peak mem</th><th>cpu</th>"
        '<th class="timeline">timeline'
        f'<div class="axis">{"".join(labels)}</div></th><th>files</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></body></html>\n"
    )


def write_html_report(
    config: Config,
    runs: Sequence[RunRecord] | None = None,
    *,
    since: float | None = None,
    out: Path | None = None,
) -> Path:
    """Write ``<results>/report.html`` (atomically) for ``runs`` (default: the latest runs)."""
    out = out or config.layout.report
    if runs is None:
        runs = collect_runs(config, since=since)
    rows = [
        _Row(run, run_artifacts(config, run), extra, history(config, run.project))
        for run, extra in latest_per_project(runs)
    ]
    merged = config.layout.merged_playwright_reports()
    page = render_html(
        rows, base=out.parent, playwright_report=merged, prepare=prepare_html(config, out.parent)
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:  # a full or read-only results folder: one line naming it
        raise folder_error(out, exc, setting=RESULTS_SETTING, what="write") from None
    return out
