"""A report as a list of blocks (headings, paragraphs, lists, grouped tables, figures), written as
Markdown with figures beside it; the one self-contained HTML page is that Markdown rendered by
markdown-it (CommonMark with GFM tables) into a page template, figures and audio inlined."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """Text with `code` and **bold** marks; `kind` "note" sets it apart as a quote."""

    text: str
    kind: str = ""


@dataclass
class Bullets:
    items: list[str]


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
    width: int | None = None  # CSS pixels in HTML, carried as the image's title; None: as the page allows


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
        title = f' "width={b.width}"' if b.width else ""
        return [f"![{b.caption}]({_rel(b.path, base)}{title})", "", f"*{b.caption}*" if b.caption else ""]
    if isinstance(b, Audio):
        return [f"[{b.caption or b.path.name}]({_rel(b.path, base)})"]
    if isinstance(b, Gallery):
        return [line for f in b.figures for line in _md(f, base) + [""]]
    raise TypeError(f"unknown block {type(b).__name__}")


def _md_cell(c: Cell) -> str:
    text = f"**{c.text}**" if c.bold and c.text else c.text
    return (f"{text} {c.note}" if c.note else text).replace("|", "\\|")


def _md_table(t: Table) -> list[str]:
    align = ["---" if i < t.left else "---:" for i in range(len(t.header))]  # numbers to the right
    lines = ["| " + " | ".join(t.header) + " |", "|" + "".join(a + "|" for a in align)]
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

PAGE = "page.html"  # the page template beside this file: $title, $body, and the CSS the rules below serve
MIME = {".png": "image/png", ".wav": "audio/wav"}  # the files a report links
# The notes a number in a table may end with (see report.metric_table and report.versus); the page
# shows "better" and "worse" in colour, the others in grey.
MARK = re.compile(r" (≈ best|within noise|same|better|worse|of \S+)$")


def to_html(doc: Document, base: Path = Path(".")) -> str:
    """The page of `to_markdown(doc, base)`: see `markdown_to_html`."""
    return markdown_to_html(to_markdown(doc, base), base)


def markdown_to_html(text: str, base: Path) -> str:
    """One self-contained HTML page from a report's Markdown.

    markdown-it renders it (CommonMark and tables, raw HTML escaped); four core rules give the page's
    CSS its hooks: each `##` part is a <section> named after its heading (`.summary`), an image with its
    *caption* paragraph is a <figure>, a table row with only an *emphasised* first cell is a group
    title, and a number's trailing note (better, worse, ≈ best) is a tagged span. The images and
    audio it links are inlined as base64 data URIs.

    Args:
        text: the Markdown, as `to_markdown` writes it.
        base: the folder its links are relative to.

    Returns:
        The page, which requests nothing outside itself.
    """
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    for rule in (_sections, _figures, _table_rows, _media):
        md.core.ruler.push(rule.__name__.strip("_"), rule)
    env = {"base": Path(base)}
    tokens = md.parse(text, env)
    h1 = next((i for i, t in enumerate(tokens) if t.tag == "h1"), None)
    title = tokens[h1 + 1].content if h1 is not None else ""
    page = Template((resources.files("attnlab.poc") / PAGE).read_text(encoding="utf-8"))
    return page.substitute(title=html.escape(title), body=md.renderer.render(tokens, md.options, env))


def _sections(state: StateCore) -> None:
    """Each `##` heading opens a <section> whose class is the heading in lower case with dashes."""
    out: list[Token] = []
    opened = False
    for i, t in enumerate(state.tokens):
        if t.type == "heading_open" and t.tag == "h2":
            name = re.sub(r"[^a-z0-9]+", "-", state.tokens[i + 1].content.lower()).strip("-")
            out += [_section_close()] if opened else []
            out.append(Token("section_open", "section", 1, attrs={"class": name}, block=True))
            opened = True
        out.append(t)
    state.tokens = out + ([_section_close()] if opened else [])


def _section_close() -> Token:
    return Token("section_close", "section", -1, block=True)


def _figures(state: StateCore) -> None:
    """A paragraph holding only an image becomes a <figure>; the *caption* paragraph after it, its
    <figcaption>."""
    t = state.tokens
    for i in range(len(t) - 2):
        kids = t[i + 1].children or []
        if t[i].type != "paragraph_open" or len(kids) != 1 or kids[0].type != "image":
            continue
        t[i].tag = t[i + 2].tag = "figure"
        if i + 5 < len(t) and t[i + 3].type == "paragraph_open" and _emphasised(t[i + 4]):
            t[i + 3].tag = t[i + 5].tag = "figcaption"
            t[i + 2 : i + 6] = [t[i + 3], t[i + 4], t[i + 5], t[i + 2]]  # the caption inside the figure


def _table_rows(state: StateCore) -> None:
    """A row whose first cell alone has text, all of it *emphasised*, is a group title spanning the
    table; in the other rows, a number's trailing note becomes a tagged span."""
    t, out, i = state.tokens, [], 0
    while i < len(t):
        if t[i].type != "tr_open":
            out.append(t[i])
            i += 1
            continue
        j = next(k for k in range(i, len(t)) if t[k].type == "tr_close")
        cells = [t[k : k + 3] for k in range(i + 1, j, 3)]  # (td_open, inline, td_close)
        if _emphasised(cells[0][1]) and not any(c[1].content for c in cells[1:]):
            t[i].attrSet("class", "group")
            cells[0][0].tag = cells[0][2].tag = "th"
            cells[0][0].attrSet("colspan", str(len(cells)))
            out += [t[i], *cells[0], t[j]]
        else:
            for opening, inline, _ in cells:
                if opening.type == "td_open" and opening.attrGet("style") == "text-align:right":
                    _tag_mark(inline)
            out += t[i : j + 1]
        i = j + 1
    state.tokens = out


def _tag_mark(inline: Token) -> None:
    """`12 ms better` becomes `12 ms <span class="tag better">better</span>`."""
    last = (inline.children or [None])[-1]
    found = MARK.search(last.content) if last is not None and last.type == "text" else None
    if found:
        last.content = last.content[: found.start()] + " "
        kind = found[1] if found[1] in ("better", "worse") else "noise"
        note = Token("text", "", 0, content=found[1])
        inline.children += [_raw(f'<span class="tag {kind}">'), note, _raw("</span>")]


def _media(state: StateCore) -> None:
    """Images and audio links inlined as data URIs; an image's title "width=N" becomes its width."""
    base = state.env["base"]
    for block in (t for t in state.tokens if t.type == "inline"):
        kids = block.children or []
        for i, t in enumerate(kids):
            if t.type == "image":
                t.attrSet("src", _data_uri(base / str(t.attrGet("src"))))
                title = str(t.attrGet("title") or "")
                if title.startswith("width="):
                    t.attrSet("width", title.removeprefix("width="))
                    del t.attrs["title"]
            elif t.type == "link_open" and _mime(str(t.attrGet("href"))).startswith("audio/"):
                src = _data_uri(base / str(t.attrGet("href")))
                kids[i] = _raw(f'<audio controls src="{src}"></audio> <span class="caption">')
                end = next(k for k in range(i, len(kids)) if kids[k].type == "link_close")
                kids[end] = _raw("</span>")


def _emphasised(inline: Token) -> bool:
    """Whether inline text is one *emphasis* from end to end."""
    kinds = [k.type for k in inline.children or []]
    return bool(kinds) and kinds[0] == "em_open" and kinds.index("em_close") == len(kinds) - 1


def _raw(markup: str) -> Token:
    return Token("html_inline", "", 0, content=markup)


def _mime(path: str) -> str:
    return MIME.get(Path(path).suffix.lower(), "")


def _data_uri(path: Path) -> str:
    return f"data:{_mime(str(path))};base64,{base64.b64encode(path.read_bytes()).decode()}"
