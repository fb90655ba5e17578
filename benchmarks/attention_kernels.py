"""Compute saved by the attention kernels that exist to save it (linear and windowed attention):
FLOPs and wall time of one denoiser call against the base model, U-Net and DiT, on 32 px shapes.

    .venv/bin/python benchmarks/attention_kernels.py
    .venv/bin/python benchmarks/attention_kernels.py --threads 1   # steadier on a busy machine
    .venv/bin/python benchmarks/attention_kernels.py --size 64 --window 8

FLOPs are counted by torch.utils.flop_counter for one sample (the whole call, and the self-attention
kernels alone: q k^T and the mix with v, or their linear / windowed counterparts, without the q/k/v
and output projections). Time is one sampling-step call (CFG batch: null and real text rows) without
gradients, the variants' calls interleaved round by round so load from other processes hits all of
them alike; the median per variant is reported, and its ratio to the base model is the number to read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnlab.evaluate.cost import _flop_counter, count_parameters
from attnlab.models import ModelConfig, build_model
from attnlab.models.cost import example_inputs, guided

BASES = {
    # examples/unet-shapes-text.yaml's model (attention at 16 and 8 px for 32 px images)
    "unet": lambda size: dict(
        backbone="unet", width=64, channel_mult=(1, 2, 2), attn_resolutions=(size // 2, size // 4), heads=4
    ),
    # examples/dit-shapes-text.yaml's model (256 patch tokens for 32 px images)
    "dit": lambda size: dict(backbone="dit", width=192, depth=6, heads=6, patch=2),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch", type=int, default=4, help="samples per call (the call runs 2x for CFG)")
    p.add_argument("--window", type=int, default=4, help="window side of window_attention")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def variants(window: int) -> dict[str, dict]:
    return {
        "base": {},
        "linear": {"linear_attention": {}},
        f"window{window}": {"window_attention": {"window": window}},
    }


def flops(model: torch.nn.Module, cfg: ModelConfig) -> tuple[int, int]:
    """(FLOPs of one call on one sample, FLOPs of its self-attention kernels)."""
    inp = example_inputs(cfg, 1)
    with torch.no_grad(), _flop_counter() as counter:
        model(inp.x, inp.t, inp.cond)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    kernel = sum(
        counts[k] - counts.get(f"{k}.to_qkv", 0) - counts.get(f"{k}.to_out", 0)
        for k in counts
        if k.endswith(".self")
    )
    return counts["Global"], kernel


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"# one denoiser call, {args.size} px, batch {args.batch} x 2 (CFG), {args.threads} threads")
    print("| backbone | variant | params | GFLOPs/call | attn-kernel GFLOPs | time/call ms | time vs base |")
    print("|---|---|---|---|---|---|---|")
    for backbone, base in BASES.items():
        models, rows = {}, {}
        for name, techniques in variants(args.window).items():
            cfg = ModelConfig(
                **base(args.size), size=args.size, in_channels=3, cond="text", techniques=techniques
            )
            models[name] = (build_model(cfg).eval(), cfg)
            rows[name] = (count_parameters(models[name][0]), *flops(*models[name]))
        inp = example_inputs(next(iter(models.values()))[1], args.batch)
        x, t, cond = torch.cat([inp.x] * 2), torch.cat([inp.t] * 2), guided(inp.cond)
        times = {name: [] for name in models}
        with torch.no_grad():
            for m, _ in models.values():
                m(x, t, cond)  # warm-up
            for r in range(args.rounds):
                order = list(models) if r % 2 == 0 else list(reversed(models))
                for name in order:
                    t0 = time.perf_counter()
                    models[name][0](x, t, cond)
                    times[name].append(time.perf_counter() - t0)
        base_time = statistics.median(times["base"])
        for name, (params, total, kernel) in rows.items():
            med = statistics.median(times[name])
            print(
                f"| {backbone} | {name} | {params / 1e6:.2f}M | {total / 1e9:.3f} | {kernel / 1e9:.3f} "
                f"| {1e3 * med:.1f} | {med / base_time:.2f} |"
            )


if __name__ == "__main__":
    main()
