"""Architectural techniques side by side on `shapes` at 32 px: parameters, GFLOPs per denoiser call,
and training-step and sampling-step time relative to the base model of the same backbone, for every
registered architectural technique in every backbone that builds it; then the measured saving of the
techniques that exist to save compute (ToMe, linear and windowed attention) against their papers.

    .venv/bin/python benchmarks/techniques_table.py                       # the full table
    .venv/bin/python benchmarks/techniques_table.py --only tome window_attention --rounds 3

Inputs are real: a batch of `shapes` images with their captions through the MiniLM encoder (text
conditioning). A training step is forward + denoising loss + backward + AdamW on `--batch` images; a
sampling step is one classifier-free-guided denoiser call (2 x `--batch` rows), as the sampling loop
makes it. Timing rounds are interleaved: every round times one training and one sampling step of
every variant, the order reversing each round, so load from other processes on a shared machine hits
all variants alike. A step's time is the best over rounds of the process's CPU seconds with one
thread (the default: what the step costs with a core to itself, without the waits for a core that
other processes cause), or of wall seconds with more threads. FLOPs are counted by
torch.utils.flop_counter (attnlab.evaluate.cost) on one sample; for the compute-saving techniques
the self-attention FLOPs are also predicted from each layer's token count and width with the
papers' cost formulas, as a check of the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from attnlab.attention import Control, control
from attnlab.conditioning import Condition
from attnlab.data import DataConfig, build_dataset
from attnlab.evaluate.cost import _cpu_sdpa_flop
from attnlab.io import write_json
from attnlab.models import ModelConfig, build_model
from attnlab.models.cost import Inputs, model_cost, sample_step, train_step
from attnlab.techniques import REGISTRY, techniques

# Base models: the control benchmarks' 32 px U-Net, and a DiT with 2 x 2 patches (256 tokens).
BASES = {
    "unet": dict(backbone="unet", width=32, channel_mult=(1, 2, 2), attn_resolutions=(16, 8), heads=4),
    "dit": dict(backbone="dit", width=96, depth=4, heads=3, patch=2),
}

# Options worth a row of their own besides the defaults (a default that equals the base gets one too).
EXTRA = {
    "attn_placement": {"unet": [{"down": False}], "dit": [{"blocks": [2, 3]}]},
    "cross_attention": {"unet": [{"enabled": False}], "dit": [{"enabled": False}]},
    "abs_pos": {"unet": [{"kind": "sincos"}]},
    "time_embedding": {"dit": [{"mode": "token"}]},
    "tome": {"unet": [{"ratio": 0.75}], "dit": [{"ratio": 0.75}]},
}

CLAIMS = {
    "tome": "ToMe for SD (Bolya & Hoffman 2023): up to 60% of tokens merged, up to 2x faster generation "
    "and 5.6x less memory, the largest gains at high resolution (2048 px)",
    "linear_attention": "Katharopoulos et al. 2020: attention in O(N d^2) instead of O(N^2 d); "
    "up to 4000x faster autoregressive inference on very long sequences",
    "window_attention": "Swin (Liu et al. 2021): W-MSA costs 4NC^2 + 2M^2NC instead of 4NC^2 + 2N^2C "
    "(M^2 tokens per window), linear in image size",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per training / sampling step")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no OpenMP barrier stalls on a busy machine)"
    )
    p.add_argument("--backbones", nargs="*", default=list(BASES), choices=list(BASES))
    p.add_argument("--only", nargs="*", help="technique names to run (the bases always run)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    return p.parse_args()


# Variants


@dataclasses.dataclass
class Variant:
    backbone: str
    technique: str  # "base" for the base model
    options: dict
    cfg: ModelConfig
    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    train_s: list[float] = dataclasses.field(default_factory=list)
    sample_s: list[float] = dataclasses.field(default_factory=list)
    cost: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.technique == "base":
            return "base"
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.technique}" + (f" ({opts})" if opts else "")


def variants(a: argparse.Namespace, data_fields: dict) -> list[Variant]:
    out = []
    for backbone in a.backbones:
        base = {**BASES[backbone], **data_fields}
        out.append(Variant(backbone, "base", {}, ModelConfig(**base)))
        for tech in techniques():
            name = tech.name
            if not tech.architectural or backbone not in tech.hosts or (a.only and name not in a.only):
                continue
            for opts in [{}, *EXTRA.get(name, {}).get(backbone, [])]:
                cfg = ModelConfig(**{**base, "techniques": {name: opts}})
                out.append(Variant(backbone, name, opts, cfg))
    return out


def shapes_inputs(batch: int) -> tuple[Inputs, dict]:
    """A batch of 32 px `shapes` images, their captions encoded, and the model fields of the data."""
    from attnlab.conditioning.text import TextEncoder

    ds = build_dataset(DataConfig(name="shapes", size=32, num=batch, num_eval=batch), "train")
    x = ds.tensors()[:batch].float()
    enc = TextEncoder()
    tokens, mask = enc.encode(list(ds.texts())[:batch])
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0))
    fields = dict(in_channels=x.shape[1], size=x.shape[-1], dims=2, cond="text", context_dim=enc.dim)
    return Inputs(x, t, Condition(tokens=tokens.float(), mask=mask.bool())), fields


# Measurements


def self_attention_flops(model: torch.nn.Module, one: Inputs) -> int:
    """FLOPs inside the self-attention layers of one call (merging and projections included)."""
    from attnlab.attention import attention_layers

    names = {n for n, m in attention_layers(model).items() if m.kind == "self"}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_sdpa: _cpu_sdpa_flop} if cpu_sdpa is not None else {}
    # per-module counts (attnlab's own counter keeps only the total, which is all it needs)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.eval()(one.x, one.t, one.cond)
    prefix = type(model).__name__ + "."
    counts = counter.get_flop_counts()
    return int(sum(sum(counts[prefix + n].values()) for n in names if prefix + n in counts))


# Cost formulas of one self-attention layer on N tokens of width C (FLOPs = 2 x multiply-adds)


def global_flops(n: int, c: int) -> int:
    """q, k, v and output projections, then scores and the weighted sum (Swin's Omega(MSA), x2)."""
    return 8 * n * c * c + 4 * n * n * c


def window_flops(n: int, c: int, per_window: int) -> int:
    """Scores only inside windows of M^2 tokens (Swin's Omega(W-MSA), x2)."""
    return 8 * n * c * c + 4 * per_window * n * c


def linear_flops(n: int, c: int, head_dim: int) -> int:
    """phi(k)^T v and phi(q) (phi(k)^T v): 2 N d^2 multiply-adds per head; the normaliser phi(q) z."""
    return 8 * n * c * c + 4 * n * head_dim * c + 2 * n * c


def tome_flops(n: int, c: int, grid: tuple[int, ...], ratio: float, stride: int) -> int:
    """The layer on the N - r tokens left, plus the sources x destinations similarity matmul; one
    destination per whole stride x stride cell (1 x stride in 1D), leftover tokens are sources (tomesd)."""
    dst = math.prod(g // stride for g in grid)
    r = min(int(ratio * n), n - dst)
    return global_flops(n - r, c) + 2 * (n - dst) * dst * c


def tome_merges(n: int, finest: int, max_downsample: int | None) -> bool:
    """tomesd merges a layer only when ceil(sqrt(finest tokens / its tokens)) <= max_downsample."""
    return max_downsample is None or math.ceil(math.sqrt(finest / n)) <= max_downsample


class Shapes(Control):
    """Records each self-attention layer's grid, width and heads."""

    kind = "self"

    def __init__(self):
        self.seen = {}

    def before(self, call, x):
        self.seen[call.name] = (call.grid, call.layer.dim, call.heads)
        return x


def predicted_self_attn_flops(v: Variant, one: Inputs) -> int | None:
    """Self-attention FLOPs of one call by the paper's formula (None for other techniques)."""
    if v.technique not in CLAIMS and v.technique != "base":
        return None
    rec = Shapes()
    with torch.no_grad(), control(v.model, rec):
        v.model.eval()(one.x, one.t, one.cond)
    opts = {**REGISTRY[v.technique].defaults, **v.options} if v.technique != "base" else {}
    total = 0
    finest = max(math.prod(grid) for grid, _, _ in rec.seen.values())
    for grid, c, heads in rec.seen.values():
        n = math.prod(grid)
        if v.technique == "window_attention":
            total += window_flops(n, c, math.prod(min(opts["window"], g) for g in grid))
        elif v.technique == "linear_attention":
            total += linear_flops(n, c, c // heads)
        elif v.technique == "tome" and tome_merges(n, finest, opts["max_downsample"]):
            total += tome_flops(n, c, grid, opts["ratio"], opts["stride"])
        else:
            total += global_flops(n, c)
    return total


def measure_static(v: Variant, one: Inputs) -> None:
    torch.manual_seed(0)
    v.model = build_model(v.cfg)
    v.cost = model_cost(v.model, v.cfg, memory=False, text_tokens=one.cond.tokens.shape[1])
    v.cost["self_attn_flops"] = self_attention_flops(v.model, one)
    v.cost["self_attn_flops_predicted"] = predicted_self_attn_flops(v, one)
    v.opt = torch.optim.AdamW(v.model.parameters(), lr=1e-4)


def timed(fn) -> float:
    """CPU seconds of `fn()` with one thread (see the module docstring), else wall seconds."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    fn()
    return clock() - start


def run_round(vs: list[Variant], inp: Inputs) -> None:
    for v in vs:
        v.model.train()
        v.train_s.append(timed(lambda v=v: train_step(v.model, v.opt, inp)))
        v.model.eval()
        v.sample_s.append(timed(lambda v=v: sample_step(v.model, inp)))


# Report


def table(vs: list[Variant]) -> list[str]:
    bases = {v.backbone: v for v in vs if v.technique == "base"}
    head = "| backbone | level | technique | params (M) | GFLOPs / call | FLOPs vs base | train step vs base | sampling step vs base |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for v in vs:
        b = bases[v.backbone]
        level = f"L{REGISTRY[v.technique].level}" if v.technique != "base" else "-"
        tr = min(v.train_s) / min(b.train_s)
        sa = min(v.sample_s) / min(b.sample_s)
        fl = v.cost["flops_per_call"] / b.cost["flops_per_call"]
        lines.append(
            f"| {v.backbone} | {level} | {v.label} | {v.cost['params'] / 1e6:.3f} | "
            f"{v.cost['gflops_per_call']:.3f} | {fl:.2f}x | {tr:.2f}x | {sa:.2f}x |"
        )
    return lines


def savings(vs: list[Variant]) -> list[str]:
    """Per compute-saving technique: the paper's claim, then what each variant saved here."""
    bases = {v.backbone: v for v in vs if v.technique == "base"}
    lines = []
    for name, claim in CLAIMS.items():
        rows = [v for v in vs if v.technique == name]
        if rows:
            lines.append(f"- {name}. Claim: {claim}. Measured:")
        for v in rows:
            b = bases[v.backbone]
            attn = v.cost["self_attn_flops"] / b.cost["self_attn_flops"]
            predicted = v.cost["self_attn_flops_predicted"] / b.cost["self_attn_flops_predicted"]
            lines.append(
                f"  - {v.backbone} {v.label}: self-attention FLOPs x{attn:.2f} (formula x{predicted:.2f}), "
                f"whole call x{v.cost['flops_per_call'] / b.cost['flops_per_call']:.2f}; "
                f"training step {min(b.train_s) / min(v.train_s):.2f}x, "
                f"sampling step {min(b.sample_s) / min(v.sample_s):.2f}x as fast"
            )
    return lines


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    inp, fields = shapes_inputs(a.batch)
    one = Inputs(inp.x[:1], inp.t[:1], inp.cond.index(slice(0, 1)))
    vs = variants(a, fields)
    for v in vs:
        measure_static(v, one)
    for v in vs:  # warm-up: optimiser state, allocator, kernels
        run_round([v], inp)
        v.train_s.clear(), v.sample_s.clear()
    for r in range(a.rounds):
        run_round(vs if r % 2 == 0 else vs[::-1], inp)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, shapes 32 px, text-conditioned, "
        f"batch {a.batch} (sampling: {2 * a.batch} rows with CFG), best of {a.rounds} interleaved rounds ({'CPU' if a.threads == 1 else 'wall'} seconds), "
        f"{time.perf_counter() - start:.0f} s in all\n"
    )
    base_ms = {v.backbone: (min(v.train_s) * 1e3, min(v.sample_s) * 1e3) for v in vs if v.technique == "base"}
    for backbone, (tr, sa) in base_ms.items():
        print(f"base {backbone}: training step {tr:.0f} ms, sampling step {sa:.0f} ms")
    print(
        "\n".join(
            ["", *table(vs), "", "Compute-saving techniques, measured against their papers:", *savings(vs)]
        )
    )
    if a.out:
        rows = [
            {
                "backbone": v.backbone,
                "technique": v.technique,
                "options": v.options,
                **v.cost,
                "train_s": v.train_s,
                "sample_s": v.sample_s,
            }
            for v in vs
        ]
        write_json(a.out, {"args": {k: str(x) for k, x in vars(a).items()}, "rows": rows})
        print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    main()
