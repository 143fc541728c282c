"""Report documents: headline figures, sections of text, tables and figures, written as
Markdown beside its PNGs and as one self-contained HTML file (figures as PNG data URIs, inline
CSS, no external assets: it opens offline)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

# Cells shown right-aligned: numbers (with an optional "± spread"), n/a and counts like 2/3.
NUMBER = re.compile(r"[-+]?\d[\d.]*(e[-+]?\d+)?( ± [\d.]+)?|n/a|\d+/\d+")
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;
margin:0;background:#f5f7fa}
main{max-width:1120px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:0 0 12px;color:#102a43}
.subtitle{color:#52606d;margin:0 0 20px}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:24px}
.tile{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:10px 16px;
min-width:150px}
.tile .value{font-size:24px;font-weight:600;color:#0b69a3}
.tile .label{font-size:12px;color:#52606d;text-transform:uppercase;letter-spacing:.04em}
section{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:18px 22px;
margin-bottom:18px}
section p{margin:0 0 10px;max-width:900px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
table{border-collapse:collapse;font-size:13px;margin:4px 0 12px}
caption{text-align:left;font-weight:600;padding-bottom:4px;color:#334e68}
th,td{border-bottom:1px solid #e4e7eb;padding:4px 10px;text-align:left;white-space:nowrap}
th{background:#f0f4f8;color:#334e68}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td:last-child{white-space:normal}
tbody tr:nth-child(even){background:#fafbfc}
figure{margin:0;flex:0 1 500px}figure img{width:100%;height:auto;
border:1px solid #e4e7eb;border-radius:4px}
figcaption{font-size:12px;color:#52606d}
pre{background:#f0f4f8;padding:8px 12px;border-radius:4px;overflow-x:auto;font-size:13px}
"""


@dataclass(frozen=True)
class Table:
    """A table of preformatted cells; the first column is the row label."""

    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    caption: str = ""


@dataclass(frozen=True)
class Plot:
    """A PNG figure on disk and its caption."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    """A titled part of a document: paragraphs, code, tables side by side, then figures."""

    title: str
    paragraphs: tuple[str, ...] = ()
    tables: tuple[Table, ...] = ()
    plots: tuple[Plot, ...] = ()
    code: tuple[str, ...] = ()  # command lines, shown verbatim after the paragraphs


@dataclass(frozen=True)
class Document:
    """A report: title, one-line subtitle, headline (label, value) tiles and sections."""

    title: str
    subtitle: str
    sections: list[Section]
    highlights: list[tuple[str, str]] = field(default_factory=list)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def new_figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot (no global state, no display backend)."""
    return Figure(figsize=(width, height))


def new_axes(width: float, height: float) -> tuple[Figure, Axes]:
    """A :func:`new_figure` with one set of axes."""
    fig = new_figure(width, height)
    return fig, fig.subplots()


def save_figure(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def png_data_uri(path: Path) -> str:
    """A ``data:image/png;base64,...`` URI of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.caption}**", ""] if table.caption else []
    return [*lines, f"| {' | '.join(table.headers)} |", f"|{'---|' * len(table.headers)}",
            *(f"| {' | '.join(row)} |" for row in table.rows), ""]


def to_markdown(document: Document, base: Path) -> str:
    """The document as Markdown; figures are linked relative to ``base``."""
    lines = [f"# {document.title}", "", document.subtitle, ""]
    lines += [f"- {label}: **{value}**" for label, value in document.highlights]
    for section in document.sections:
        lines += ["", f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.code:
            lines += ["```", *section.code, "```", ""]
        for table in section.tables:
            lines += _markdown_table(table)
        lines += [f"![{plot.caption}]({Path(plot.path).relative_to(base).as_posix()})"
                  for plot in section.plots]
    return "\n".join(lines).rstrip() + "\n"


def _html_table(table: Table) -> str:
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{html.escape(c)}</td>' if NUMBER.fullmatch(c)
        else f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_plot(plot: Plot) -> str:
    caption = html.escape(plot.caption)
    return (f'<figure><img src="{png_data_uri(plot.path)}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _html_section(section: Section) -> str:
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in section.paragraphs)
    if section.code:
        paragraphs += f"<pre>{html.escape(chr(10).join(section.code))}</pre>"
    tables = "".join(map(_html_table, section.tables))
    plots = "".join(map(_html_plot, section.plots))
    return (f"<section><h2>{html.escape(section.title)}</h2>{paragraphs}"
            f'<div class="row">{tables}</div><div class="row">{plots}</div></section>')


def to_html(document: Document) -> str:
    """The document as one self-contained HTML page."""
    tiles = "".join(f'<div class="tile"><div class="value">{html.escape(value)}</div>'
                    f'<div class="label">{html.escape(label)}</div></div>'
                    for label, value in document.highlights)
    sections = "".join(map(_html_section, document.sections))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(document.title)}</title><style>{CSS}</style></head><body>"
            f"<main><h1>{html.escape(document.title)}</h1>"
            f'<p class="subtitle">{html.escape(document.subtitle)}</p>'
            f'<div class="tiles">{tiles}</div>{sections}</main></body></html>\n')


def write_document(document: Document, out_dir: Path, stem: str) -> Path:
    """Write ``<stem>.md`` and ``<stem>.html`` into ``out_dir``; returns the HTML path."""
    (out_dir / f"{stem}.md").write_text(to_markdown(document, out_dir))
    path = out_dir / f"{stem}.html"
    path.write_text(to_html(document))
    return path
