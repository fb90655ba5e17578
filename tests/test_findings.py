"""Published findings: the claims file, the verdict rules against an independent t interval, the
shipped claims against their PoC configs, and docs/findings.md from a finished tiny PoC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from poc_util import PAG, save_untrained_evaluator, tiny_poc, write_poc
from scipy import stats

from attnlab.errors import ConfigError
from attnlab.poc import load_poc_config, run_poc
from attnlab.poc.findings import (
    INCONCLUSIVE,
    NOT_REPLICATED,
    NOT_RUN,
    REPLICATED,
    findings_markdown,
    judge,
    load_claims,
    overall,
    run_name,
)

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "examples" / "findings" / "claims.yaml"


def stat(grid: list[list[float]]) -> dict:
    """A results.json metric entry (attnlab.poc.metrics.Stat.to_dict's layout) of a training x
    sampling seed grid: mean and std over the training seeds' means."""
    means = [float(np.mean(row)) for row in grid]
    std = float(np.std(means, ddof=1)) if len(means) > 1 else float(np.std(grid[0], ddof=1))
    return {"mean": float(np.mean(means)), "std": std, "values": means, "by_train_seed": grid}


def results(ref: list[list[float]], **variants: list[list[float]]) -> dict:
    entries = [{"name": "reference", "metrics": {"fid": stat(ref)}}]
    entries += [{"name": n, "metrics": {"fid": stat(g)}} for n, g in variants.items()]
    return {
        "reference": "reference",
        "variants": entries,
        "train_seeds": list(range(len(ref))),
        "seeds": [0, 1, 2],
    }


def claim_file(tmp_path: Path, **claim) -> Path:
    (tmp_path / "poc.yaml").write_text("{}\n")
    base = {"id": "c", "claim": "x", "source": "paper", "config": "poc.yaml", "metric": "fid"}
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump([{**base, **claim}]))
    return path


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """The 95% t interval of per-training-seed differences, from scipy (independent of attnlab)."""
    d = np.asarray(diffs)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean() - half, d.mean() + half


REF = [[40.0, 41.0, 39.0], [44.0, 45.0, 43.0], [36.0, 37.0, 35.0]]  # training seeds differ a lot
WORSE = [[row[0] + 10 + j, row[1] + 10 + j, row[2] + 10 + j] for j, row in enumerate(REF)]
NOISY = [[row[0] + s, row[1] + s, row[2] + s] for row, s in zip(REF, (-6.0, 8.0, -1.0))]
SAME = [[row[0] + s, row[1] + s, row[2] + s] for row, s in zip(REF, (0.3, -0.2, 0.1))]


def test_directional_verdicts_follow_the_t_interval_over_training_seeds(tmp_path):
    (c,) = load_claims(claim_file(tmp_path, expect={"worse": "worse", "noisy": "better", "w2": "better"}))
    rows = {r.variant: r for r in judge(c, results(REF, worse=WORSE, noisy=NOISY, w2=WORSE))}
    lo, hi = t_interval([np.mean(w) - np.mean(r) for w, r in zip(WORSE, REF)])
    assert rows["worse"].interval == pytest.approx((lo, hi))
    assert lo > 0  # the worse variant is really worse: FID up on every training seed
    assert rows["worse"].verdict == REPLICATED
    assert rows["w2"].verdict == NOT_REPLICATED  # predicted better, really worse
    nlo, nhi = t_interval([np.mean(w) - np.mean(r) for w, r in zip(NOISY, REF)])
    assert nlo < 0 < nhi and rows["noisy"].verdict == INCONCLUSIVE
    assert overall([rows["w2"], rows["noisy"]]) == NOT_REPLICATED
    assert overall([rows["worse"], rows["noisy"]]) == INCONCLUSIVE
    assert overall([rows["worse"]]) == REPLICATED
    assert overall(list(rows.values())) == "partly replicated"


def test_same_needs_the_whole_interval_within_the_tolerance(tmp_path):
    (c,) = load_claims(
        claim_file(tmp_path, expect={"same": "same", "worse": "same", "noisy": "same"}, tolerance=0.1)
    )
    rows = {r.variant: r for r in judge(c, results(REF, same=SAME, worse=WORSE, noisy=NOISY))}
    tol = 0.1 * np.mean([np.mean(r) for r in REF])
    lo, hi = t_interval([np.mean(s) - np.mean(r) for s, r in zip(SAME, REF)])
    assert -tol <= lo and hi <= tol and rows["same"].verdict == REPLICATED
    assert rows["worse"].verdict == NOT_REPLICATED  # +10 to +12 FID on a reference of 40: beyond 10%
    assert rows["noisy"].verdict == INCONCLUSIVE  # interval wider than the tolerance


def test_an_architectural_claim_from_two_training_seeds_stays_inconclusive(tmp_path):
    (c,) = load_claims(claim_file(tmp_path, expect={"worse": "worse"}, architectural=True))
    (row,) = judge(c, results(REF[:2], worse=WORSE[:2]))
    assert row.rule == "two seeds" and row.verdict == INCONCLUSIVE and "3 decide" in row.reason
    (c2,) = load_claims(claim_file(tmp_path, expect={"worse": "worse"}))  # training-free: decided
    assert judge(c2, results(REF[:2], worse=WORSE[:2]))[0].verdict == REPLICATED


def test_a_claim_without_its_run_is_not_run(tmp_path):
    (c,) = load_claims(claim_file(tmp_path, expect={"v": "better"}))
    assert [r.verdict for r in judge(c, None)] == [NOT_RUN]


@pytest.mark.parametrize(
    "claim, says",
    [
        (
            {"metric": "sharpness", "expect": {"v": "better"}},
            "claims[0] (c).metric: 'sharpness' is not a PoC metric",
        ),
        (
            {"expect": {"v": "faster"}},
            "claims[0] (c).expect.v: 'faster'; expected one of better, worse, same",
        ),
        ({"expect": {}}, "expect: name at least one variant"),
        ({"expect": {"v": "same"}, "tolerance": 1.5}, "tolerance: 1.5 is not a share"),
        ({"expect": {"v": "better"}, "config": "missing.yaml"}, "missing.yaml does not exist"),
        ({"expect": {"v": "better"}, "colour": "red"}, "colour"),
    ],
)
def test_bad_claims_name_the_file_and_key(tmp_path, claim, says):
    path = claim_file(tmp_path, **claim)
    with pytest.raises(ConfigError, match="claims.yaml") as e:
        load_claims(path)
    assert says in str(e.value)


def test_shipped_claims_name_variants_their_configs_have():
    claims = load_claims(CLAIMS)
    assert {c.config for c in claims} == {p.name for p in CLAIMS.parent.glob("*.yaml")} - {"claims.yaml"}
    for c in claims:
        cfg = load_poc_config(CLAIMS.parent / c.config, c.overrides)
        names = {v.name for v in cfg.variants}
        assert set(c.expect) <= names, (c.id, set(c.expect) - names)
        assert cfg.reference is None or cfg.reference not in c.expect
        if c.architectural:
            assert len(cfg.train_seeds or [0]) >= 3, (
                c.id
            )  # the issue: 3 training seeds per architectural claim
    assert len({run_name(c) for c in claims}) < len(claims)  # claims share runs (one PoC, several claims)


def test_findings_document_from_a_finished_tiny_poc(tmp_path):
    evaluator = save_untrained_evaluator(tmp_path / "ev")
    cfg = tiny_poc(variants=[{"name": "base"}, PAG], metrics=["fid", "cost"], train_seeds=[0, 1, 2])
    cfg["evaluator"] = str(evaluator)
    runs = tmp_path / "runs"
    config = write_poc(tmp_path, cfg)
    res = run_poc(load_poc_config(config), runs / "poc", progress=False, echo=lambda line: None)
    claims = tmp_path / "claims.yaml"
    claims.write_text(yaml.safe_dump([{"id": "pag", "claim": "PAG lowers FID", "source": "Ahn et al. 2024",
                                       "config": "poc.yaml", "metric": "fid", "expect": {"pag": "better"}, "sweep": True}]))  # fmt: skip
    (row,) = judge(load_claims(claims)[0], res)
    ref = next(v for v in res["variants"] if v["name"] == "base")["metrics"]["fid"]
    pag = next(v for v in res["variants"] if v["name"] == "pag")["metrics"]["fid"]
    assert row.reference == pytest.approx(ref["mean"]) and row.value == pytest.approx(pag["mean"])
    assert row.rule == "t interval" and row.train_seeds == 3
    out = tmp_path / "findings.md"
    script = [sys.executable, str(ROOT / "scripts" / "findings.py"), "report", "--claims", str(claims)]
    subprocess.run([*script, "--runs", str(runs), "--out", str(out)], check=True, cwd=tmp_path)
    text = out.read_text()
    assert text == findings_markdown(load_claims(claims), claims, runs, Path("findings"))
    published = tmp_path / "findings" / "poc"
    for name in ("results.json", "report.md"):  # the linked report is the run's
        assert (published / name).read_bytes() == (runs / "poc" / name).read_bytes()
    assert sorted(p.name for p in (published / "figures").iterdir()) == sorted(
        p.name for p in (runs / "poc" / "figures").glob("*.png")
    )
    assert "(findings/poc/report.md)" in text
    assert f"{row.diff:+.4g}" in text and f"**{overall([row])}**" in text
    assert f"{pag['mean']:.4g} ± {pag['std']:.4g}" in text  # the sweep table: the report's numbers
    assert f"--out {runs / 'poc'}" in text
