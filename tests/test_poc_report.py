"""The PoC summary and tables: best designs, what is within noise, the recommendation per priority,
and the two renderings of one document."""

import csv
import json
import math
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
from poc_util import (
    ATTN16,
    BASE,
    DDOF,
    PAG,
    SEEDS,
    best_of,
    fmt,
    load_poc,
    md_table,
    numpy_stat,
    report_mismatches,
    seed_values,
    shown,
    tiny_poc,
)

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


def entry(name, levels=(), trained_by="ref", **metrics):
    """A results.json variant entry of one training seed; metrics as key=(mean, std). By default it
    samples the reference's model (a training-free variant): its differences are sampling noise."""
    stats = {k: {"mean": m, "std": s, "values": [m - s, m, m + s]} for k, (m, s) in metrics.items()}
    return {
        "name": name,
        "levels": list(levels),
        "group": max(levels) if levels else 0,
        "metrics": stats,
        "techniques": {},
        "trained_by": trained_by,
    }


def test_within_noise_uses_the_combined_spread():
    a, b = Stat(10.0, 3.0, ()), Stat(14.0, 0.0, ())
    assert within_noise(a, Stat(12.9, 0.0, ())) and not within_noise(a, b)
    assert within_noise(Stat(10.0, 3.0, ()), Stat(15.0, 4.0, ()))  # |10 - 15| = 5 = hypot(3, 4)
    assert Stat.of([1.0, None, float("nan"), 3.0]) == Stat(
        2.0, math.sqrt(2.0), (1.0, 3.0), ((1.0, None, None, 3.0),)
    )


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


def test_csv_has_a_row_per_training_and_sampling_seed():
    def one(name, levels, fids):
        return {
            "name": name,
            "levels": levels,
            "techniques": {},
            "trained_by": name,
            "metrics": {"fid": {"mean": 0.0, "std": 0.0, "values": []}},
            "per_train_seed": {
                "0": {"0": {"fid": fids[0]}, "1": {"fid": fids[1]}},
                "1": {"0": {"fid": fids[2]}},
            },
            "cost": {},
            "train": {},
        }

    csv = results_csv([one("ref", [], [20.0, 21.5, 19.0]), one("a", [2], [15.0, 15.25, None])])
    assert csv.splitlines() == [
        "variant,levels,techniques,trained_by,train_seed,seed,fid",
        "ref,,,ref,0,0,20",
        "ref,,,ref,0,1,21.5",
        "ref,,,ref,1,0,19",
        "a,L2,,a,0,0,15",
        "a,L2,,a,0,1,15.25",
        "a,L2,,a,1,0,",
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


# report.md, results.json and results.csv of a hand-built PoC against numpy over its per-seed scores

HEADS4 = {"name": "heads4", "model": {"heads": 4}, "level": 2}
# Per variant and metric the scores of seeds 0, 1, 2 (None: that seed has no such score). attn16 has
# the best FID, pag the best alignment and heads4 the lowest latency, each clear of the seed noise;
# pag's FID is within noise of the reference's, attn16's shape accuracy within noise of pag's.
PER_SEED = {
    "base": {
        "fid": [20.113, 21.402, 19.871],
        "kid_mean": [0.01234, 0.01418, 0.01302],
        "all_correct": [0.5123, 0.5531, 0.4772],
        "shape_acc": [0.7012, 0.7433, 0.6691],
        "latency_s": [0.1021, 0.1083, 0.0994],
    },
    "attn16": {
        "fid": [15.214, 16.038, 15.562],
        "kid_mean": [0.00871, 0.00912, 0.00803],
        "all_correct": [0.5381, 0.5012, 0.6142],
        "shape_acc": [0.8841, 0.8562, 0.9183],
        "latency_s": [0.1311, 0.1372, 0.1289],
    },
    "pag": {
        "fid": [18.906, 20.417, 19.298],
        "kid_mean": [0.01121, 0.01287, 0.01173],
        "all_correct": [0.8121, 0.8763, 0.7492],
        "shape_acc": [0.9012, 0.9353, 0.8771],
        "latency_s": [0.2051, 0.2132, 0.2013],
    },
    "heads4": {
        "fid": [22.513, 23.946, 21.731],
        "kid_mean": [0.01556, 0.01702, None],
        "all_correct": [0.3812, 0.4391, 0.5033],
        "shape_acc": [0.6122, 0.5871, 0.6413],
        "latency_s": [0.0712, 0.0753, 0.0694],
    },
}
COSTS = {  # measured once per variant; pag samples base's model with an extra pass per step
    "base": {
        "params": 41234,
        "flops_per_sample": 1.234e9,
        "flops_per_call": 1.543e8,
        "peak_mem_bytes": 5.213e6,
    },
    "attn16": {
        "params": 43871,
        "flops_per_sample": 1.687e9,
        "flops_per_call": 2.109e8,
        "peak_mem_bytes": 7.841e6,
    },
    "pag": {
        "params": 41234,
        "flops_per_sample": 1.851e9,
        "flops_per_call": 1.543e8,
        "peak_mem_bytes": 5.922e6,
    },
    "heads4": {
        "params": 41234,
        "flops_per_sample": 1.302e9,
        "flops_per_call": 1.628e8,
        "peak_mem_bytes": 6.104e6,
    },
}
TRAIN_SECONDS = {"base": 12.31, "attn16": 17.84, "heads4": 0.7312}
REAL_DATA = {
    "fid": [3.412, 3.871, 3.205],
    "kid_mean": [0.00121, 0.00143, 0.00118],
    "all_correct": [0.9381, 0.9612, 0.9423],
}


def _scores(columns: dict) -> dict[int, dict]:
    """{metric: per-seed values} -> {seed: scores}, as the runner collects them."""
    return {
        seed: {k: vals[i] for k, vals in columns.items() if vals[i] is not None}
        for i, seed in enumerate(SEEDS)
    }


def _entry(cfg, name: str) -> dict:
    """The results.json entry of variant `name`, put together as the runner does."""
    from attnlab.poc.results import metric_stats
    from attnlab.poc.variants import model_owner, own_levels

    v = cfg.variant(name)
    owner = model_owner(cfg, v).name
    cost = {**COSTS[name], "train_seconds": TRAIN_SECONDS[owner]}
    per_seed = _scores(PER_SEED[name])
    levels = own_levels(cfg, v)
    return {
        "name": name,
        "group": max(levels) if levels else 0,
        "levels": levels,
        "techniques": {n: dict(o or {}) for n, o in v.techniques.items()},
        "sampling": {},
        "model": {"techniques": {}, "changes": dict(v.model)},
        "base": v.base,
        "trained_by": owner,
        "note": v.note,
        "train_seeds": [0],
        "metrics": {k: s.to_dict() for k, s in metric_stats({0: per_seed}, cost).items()},
        "per_train_seed": {"0": {str(s): scores for s, scores in per_seed.items()}},
        "cost": cost,
        "train": {"0": {"train_steps": 2, "train_seconds": TRAIN_SECONDS[owner]}},
        "samples": {},
        "sampling_seconds": 1.5,
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """report.md, report.html, results.json and results.csv of the hand-built PoC, written by
    write_report (figures stubbed by blank PNGs: no sample is drawn)."""
    from PIL import Image

    import attnlab.poc.report as report
    from attnlab.poc.prompts import PromptSet
    from attnlab.poc.results import metric_stats

    tmp = tmp_path_factory.mktemp("report")
    cfg = load_poc(
        tmp, tiny_poc(variants=[BASE, ATTN16, PAG, HEADS4], metrics=["fid", "kid", "alignment", "cost"])
    )
    names = [v.name for v in cfg.variants]
    png = tmp / "blank.png"
    Image.new("RGB", (8, 8), "white").save(png)
    figs = {"side_by_side": png, "grids": {n: png for n in names}}
    floor = {
        "name": "real data",
        "metrics": {k: s.to_dict() for k, s in metric_stats({0: _scores(REAL_DATA)}, {}).items()},
    }
    prompts = PromptSet(["a red square"] * 4, [None] * 4, ["a red square"] * 4, None)
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_figures", lambda *a: figs)
        results = report.write_report(cfg, out, [_entry(cfg, n) for n in names], prompts, [], floor, 1.0)
    return out, results


def test_hand_built_scores_are_clear_of_rounding_edges():
    """The numbers the tests below compare do not sit on a rounding edge, where summation order alone
    could move the last digit."""
    for columns in (*PER_SEED.values(), REAL_DATA):
        for key, vals in columns.items():
            vals = np.array([v for v in vals if v is not None])
            ref = [v for v in PER_SEED["base"][key] if v is not None] if columns is not REAL_DATA else vals
            diff = abs(np.mean(vals) - np.mean(ref))  # the "vs reference" column
            for x in (np.mean(vals), np.std(vals, ddof=DDOF), np.std(vals, ddof=1 - DDOF), diff):
                assert fmt(key, x * (1 - 1e-9)) == fmt(key, x * (1 + 1e-9)), (key, x)
            ratio = np.mean(vals) / np.mean(ref)  # latency's "vs reference" column
            assert f"{ratio * (1 - 1e-9):.2f}" == f"{ratio * (1 + 1e-9):.2f}", (key, ratio)


def test_std_is_the_sample_std_and_differs_from_the_population_one():
    """The report's spread is numpy's std with ddof=1 (n - 1) and, for these scores, would read
    differently with ddof=0 in every per-seed cell (so the table test below tells them apart)."""
    from attnlab.poc.metrics import Stat

    assert DDOF == 1
    for columns in PER_SEED.values():
        for key, vals in columns.items():
            vals = [v for v in vals if v is not None]
            s = Stat.of(vals)
            assert s.std == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
            if key != "latency_s":  # latency's std is a few ms either way
                assert fmt(key, np.std(vals, ddof=1)) != fmt(key, np.std(vals, ddof=0)), (key, vals)


def test_results_json_stores_numpy_means_and_stds_of_per_seed(rendered):
    out, _ = rendered
    data = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == list(PER_SEED)
    for v in data["variants"]:
        for key, given in PER_SEED[v["name"]].items():
            vals = np.array([x for x in given if x is not None])
            assert seed_values(v, key) == vals.tolist()  # per_seed holds the scores as given
            stored = v["metrics"][key]
            assert stored["values"] == vals.tolist(), (v["name"], key)
            assert stored["mean"] == pytest.approx(np.mean(vals), rel=1e-12, abs=0), (v["name"], key)
            assert stored["std"] == pytest.approx(np.std(vals, ddof=DDOF), rel=1e-12, abs=0), (v["name"], key)
        cost = {**COSTS[v["name"]], "train_seconds": TRAIN_SECONDS[v["trained_by"]]}
        for key, x in cost.items():
            assert v["metrics"][key] == {"mean": x, "std": 0.0, "values": [x]}, (v["name"], key)
    for key, given in REAL_DATA.items():
        stored = data["real_data"]["metrics"][key]
        assert stored["mean"] == pytest.approx(np.mean(given), rel=1e-12, abs=0)
        assert stored["std"] == pytest.approx(np.std(given, ddof=DDOF), rel=1e-12, abs=0)


def test_every_report_table_cell_is_numpy_over_per_seed(rendered):
    out, results = rendered
    md = (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["variants"] == results["variants"]
    checked, bad = report_mismatches(md, json.loads((out / "results.json").read_text()))
    # 3 tables: 4 variants x (metrics + vs reference) + a real-data row in 2 of them, and the headers
    assert checked >= 4 * (2 + 1 + 2 + 1 + 6 + 1) and bad == []
    header, rows = md_table(md, "Quality")
    assert header == ["variant", "FID", "KID", "FID vs reference"]
    cells = {r[0]: r for r in rows}
    assert (
        cells["`attn16`"][1] == "**15.60 ± 0.41**" and cells["`base`"][1] == "20.46 ± 0.82"
    )  # not ± 0.67 (ddof 0)
    assert cells["`pag`"][3] == "−0.92 within noise" and cells["`heads4`"][3] == "+2.27 worse"
    assert cells["`heads4`"][2] == "0.0163 ± 0.00103"  # its seed 2 has no KID: two seeds
    assert cells["real data"][1] == "3.50 ± 0.34"
    alignment = {r[0]: r for r in md_table(md, "Condition alignment")[1]}
    assert alignment["`attn16`"][2] == "88.6% ± 3.1% ≈ best"  # within noise of pag's 90.5% ± 2.9%


def test_the_table_check_catches_a_wrong_digit_a_wrong_std_and_a_wrong_best(rendered):
    """The check of the test above fails on a report with one cell rounded the other way, a std of
    ddof=0, or the bold on the worst FID."""
    out, _ = rendered
    md, results = (out / "report.md").read_text(), json.loads((out / "results.json").read_text())
    for wrong in (
        md.replace("**15.60 ± 0.41**", "**15.61 ± 0.41**"),
        md.replace("20.46 ± 0.82", "20.46 ± 0.67"),
        md.replace("**15.60 ± 0.41**", "15.60 ± 0.41").replace("| 22.73 ± 1.12 |", "| **22.73 ± 1.12** |"),
    ):
        assert wrong != md
        assert len(report_mismatches(wrong, results)[1]) >= 1


def test_results_csv_holds_every_value_of_results_json(rendered):
    out, _ = rendered
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == [n for n in PER_SEED for _ in SEEDS]
    for r in rows:
        i = SEEDS.index(int(r["seed"]))
        assert r["train_seed"] == "0"
        for key, given in PER_SEED[r["variant"]].items():
            assert r[key] == ("" if given[i] is None else f"{given[i]:.6g}"), (r["variant"], key)
        assert r["params"] == f"{COSTS[r['variant']]['params']:.6g}"


@pytest.mark.parametrize(
    ("family", "key", "label"),
    [
        ("quality", "fid", "Best quality"),
        ("alignment", "all_correct", "Best condition alignment"),
        ("cost", "latency_s", "Lowest cost"),
    ],
)
def test_the_named_winner_is_numpys_pick_of_the_means(rendered, family, key, label):
    out, _ = rendered
    data = json.loads((out / "results.json").read_text())
    stats = {v["name"]: numpy_stat(v, key) for v in data["variants"]}
    winner = best_of(key, {n: s[0] for n, s in stats.items()})
    assert winner == {"fid": "attn16", "all_correct": "pag", "latency_s": "heads4"}[key]
    for n, s in stats.items():  # clear of the noise: beyond the combined spread of every other variant
        w = stats[winner]
        assert n == winner or abs(w[0] - s[0]) > math.hypot(w[1], s[1]), (key, n)
    assert data["summary"][f"best_{family}"] == {
        "metric": key,
        "variant": winner,
        "levels": next(v["levels"] for v in data["variants"] if v["name"] == winner),
        "within_noise": [],
    }
    md = (out / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith(f"- **{label}:**"))
    assert line.startswith(f"- **{label}:** `{winner}` (")
    assert shown(key, stats[winner]) in line and f"(reference `base`: {shown(key, stats['base'])})" in line
