"""The PoC summary and tables: best designs, what is within noise, the recommendation per priority,
and the two renderings of one document."""

import math
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import pytest

from attnlab.poc.document import (
    Audio,
    Bullets,
    Cell,
    Document,
    Figure,
    Gallery,
    Heading,
    Para,
    Table,
    markdown_to_html,
    to_html,
    to_markdown,
)
from attnlab.poc.metrics import ALL, Stat, within_noise
from attnlab.poc.report import metric_table
from attnlab.poc.results import compare, results_csv
from attnlab.poc.summary import Summary


def entry(name, levels=(), **metrics):
    """A results.json variant entry; metrics as key=(mean, std)."""
    stats = {k: {"mean": m, "std": s, "values": [m - s, m, m + s]} for k, (m, s) in metrics.items()}
    return {
        "name": name,
        "levels": list(levels),
        "group": max(levels) if levels else 0,
        "metrics": stats,
        "techniques": {},
        "trained_by": name,
    }


def test_within_noise_uses_the_combined_spread():
    a, b = Stat(10.0, 3.0, ()), Stat(14.0, 0.0, ())
    assert within_noise(a, Stat(12.9, 0.0, ())) and not within_noise(a, b)
    assert within_noise(Stat(10.0, 3.0, ()), Stat(15.0, 4.0, ()))  # |10 - 15| = 5 = hypot(3, 4)
    assert Stat.of([1.0, None, float("nan"), 3.0]) == Stat(2.0, math.sqrt(2.0), (1.0, 3.0))


def test_clear_quality_winner_is_recommended_with_its_level():
    entries = [
        entry("ref", fid=(20.0, 0.5), all_correct=(0.50, 0.02), latency_s=(0.10, 0.001)),
        entry("gate", [4], fid=(15.0, 0.5), all_correct=(0.52, 0.02), latency_s=(0.12, 0.001)),
        entry("pag", [5], fid=(15.4, 0.5), all_correct=(0.70, 0.02), latency_s=(0.20, 0.001)),
    ]
    s = Summary(entries, "ref")
    assert s.best("quality")[1:] == ("gate", ["pag"])  # pag is within noise of the best
    assert s.best("alignment")[1] == "pag" and s.best("cost")[1] == "ref"
    rec = s.recommendation("quality")
    assert "use `gate`, an L4 design (cross-scale" in rec and "1.20x the reference's sampling latency" in rec
    assert "use `pag`, an L5 design (output" in s.recommendation("control")
    assert "keep the reference `ref`" in s.recommendation("speed")
    assert "`gate` on all asked right" in s.noise_sentence()  # 0.52 vs 0.50 with std 0.02 each


def test_a_winner_within_noise_of_the_reference_is_not_adopted():
    entries = [entry("ref", fid=(20.0, 2.0)), entry("x", [2], fid=(19.0, 2.0))]
    rec = Summary(entries, "ref").recommendation("quality")
    assert "within noise of the reference" in rec and "Keep the reference" in rec


def test_speed_picks_the_fastest_design_that_keeps_quality():
    entries = [
        entry("ref", fid=(20.0, 0.5), latency_s=(0.10, 0.002)),
        entry("cache", [3], fid=(20.3, 0.5), latency_s=(0.06, 0.002)),
        entry("broken", [3], fid=(40.0, 0.5), latency_s=(0.03, 0.002)),
    ]
    rec = Summary(entries, "ref").recommendation("speed")
    assert "use `cache`, an L3 design" in rec and "40% less sampling time" in rec


def test_table_marks_best_noise_ties_and_the_reference_verdict():
    entries = [
        entry("ref", fid=(20.0, 0.5)),
        entry("a", [2], fid=(15.0, 0.5)),
        entry("b", [5], fid=(15.3, 0.4)),
    ]
    table = metric_table(entries, [ALL["fid"]], compare(entries, "ref"), "ref")
    rows = {r[0].text: r for _, group in table.groups for r in group}
    assert rows["`a`"][1].bold and not rows["`b`"][1].bold and rows["`b`"][1].note == "≈ best"
    assert rows["`ref`"][2].text == "reference"
    assert rows["`a`"][2].text == "−5.00" and rows["`a`"][2].note == "better"
    assert [title for title, _ in table.groups][0].startswith(
        "reference"
    )  # grouped by level, reference first


def test_csv_has_mean_and_std_per_metric():
    csv = results_csv([entry("ref", fid=(20.0, 0.5)), entry("a", [2], fid=(15.0, 0.25))])
    assert csv.splitlines() == [
        "variant,levels,techniques,trained_by,fid_mean,fid_std",
        "ref,,,ref,20,0.5",
        "a,L2,,a,15,0.25",
    ]


def test_markdown_and_html_render_one_document(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG fake")
    table = Table(
        ["variant", "FID"], [("L2 · internal", [[Cell("`a<b`"), Cell("1.0", bold=True, note="≈ best")]])]
    )
    doc = Document("T & co").add(Heading("Summary"), Para("**best** is `a`"), table, Figure(png, "cap"))
    md = to_markdown(doc, tmp_path)
    assert "| *L2 · internal* |  |" in md and "| `a<b` | **1.0** ≈ best |" in md and "](f.png)" in md
    html = to_html(doc)
    assert "<title>T &amp; co</title>" in html and "<code>a&lt;b</code>" in html
    assert "<strong>best</strong>" in html and "data:image/png;base64," in html and "f.png" not in html


def test_a_tie_on_the_priority_points_to_a_design_better_elsewhere():
    entries = [
        entry("ref", fid=(20.0, 1.0), all_correct=(0.80, 0.03), latency_s=(0.10, 0.001)),
        entry("gate", [4], fid=(20.5, 1.0), all_correct=(0.95, 0.03), latency_s=(0.11, 0.001)),
        entry("fast", [2], fid=(26.0, 1.0), all_correct=(0.81, 0.03), latency_s=(0.05, 0.001)),
        entry("blur", [3], fid=(19.8, 1.0), all_correct=(0.60, 0.03), latency_s=(0.07, 0.001)),
    ]
    rec = Summary(entries, "ref").recommendation("quality")
    assert "Keep the reference" in rec and "Worth a larger run: `gate` (L4) on all asked right" in rec
    assert "`fast`" not in rec  # faster, but worse FID beyond the noise
    assert "`blur` (L3)" not in rec  # faster and FID within noise, but alignment worse beyond the noise
    clear = [
        entry("ref", fid=(20.0, 1.0), all_correct=(0.80, 0.03)),
        entry("b", [1], fid=(20.2, 1.0), all_correct=(0.81, 0.03)),
    ]
    assert "Worth a larger run" not in Summary(clear, "ref").recommendation("quality")


def _page(tmp_path):
    """A small report with every kind of block, its Markdown, and the page rendered from it."""
    from PIL import Image

    for name, colour in (("plot", "red"), ("grid-a", "blue"), ("grid-b", "green")):
        Image.new("RGB", (60, 30), colour).save(tmp_path / f"{name}.png")
    (tmp_path / "a.wav").write_bytes(b"RIFF fake")
    marked = [Cell("`a`"), Cell("1.0", bold=True), Cell("2 ms", note="≈ best"), Cell("−0.5", note="better")]
    table = Table(
        ["variant", "FID", "latency", "FID vs reference"],
        [
            (
                "reference and variants without a technique",
                [[Cell("`ref`"), Cell("1.5"), Cell("3 ms"), Cell("reference")]],
            ),
            (
                "L2 · internal",
                [marked, [Cell("`b`"), Cell("2.0"), Cell("9 ms", note="of ref"), Cell("+0.5", note="worse")]],
            ),
            (
                "L5 · output",
                [[Cell("`c`"), Cell("1.6"), Cell("4 ms", note="≈ best"), Cell("+0.1", note="within noise")]],
            ),
        ],
        caption="Bold: best.",
    )
    doc = Document("Designs on shapes").add(
        Para("3 variants · priority: **quality**"),
        Heading("Summary"),
        Bullets(["**Best quality:** `a` (L2), FID 1.0", "**Within noise** of the reference: `c` on FID."]),
        Heading("Quality"),
        table,
        Heading("Samples"),
        Figure(tmp_path / "plot.png", "Each point is a variant."),
        Gallery([Figure(tmp_path / f"grid-{n}.png", f"`{n}`: its samples", 520) for n in "ab"]),
        Audio(tmp_path / "a.wav", "`a`: first sample"),
        Heading("How this was measured"),
        Bullets(["Each number is the mean ± std over the seeds."]),
    )
    md = to_markdown(doc, tmp_path)
    return md, markdown_to_html(md, tmp_path)


class _Page(HTMLParser):
    """The text of a page, its table rows as lists of cell texts, and every tag with its attributes."""

    def __init__(self, page: str):
        super().__init__()
        self.text, self.rows, self.tags, self.in_cell = [], [], [], False
        self.feed(page)
        self.text = " ".join("".join(self.text).split())

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        self.in_cell = self.in_cell and tag not in ("td", "th")

    def handle_data(self, data):
        self.text.append(data)
        if self.in_cell:
            self.rows[-1][-1] += data


def _plain(markdown: str) -> str:
    """Markdown inline text as the page shows it: without its `code`, **bold** and *emphasis* marks."""
    return " ".join(markdown.replace("**", "").replace("`", "").replace("*", "").split())


def test_the_page_is_the_markdown_rendered(tmp_path):
    md, html = _page(tmp_path)
    page = _Page(html)
    md_rows = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|---")]
    html_rows = [[" ".join(c.split()) for c in row] for row in page.rows]
    # every table row of report.md, cell by cell (a group title spans its row as one cell)
    assert html_rows == [[_plain(c) for c in line.strip("|").split(" | ") if c.strip()] for line in md_rows]
    for line in md.splitlines():
        if line.startswith("- ") or (line and line[0].isalnum()):  # list items and paragraphs
            assert _plain(line.removeprefix("- ")) in page.text, line
    flat = html.replace("\n", "")
    assert "<title>Designs on shapes</title>" in flat and "<h1>Designs on shapes</h1>" in flat
    assert '<section class="summary"><h2>Summary</h2><ul>' in flat
    assert '<section class="how-this-was-measured"><h2>How this was measured</h2><ul>' in flat
    assert '<tr class="group"><th colspan="4"><em>L2 · internal</em></th></tr>' in flat
    assert '<td style="text-align:right"><strong>1.0</strong></td>' in flat  # best: bold
    for kind, note in (
        ("noise", "≈ best"),
        ("better", "better"),
        ("worse", "worse"),
        ("noise", "within noise"),
    ):
        assert f'<span class="tag {kind}">{note}</span></td>' in flat
    assert '<span class="tag noise">of ref</span>' in flat and ">reference</td>" in flat  # not a mark
    assert "<figcaption><em>Each point is a variant.</em></figcaption></figure>" in flat


def test_the_page_requests_nothing_outside_itself(tmp_path):
    md, html = _page(tmp_path)
    assert '"width=520"' in md and "](grid-a.png" in md  # the Markdown links its files
    tags = _Page(html).tags
    links = [(t, a.get("src") or a.get("href")) for t, a in tags if a.get("src") or a.get("href")]
    assert sorted(t for t, _ in links) == ["audio", "img", "img", "img"]
    assert all(url.startswith("data:") for _, url in links)
    assert [a.get("width") for t, a in tags if t == "img"] == [None, "520", "520"]
    assert html.count("data:image/png;base64,") == 3 and html.count("data:audio/wav;base64,") == 1
    assert not {"link", "script", "iframe"} & {t for t, _ in tags}
    assert "url(" not in html and "@import" not in html  # nor does its CSS


def test_raw_html_in_the_markdown_is_shown_as_text(tmp_path):
    html = markdown_to_html("# a <b>\n\nprompt: <img src=x onerror=alert(1)>\n", tmp_path)
    assert "<title>a &lt;b&gt;</title>" in html and "&lt;img src=x" in html and "<img" not in html


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs chromium (Debian: apt-get install chromium)"
)
def test_chromium_draws_the_summary_box_group_rows_and_figures(tmp_path):
    from PIL import Image

    _, html = _page(tmp_path)
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    page.write_text(html)
    headless = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-sync"
    quiet = "--disable-background-networking --disable-component-update --window-size=1000,1400"
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    cmd = ["chromium", *headless.split(), *quiet.split(), profile, f"--screenshot={shot}", page.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    colours = Counter(Image.open(shot).convert("RGB").getdata())
    assert colours[(0xF4, 0xF8, 0xFD)] > 20_000  # the shaded summary box
    assert colours[(0xFA, 0xFB, 0xFC)] > 5_000  # the group title rows
    assert colours[(255, 0, 0)] > 1_000 and colours[(0, 0, 255)] > 1_000  # inlined figures
