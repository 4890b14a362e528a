"""The report's index.html: the claims table, every figure, the skipped ones and the runs table."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from bnstudy.analysis.figures import FigureSpec
    from bnstudy.analysis.report import Report


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_index(report: Report, specs: list[FigureSpec]) -> Path:
    esc = html.escape
    titles = {s.name: s.title for s in specs}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>bnstudy report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:3px 6px;text-align:left;vertical-align:top}img{max-width:100%}"
             ".shown{background:#d8f5d8}.not-shown{background:#f8d8d8}.no-runs{color:#888}"
             ".baseline-did-not-train{background:#f5ecd0}"
             "</style></head><body><h1>bnstudy report</h1>",
             "<h2>Claims</h2><table><tr><th>#</th><th>claim</th><th>rule</th><th>numbers</th>"
             "<th>verdict</th></tr>"]
    for c in report.claims:
        parts.append(f"<tr><td>{c.number}</td><td>{esc(c.statement)}</td><td>{esc(c.rule)}"
                     f"{'<br><i>Why: ' + esc(c.reason) + '</i>' if c.reason else ''}</td>"
                     f"<td>{'<br>'.join(map(esc, c.numbers)) or '-'}</td>"
                     f"<td class='{c.verdict.replace(' ', '-')}'><b>{esc(c.verdict)}</b>"
                     f"{'<br>' + esc(c.note) if c.note else ''}</td></tr>")
    parts.append("</table><h2>Figures</h2>")
    for name, path in report.figures.items():
        parts.append(f"<h3 id='{esc(name)}'>{esc(titles.get(name, name))}</h3>"
                     f"<img src='{esc(path.name)}' alt='{esc(name)}'>")
    if report.skipped:
        parts.append("<h3>Skipped (no runs)</h3><ul>")
        parts += [f"<li>{esc(line)}</li>" for line in report.skipped.values()]
        parts.append("</ul>")
    columns, rows = report.table
    parts.append("<h2>Runs</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns)
                 + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(format_cell(v))}</td>" for v in row) + "</tr>")
    parts.append("</table></body></html>")
    path = report.out / "index.html"
    path.write_text("\n".join(parts))
    return path
