"""The PoC summary and tables: best designs, what is within noise, the recommendation per priority,
and the two renderings of one document."""

import math

from attnlab.poc.document import Cell, Document, Figure, Heading, Para, Table, to_html, to_markdown
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
