"""A report as a list of blocks (headings, paragraphs, lists, grouped tables, figures), rendered once to
Markdown with figures beside it and once to one self-contained HTML file with figures inlined."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """Text with `code` and **bold** marks; `kind` "summary" or "note" styles it in HTML."""

    text: str
    kind: str = ""


@dataclass
class Bullets:
    items: list[str]
    kind: str = ""


@dataclass
class Cell:
    """A table cell: text, shown bold when best, with a short note (e.g. "≈ best")."""

    text: str
    bold: bool = False
    note: str = ""


@dataclass
class Table:
    """A table whose rows come in titled groups (one group per level)."""

    header: list[str]
    groups: list[tuple[str, list[list[Cell]]]]
    caption: str = ""
    left: int = 1  # leading columns of text (left-aligned); the rest are numbers


@dataclass
class Gallery:
    """Figures side by side where the page is wide enough."""

    figures: list[Figure]


@dataclass
class Figure:
    path: Path
    caption: str = ""
    width: int | None = None  # CSS pixels in HTML; None: as wide as the page allows


@dataclass
class Audio:
    path: Path
    caption: str = ""


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> Document:
        self.blocks.extend(blocks)
        return self


# Markdown


def to_markdown(doc: Document, base: Path) -> str:
    """The document as Markdown; figures are linked relative to `base` (the report's folder)."""
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        out += _md(b, base) + [""]
    return "\n".join(out).rstrip() + "\n"


def _md(b, base: Path) -> list[str]:
    if isinstance(b, Heading):
        return ["#" * b.level + " " + b.text]
    if isinstance(b, Para):
        return [f"> {b.text}" if b.kind == "note" else b.text]
    if isinstance(b, Bullets):
        return [f"- {item}" for item in b.items]
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Figure):
        return [f"![{b.caption}]({_rel(b.path, base)})", "", f"*{b.caption}*" if b.caption else ""]
    if isinstance(b, Audio):
        return [f"[{b.caption or b.path.name}]({_rel(b.path, base)})"]
    if isinstance(b, Gallery):
        return [line for f in b.figures for line in _md(f, base) + [""]]
    raise TypeError(f"unknown block {type(b).__name__}")


def _md_cell(c: Cell) -> str:
    text = f"**{c.text}**" if c.bold and c.text else c.text
    return (f"{text} {c.note}" if c.note else text).replace("|", "\\|")


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    for title, rows in t.groups:
        if title:
            lines.append("| " + " | ".join([f"*{title}*"] + [""] * (len(t.header) - 1)) + " |")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    if t.caption:
        lines += ["", t.caption]
    return lines


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


# HTML

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2125; background: #fff; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 36px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e4e7eb; }
h3 { font-size: 16px; margin: 22px 0 8px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f3f5;
       padding: 1px 5px; border-radius: 4px; }
.summary { background: #f4f8fd; border: 1px solid #cfe0f3; border-left: 5px solid #2f6fb3;
           border-radius: 6px; padding: 8px 22px 8px 14px; }
.summary li { margin: 7px 0; }
.note { color: #555; font-size: 13.5px; border-left: 3px solid #d7dbe0; padding-left: 12px; }
.meta { color: #5a6470; margin: 0 0 18px; }
table { border-collapse: collapse; margin: 6px 0 4px; font-size: 13.5px; }
th, td { padding: 5px 11px; text-align: right; border-bottom: 1px solid #e9ecef; white-space: nowrap; }
th.l, td.l { text-align: left; white-space: normal; }
thead th { background: #f1f3f5; border-bottom: 2px solid #d7dbe0; font-weight: 600; }
tr.group th { background: #fafbfc; text-align: left; color: #2f6fb3; font-weight: 600; font-size: 12.5px;
              letter-spacing: .02em; padding-top: 9px; }
td.best { font-weight: 700; }
td .tag { color: #8a6d00; font-size: 11.5px; margin-left: 4px; }
td .tag.better { color: #1e7b34; } td .tag.worse { color: #b42318; } td .tag.noise { color: #7a828c; }
.tablewrap { overflow-x: auto; }
figure { margin: 12px 0 18px; }
figure img { max-width: 100%; border: 1px solid #eceff2; border-radius: 4px; }
figcaption { color: #5a6470; font-size: 13px; margin-top: 4px; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px 26px; }
.gallery figure { margin: 6px 0; }
.caption { color: #5a6470; font-size: 13px; margin-top: 2px; }
audio { height: 30px; vertical-align: middle; }
"""


def to_html(doc: Document) -> str:
    """One self-contained HTML page: inline CSS, figures and audio as base64 data URIs."""
    body = "\n".join(_html(b) for b in doc.blocks)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n<h1>{html.escape(doc.title)}</h1>\n{body}\n</main></body></html>\n"
    )


def inline(text: str) -> str:
    """Escape, then turn `code` and **bold** into HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _html(b) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{inline(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p class='{b.kind}'>{inline(b.text)}</p>"
    if isinstance(b, Bullets):
        items = "".join(f"<li>{inline(i)}</li>" for i in b.items)
        return f"<ul class='{b.kind}'>{items}</ul>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Figure):
        style = f" style='width:{b.width}px'" if b.width else ""
        src = _data_uri(b.path, "image/png")
        return f"<figure><img src='{src}' alt='{html.escape(b.caption)}'{style}><figcaption>{inline(b.caption)}</figcaption></figure>"
    if isinstance(b, Gallery):
        return "<div class='gallery'>" + "".join(_html(f) for f in b.figures) + "</div>"
    if isinstance(b, Audio):
        return f"<div><audio controls src='{_data_uri(b.path, 'audio/wav')}'></audio> <span class='caption'>{inline(b.caption)}</span></div>"
    raise TypeError(f"unknown block {type(b).__name__}")


def _html_cell(c: Cell, left: bool) -> str:
    tag = ""
    if c.note:
        kind = "better" if "better" in c.note else "worse" if "worse" in c.note else "noise"
        tag = f"<span class='tag {kind}'>{html.escape(c.note)}</span>"
    classes = " ".join(k for k, on in (("best", c.bold), ("l", left)) if on)
    attr = f' class="{classes}"' if classes else ""
    return f"<td{attr}>{inline(c.text)}{tag}</td>"


def _html_table(t: Table) -> str:
    head = "".join(f"<th{' class=l' if i < t.left else ''}>{inline(h)}</th>" for i, h in enumerate(t.header))
    rows = []
    for title, group in t.groups:
        if title:
            rows.append(f"<tr class='group'><th colspan='{len(t.header)}'>{inline(title)}</th></tr>")
        rows += [
            "<tr>" + "".join(_html_cell(c, i < t.left) for i, c in enumerate(row)) + "</tr>" for row in group
        ]
    caption = f"<div class='caption'>{inline(t.caption)}</div>" if t.caption else ""
    return f"<div class='tablewrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{caption}"


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"
