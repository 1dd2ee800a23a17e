"""``<results>/report.html``: one self-contained page to look at a run.

A row per project: its result, its duration, a timeline of its phases on a time axis shared by
every project (so parallel runs show side by side), and links to its logs, its JUnit file and its
``run.json``. The page has no script and loads nothing from the network: inline CSS, links
relative to the page, so the results folder can be archived as a CI artifact and opened anywhere.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .report import RunSummary, collect_runs

__all__ = ["REPORT_FILE", "latest_per_project", "render_html", "write_html_report"]

REPORT_FILE = "report.html"
_PHASE_COLOURS: Mapping[str, str] = {
    "ports": "#8e9aaf",
    "database": "#4c78a8",
    "servers": "#f58518",
    "health": "#eeca3b",
    "suite": "#54a24b",
    "teardown": "#b279a2",
}
_RESULT_COLOURS: Mapping[str, str] = {
    "passed": "#2e7d32",
    "failed": "#c62828",
    "error": "#c62828",
    "interrupted": "#ef6c00",
}
_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
.meta { color: #555; margin-bottom: 1em; }
table.runs { border-collapse: collapse; width: 100%; }
table.runs th, table.runs td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd;
  vertical-align: middle; }
td.result { font-weight: 600; }
td.timeline { width: 55%; }
.track { position: relative; height: 18px; background: #f3f3f3; border-radius: 3px; }
.phase { position: absolute; top: 0; height: 18px; min-width: 2px; border-radius: 2px;
  box-sizing: border-box; border-right: 1px solid #fff; }
.axis { display: flex; justify-content: space-between; color: #777; font-size: 12px; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: .9em; height: .9em; margin-right: .3em;
  vertical-align: -.1em; border-radius: 2px; }
.links a { margin-right: .6em; }
.missing { color: #999; margin-right: .6em; }
.error { color: #c62828; font-size: 12px; }
"""


@dataclass(frozen=True)
class _Row:
    summary: RunSummary
    logs: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    extra_runs: int = 0


def latest_per_project(runs: Sequence[RunSummary]) -> list[tuple[RunSummary, int]]:
    """The latest run of each project, with how many other runs of it there were."""
    by_project: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_project.setdefault(run.project, []).append(run)
    return [
        (max(group, key=lambda r: r.started_at), len(group) - 1)
        for _, group in sorted(by_project.items())
    ]


def _colour(phase: str) -> str:
    if phase in _PHASE_COLOURS:
        return _PHASE_COLOURS[phase]
    hue = zlib.crc32(phase.encode()) % 360
    return f"hsl({hue}, 55%, 55%)"


def _link(label: str, target: str | None, base: Path) -> str:
    if not target:
        return ""
    path = Path(target)
    if not path.is_file():
        return f'<span class="missing" title="{html.escape(str(path))}">{html.escape(label)}</span>'
    href = os.path.relpath(path, base) if path.is_absolute() else str(path)
    return f'<a href="{html.escape(Path(href).as_posix())}">{html.escape(label)}</a>'


def _timeline(run: RunSummary, t0: float, span: float) -> str:
    bars = []
    at = run.started_at - t0
    for name, seconds in run.phases.items():
        left = 100.0 * at / span
        width = 100.0 * seconds / span
        title = f"{name}: {seconds:.2f}s (from +{at:.2f}s)"
        bars.append(
            f'<div class="phase" data-phase="{html.escape(name)}" '
            f'data-seconds="{seconds:.3f}" title="{html.escape(title)}" '
            f'style="left:{left:.3f}%;width:{width:.3f}%;background:{_colour(name)}"></div>'
        )
        at += seconds
    return f'<div class="track">{"".join(bars)}</div>'


def render_html(rows: Sequence[_Row], *, base: Path, title: str = "e2e run report") -> str:
    """The page for ``rows``; links are made relative to the folder ``base``."""
    runs = [row.summary for row in rows]
    t0 = min((r.started_at for r in runs), default=0.0)
    end = max((r.started_at + max(r.duration, sum(r.phases.values())) for r in runs), default=t0)
    span = max(end - t0, 1e-3)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.result] = counts.get(run.result, 0) + 1
    phases_seen: list[str] = []
    for run in runs:
        phases_seen += [p for p in run.phases if p not in phases_seen]
    when = dt.datetime.fromtimestamp(t0).strftime("%Y-%m-%d %H:%M:%S") if runs else "no runs"
    body = []
    for row in rows:
        run = row.summary
        colour = _RESULT_COLOURS.get(run.result, "#555")
        links = [_link(name, path, base) for name, path in sorted(row.logs.items())]
        links.append(_link("junit", run.junit, base))
        links.append(_link("run.json", str(run.path), base))
        error = f'<div class="error">{html.escape(row.error)}</div>' if row.error else ""
        extra = f" (+{row.extra_runs} other run(s))" if row.extra_runs else ""
        body.append(
            f'<tr class="run" data-project="{html.escape(run.project)}" '
            f'data-result="{html.escape(run.result)}">'
            f'<td class="project">{html.escape(run.project)}{html.escape(extra)}</td>'
            f'<td class="result" style="color:{colour}">{html.escape(run.result)}{error}</td>'
            f'<td class="duration">{run.duration:.2f}s</td>'
            f'<td class="timeline">{_timeline(run, t0, span)}</td>'
            f'<td class="links">{"".join(link for link in links if link)}</td>'
            "</tr>"
        )
    legend = "".join(
        f'<span><i style="background:{_colour(p)}"></i>{html.escape(p)}</span>' for p in phases_seen
    )
    totals = ", ".join(f"{n} {html.escape(k)}" for k, n in sorted(counts.items())) or "no runs"
    ticks = "".join(f"<span>{span * i / 4:.1f}s</span>" for i in range(5))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<div class="meta">started {when}; wall time {span:.1f}s; {totals}</div>'
        f'<div class="legend">{legend}</div>'
        '<table class="runs"><thead><tr><th>project</th><th>result</th><th>duration</th>'
        f'<th>timeline<div class="axis">{ticks}</div></th><th>files</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></body></html>\n"
    )


def _details(path: Path) -> tuple[dict[str, str], str | None]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, None
    logs = data.get("logs") or {}
    clean = {str(k): str(v) for k, v in logs.items()} if isinstance(logs, dict) else {}
    error = data.get("error")
    return clean, str(error) if error else None


def write_html_report(
    config: Config,
    runs: Sequence[RunSummary] | None = None,
    *,
    since: float | None = None,
    out: Path | None = None,
) -> Path:
    """Write ``<results>/report.html`` (atomically) for ``runs`` (default: the latest runs)."""
    out = out or config.results_dir / REPORT_FILE
    if runs is None:
        runs = collect_runs(config, since=since)
    rows = []
    for run, extra in latest_per_project(runs):
        logs, error = _details(run.path)
        rows.append(_Row(run, logs, error, extra))
    page = render_html(rows, base=out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
