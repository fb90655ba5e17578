"""The tiny PoC the PoC tests run (its config, written as poc.yaml, and an untrained evaluator), and
a reader of report.md's metric tables that checks every number against numpy over results.json."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import torch
import yaml

from attnlab.poc import load_poc_config
from attnlab.poc.config import PocConfig
from attnlab.poc.metrics import ALL

# The tiny PoC: a 16 px text-conditioned shapes U-Net, trained 2 steps, sampled in 2 DDIM steps.

DATA = {"name": "shapes", "size": 16, "num": 48, "num_eval": 16}
MODEL = {
    "backbone": "unet",
    "cond": "text",
    "width": 16,
    "channel_mult": [1, 2],
    "attn_resolutions": [8],
    "heads": 2,
    "norm_groups": 4,
}
TRAIN = {"batch_size": 4, "warmup": 1, "log_every": 1, "ckpt_every": 2, "progress": False}
SAMPLE = {"sampler": "ddim", "guidance": 2.0}
BUDGET = {"train_steps": 2, "sample_steps": 2, "num_samples": 4, "batch_size": 4}
SEEDS = [0, 1, 2]

BASE = {"name": "base"}
ATTN16 = {"name": "attn16", "model": {"attn_resolutions": [16, 8]}, "level": 2}
PAG = {"name": "pag", "base": "base", "techniques": {"pag": {"scale": 2.0}}}


def tiny_poc(**changes) -> dict:
    """The tiny PoC config as a dict (a fresh copy: tests may change it), with `changes` on top;
    `variants` and `metrics` come with the changes."""
    base = {"data": DATA, "model": MODEL, "train": TRAIN, "sample": SAMPLE, "budget": BUDGET, "seeds": SEEDS}
    return copy.deepcopy({**base, **changes})


def write_poc(tmp_path: Path, cfg: dict) -> Path:
    """`cfg` written as tmp_path/poc.yaml."""
    path = Path(tmp_path) / "poc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_poc(tmp_path: Path, cfg: dict) -> PocConfig:
    """`cfg` written as tmp_path/poc.yaml and loaded as a PoC config."""
    return load_poc_config(write_poc(tmp_path, cfg))


def save_untrained_evaluator(path: Path) -> Path:
    """An untrained shapes evaluator saved under path/evaluator (the numbers are meaningless, the
    pipeline is the same); returns `path`."""
    from attnlab.evaluate import Evaluator
    from attnlab.evaluate.network import EvaluatorNet
    from attnlab.evaluate.tasks import ShapesTask

    torch.manual_seed(0)
    task = ShapesTask()
    Evaluator(task, EvaluatorNet(task.network(2, 3)).eval(), {"name": "untrained"}).save(path / "evaluator")
    return path


# report.md's numbers against results.json, recomputed here with numpy (not with attnlab's Stat)

DDOF = 1  # the report's "± std" is the sample standard deviation over the seeds (n - 1)
EXACT = {"flops_per_sample", "flops_per_call", "params", "peak_mem_bytes", "train_seconds"}  # no spread
LOWER_IS_BETTER = {"fid", "kid_mean", "pitch_cents_median", "latency_s", *EXACT}
PERCENT = {"all_correct", "class_acc", "shape_acc", "color_acc", "position_acc", "count_acc"}
PERCENT |= {"relation_acc", "pitch_acc", "waveform_acc"}
LABELS = {m.label: m.key for m in ALL.values()}  # column header -> metric key
TABLES = ("Quality", "Condition alignment", "Cost")  # the `##` sections holding metric tables
NOTE = re.compile(r"^(.*?)(?: (≈ best|within noise|same|better|worse|of \S+))?$")


def _si(v: float, unit: str) -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}".strip()


def fmt(key: str, v: float) -> str:
    """A number as the report writes it (its documented formats, written out again here)."""
    if key in PERCENT:
        return f"{100 * v:.1f}%"
    if key == "fid":
        return f"{v:.2f}"
    if key == "heatmap_iou":
        return f"{v:.3f}"
    if key == "pitch_cents_median":
        return f"{v:.0f}"
    if key == "kid_mean":  # three significant digits
        return f"{v:.0f}" if v == 0 or abs(v) >= 100 else f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.1e}"
    if key in ("latency_s", "train_seconds"):
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s" if v < 60 else f"{v / 60:.1f} min"
    if key in ("flops_per_sample", "flops_per_call"):
        return _si(v, "FLOP")
    if key == "params":
        return _si(v, "")
    if key == "peak_mem_bytes":
        return _si(v, "B")
    raise KeyError(f"no format for {key!r}")


def seed_grid(entry: dict, key: str) -> list[list[float | None]]:
    """A variant's values of `key` per training seed and sampling seed (None: not measured); the
    real-data row has one row, its stored values."""
    if "per_train_seed" in entry:
        return [
            [scores.get(key) for scores in per_seed.values()] for per_seed in entry["per_train_seed"].values()
        ]
    return [list(entry["metrics"].get(key, {}).get("values", []))]


def _finite(row) -> list[float]:
    return [float(v) for v in row if v is not None and math.isfinite(float(v))]


def seed_values(entry: dict, key: str) -> list[float]:
    """A variant's finite values of `key`, training seed after training seed."""
    return [v for row in seed_grid(entry, key) for v in _finite(row)]


def numpy_stat(entry: dict, key: str) -> tuple[float, float] | None:
    """(mean, std) of a metric with numpy: over the sampling seeds of one training seed (std with
    DDOF); with several training seeds, over the training seeds' means; or the exact cost number."""
    if key in EXACT:
        v = entry.get("cost", {}).get(key)
        return None if v is None else (float(v), 0.0)
    rows = [np.asarray(_finite(r)) for r in seed_grid(entry, key)]
    rows = [r for r in rows if len(r)]
    if not rows:
        return None
    vals = rows[0] if len(rows) == 1 else np.array([r.mean() for r in rows])
    return float(np.mean(vals)), float(np.std(vals, ddof=DDOF)) if len(vals) > 1 else 0.0


def numpy_real(a: dict, b: dict, key: str) -> tuple[bool, tuple[float, float] | None]:
    """Whether variant `a` really differs from `b` on `key`, by the noise model as specified: one
    training seed, |mean difference| > hypot of the sampling stds; two, the per-training-seed
    differences (paired over sampling seeds) agree in sign and each exceeds twice its standard
    error; three or more, their 95% Student-t interval excludes 0 (returned)."""
    ga, gb = seed_grid(a, key), seed_grid(b, key)
    if len(ga) < 2 or len(gb) < 2:
        sa, sb = numpy_stat(a, key), numpy_stat(b, key)
        return abs(sa[0] - sb[0]) > math.hypot(sa[1], sb[1]), None
    diffs, ses = [], []
    for ra, rb in zip(ga, gb):
        d = np.array([x - y for x, y in zip(ra, rb) if x is not None and y is not None])
        if len(d):
            diffs.append(d.mean())
            ses.append(d.std(ddof=1) / np.sqrt(len(d)))
    if len(diffs) == 2:
        return diffs[0] * diffs[1] > 0 and all(abs(d) > 2 * se for d, se in zip(diffs, ses)), None
    from scipy import stats

    n = len(diffs)
    half = stats.t.ppf(0.975, df=n - 1) * np.std(diffs, ddof=1) / np.sqrt(n)
    m = float(np.mean(diffs))
    return not (m - half <= 0 <= m + half), (m - half, m + half)


def shown(key: str, stat: tuple[float, float] | None) -> str:
    if stat is None:
        return "–"
    return fmt(key, stat[0]) if key in EXACT else f"{fmt(key, stat[0])} ± {fmt(key, stat[1])}"


def better(key: str, a: float, b: float) -> bool:
    return a < b if key in LOWER_IS_BETTER else a > b


def best_of(key: str, means: dict[str, float]) -> str:
    """numpy's pick of the best mean (argmin or argmax by the metric's direction; the first on a tie)."""
    names, vals = list(means), np.array(list(means.values()))
    return names[int(np.argmin(vals) if key in LOWER_IS_BETTER else np.argmax(vals))]


def md_table(md: str, heading: str) -> tuple[list[str], list[list[str]]] | None:
    """The table under `## heading` in report.md: its header and rows of cell texts (group-title rows
    left out); None when the report has no such section."""
    lines = md.splitlines()
    if f"## {heading}" not in lines:
        return None
    start = next(i for i in range(lines.index(f"## {heading}"), len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    header, rows = table[0], table[2:]  # table[1] is the alignment row
    groups = [r for r in rows if r[0].startswith("*") and not r[0].startswith("**") and not any(r[1:])]
    return header, [r for r in rows if r not in groups]


def parse_cell(text: str) -> tuple[str, bool, str]:
    """'**20.11 ± 0.80** ≈ best' -> ('20.11 ± 0.80', True, '≈ best')."""
    value, note = NOTE.match(text).groups()
    bold = value.startswith("**") and value.endswith("**") and len(value) > 4
    return (value[2:-2] if bold else value), bold, note or ""


def report_mismatches(md: str, results: dict) -> tuple[int, list[str]]:
    """Every cell of report.md's metric tables against numpy over results.json: the mean ± std over
    per_train_seed (std with DDOF), bold where numpy's argmin/argmax of the means is, '≈ best' when
    `numpy_real` finds no real difference from the best, and the headline's difference from the
    reference with its verdict (and interval).

    Returns:
        (cells checked, one line per cell that differs).
    """
    variants = {v["name"]: v for v in results["variants"]}
    ref = results["reference"]
    bad, checked = [], 0

    def check(where: str, got, want) -> None:
        nonlocal checked
        checked += 1
        if got != want:
            bad.append(f"{where}: report {got!r}, numpy {want!r}")

    for heading in TABLES:
        found = md_table(md, heading)
        if found is None:
            continue
        header, rows = found
        keys = [LABELS[h] for h in header[1:-1]]
        lead = keys[0]
        check(f"{heading} header", header[-1], f"{header[1]} vs reference")
        stats = {k: {n: s for n, v in variants.items() if (s := numpy_stat(v, k)) is not None} for k in keys}
        best = {k: best_of(k, {n: s[0] for n, s in have.items()}) for k, have in stats.items() if have}
        named = [r[0].strip("`") for r in rows if r[0] != "real data"]
        check(f"{heading} rows", sorted(named), sorted(variants))  # one row per variant
        for row in rows:
            name = row[0].strip("`")
            check(f"{heading}/{name} cells", len(row), len(header))
            if name == "real data":
                for k, text in zip(keys, row[1:-1], strict=False):
                    check(
                        f"{heading}/real data/{k}",
                        parse_cell(text),
                        (shown(k, numpy_stat(results["real_data"], k)), False, ""),
                    )
                continue
            entry = variants[name]
            for k, text in zip(keys, row[1:-1], strict=False):
                s = stats[k].get(name)
                want_bold = (
                    s is not None
                    and s[0] == stats[k][best[k]][0]
                    and len({x[0] for x in stats[k].values()}) > 1
                )
                note = ""
                if k == "train_seconds" and entry["trained_by"] != name:
                    note = f"of {entry['trained_by']}"
                elif s is not None and k not in EXACT and s[0] != stats[k][best[k]][0]:
                    note = "≈ best" if not numpy_real(entry, variants[best[k]], k)[0] else ""
                check(f"{heading}/{name}/{k}", parse_cell(text), (shown(k, s), want_bold, note))
            s, r = stats[lead].get(name), stats[lead].get(ref)
            real = numpy_real(entry, variants[ref], lead) if s and r and name != ref else (False, None)
            want = _versus(lead, s, r, name == ref, real)
            check(f"{heading}/{name}/vs reference", parse_cell(row[-1]), want)
    return checked, bad


def _versus(key: str, s, r, is_ref: bool, real: tuple[bool, tuple | None]) -> tuple[str, bool, str]:
    """The reference column: '−5.00' (or '1.20×' for latency and exact costs), with the 95% interval
    '[−7.10, −2.90]' when three or more training seeds give one, and its verdict."""
    if is_ref:
        return "reference", False, ""
    if s is None or r is None:
        return "–", False, ""
    if key == "latency_s" or key in EXACT:
        text = f"{s[0] / r[0]:.2f}×" if r[0] else "–"
    else:
        diff = s[0] - r[0]
        text = ("+" if diff >= 0 else "−") + fmt(key, abs(diff))
        if real[1] is not None:
            lo, hi = (("+" if v >= 0 else "−") + fmt(key, abs(v)) for v in real[1])
            text += f" [{lo}, {hi}]"
    if key not in EXACT and not real[0]:
        return text, False, "within noise"
    if s[0] == r[0]:
        return text, False, "same"
    return text, False, "better" if better(key, s[0], r[0]) else "worse"
