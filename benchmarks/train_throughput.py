"""Training throughput: attnlab's U-Net against diffusers' UNet2DModel with matched widths, blocks
and attention resolutions, on the same batches in one run, in fp32 and in bf16; plus the share of
this CPU's measured peak for each precision that a training step reaches.

    .venv/bin/python benchmarks/train_throughput.py                 # 16 px, batch 64, both precisions
    .venv/bin/python benchmarks/train_throughput.py --demo          # the demo's model, as the PoC trains it
    .venv/bin/python benchmarks/train_throughput.py --precision bf16 --size 32 --attn 16,8

attnlab computes bf16 the library's way (`attnlab.precision.set_precision`: autocast inside the
forward, group norm in fp32, the explicit attention path on CPU); diffusers gets the same
`torch.autocast(bfloat16)` around its forward, in its own memory format and in channels-last. The
peaks are the best square matmul in each precision and the best channels-last bf16 3x3 convolution.

The models' timing rounds are interleaved (and their order alternates), so load from other
processes on a shared machine hits all alike; the ratio is the number to read. On a busy machine
the CPU-time ratio (the work per step, whatever share of the cores the process got) is the steadiest.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from attnlab.models import ModelConfig, build_model
from attnlab.precision import set_precision
from attnlab.runtime import tune_malloc


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, help="image side in pixels")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--mult", default="1,2,2", help="channel multiplier per level")
    p.add_argument("--res-blocks", type=int, default=1, help="residual blocks per down level")
    p.add_argument("--attn", default="8,4", help="feature sizes with self-attention")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-channels-last-peer", action="store_true", help="skip diffusers in channels-last")
    p.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both (comma-separated)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="the demo's model and step: 32 px, batch 32, width 16, mult 1,2,4, attention at 16,8, 1 thread",
    )
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as it is")
    p.add_argument("--markdown", help="also write the tables to this file")
    a = p.parse_args()
    if a.demo:
        a.size, a.batch, a.width, a.mult, a.attn, a.threads = 32, 32, 16, "1,2,4", "16,8", 1
    a.precisions = [v for v in a.precision.split(",") if v]
    if not set(a.precisions) <= {"fp32", "bf16"}:
        p.error("--precision takes fp32, bf16 or fp32,bf16")
    return a


def ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


# Models


def our_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        backbone="unet",
        size=a.size,
        width=a.width,
        channel_mult=ints(a.mult),
        num_res_blocks=a.res_blocks,
        attn_resolutions=ints(a.attn),
        heads=a.heads,
    )


def diffusers_twin(cfg: ModelConfig) -> UNet2DModel:
    """UNet2DModel with our level widths, blocks per level, attention sizes and scale-shift time
    conditioning; diffusers' own defaults otherwise (32 GroupNorm groups, separate q/k/v)."""
    sizes = cfg.feature_sizes()
    attn = [s in cfg.attn_resolutions for s in sizes]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    widths = tuple(cfg.width * m for m in cfg.channel_mult)
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]  # + the middle block's
    head_dim = max(attn_widths) // cfg.heads
    return UNet2DModel(
        sample_size=cfg.size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=widths,
        layers_per_block=cfg.num_res_blocks,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=head_dim,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=math.gcd(32, cfg.width),  # diffusers' 32 unless the width is smaller
    )


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Training step


class Trainer:
    """One model, its AdamW, and a step of forward + backward + update on a given batch.

    `autocast`: wrap the forward in torch.autocast(bfloat16) (the peer's bf16); attnlab's bf16 is
    set on the model itself (`set_precision`) and needs no wrapper."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        call,
        precision: str,
        channels_last: bool = False,
        autocast: bool = False,
    ):
        self.name, self.model, self.call, self.precision = name, model.train(), call, precision
        self.channels_last, self.autocast = channels_last, autocast
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.step_seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # process CPU time: the work, whatever share of the CPU we got
        self.batch = 0

    def loss(self, batch) -> torch.Tensor:
        x, t, noise = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.call(self.model, x, t)
        return F.mse_loss(out.float(), noise)

    def step(self, batch) -> None:
        self.loss(batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, batches) -> None:
        for b in batches:
            cpu = time.process_time()
            self.step_seconds.append(_time(lambda b=b: self.step(b)))
            self.cpu_seconds.append(time.process_time() - cpu)
            self.batch = b[0].shape[0]

    def images_per_s(self) -> float:
        """Throughput at the median step time (a load burst on a shared machine moves it least)."""
        return self.batch / statistics.median(self.step_seconds)

    def images_per_cpu_s(self) -> float:
        return self.batch / statistics.median(self.cpu_seconds)

    def step_flops(self, batch) -> int:
        """FLOPs of one forward + backward, counted by torch's flop counter (the fp32 count: the
        same work whatever the precision)."""
        with FlopCounterMode(display=False) as counter:
            self.loss(batch).backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def make_batches(n: int, batch: int, size: int, channels: int) -> list:
    """Noisy inputs x_t, timesteps and target noise; the same tensors go to every model."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x0 = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = torch.cos(t.float() / 1000 * torch.pi / 2)[:, None, None, None]  # alpha_bar^(1/2), cosine-like
        out.append(((a * x0 + (1 - a**2).sqrt() * noise), t, noise))
    return out


# Peaks


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 3072), tries: int = 4) -> tuple[float, float]:
    """Best GFLOP/s of square matmuls in `dtype` with the current thread count (max over sizes), per
    wall-clock second and per CPU second."""
    rates = [
        _rates(lambda a, b: a @ b, (torch.randn(n, n, dtype=dtype),) * 2, 2 * n**3, tries) for n in sizes
    ]
    return max(r[0] for r in rates), max(r[1] for r in rates)


def conv_peak(tries: int = 4) -> tuple[float, float]:
    """Best GFLOP/s of a channels-last bf16 3x3 convolution (batch 32; 32-128 channels, 8-32 px)."""
    rates = []
    for c, px in ((32, 32), (64, 16), (128, 8)):
        x = torch.randn(32, c, px, px, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(torch.bfloat16, memory_format=torch.channels_last)
        with torch.no_grad():
            rates.append(_rates(lambda x, conv=conv: conv(x), (x,), 2 * 32 * c * c * 9 * px * px, tries))
    return max(r[0] for r in rates), max(r[1] for r in rates)


def _rates(fn, args, flops: int, tries: int) -> tuple[float, float]:
    fn(*args)
    wall, cpu = [], []
    for _ in range(tries):
        c0 = time.process_time()
        wall.append(_time(lambda: fn(*args)))
        cpu.append(time.process_time() - c0)
    return flops / min(wall) / 1e9, flops / min(cpu) / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# Report


def trainers_for(cfg: ModelConfig, precisions: list[str], channels_last_peer: bool) -> list[Trainer]:
    out = []
    for p in precisions:
        low = p == "bf16"
        torch.manual_seed(0)
        out.append(Trainer(f"attnlab UNet, {p}", set_precision(build_model(cfg), p), _ours, p))
        out.append(Trainer(f"diffusers UNet2DModel, {p}", diffusers_twin(cfg), _theirs, p, autocast=low))
        if channels_last_peer:
            twin = diffusers_twin(cfg).to(memory_format=torch.channels_last)
            out.append(Trainer(f"diffusers channels-last, {p}", twin, _theirs, p, True, autocast=low))
    return out


def _ours(m, x, t):
    return m(x, t)


def _theirs(m, x, t):
    return m(x, t).sample


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    if not a.no_malloc_tuning:
        tune_malloc()
    cfg = our_config(a)
    trainers = trainers_for(cfg, a.precisions, not a.no_channels_last_peer)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {a.batch} x "
        f"{cfg.in_channels}x{a.size}x{a.size}; width {a.width}, channel_mult {cfg.channel_mult}, "
        f"res blocks {a.res_blocks}, attention at {cfg.attn_resolutions}, {a.heads} heads; "
        f"malloc tuned: {not a.no_malloc_tuning}",
    ]
    p_ours, p_peer = params(trainers[0].model), params(trainers[1].model)
    lines.append(f"parameters: attnlab {p_ours:,}, diffusers {p_peer:,} (ratio {p_ours / p_peer:.3f})")
    if abs(p_ours / p_peer - 1) > 0.10:
        lines.append("WARNING: parameter counts differ by more than 10%; the comparison is not matched")
    print("\n".join(lines), flush=True)

    batches = make_batches(a.steps, a.batch, a.size, cfg.in_channels)
    for tr in trainers:
        for i in range(a.warmup):
            tr.step(batches[i % len(batches)])
    for r in range(a.rounds):
        for tr in trainers if r % 2 == 0 else trainers[::-1]:  # alternate who goes first
            tr.timed(batches)

    peaks = {"fp32": matmul_peak(torch.float32)}
    if "bf16" in a.precisions:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
        peaks["bf16 conv"] = conv_peak()
    flops = trainers[0].step_flops(batches[0])
    base = trainers[0]  # attnlab in the first precision asked
    table = [
        "| model | images/s (median step) | images per CPU-s | vs attnlab "
        f"{base.precision} | vs the faster diffusers, same precision | GFLOP/s | share of the matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for tr in trainers:
        peers = [p for p in trainers if p.precision == tr.precision and p.name.startswith("diffusers")]
        peer = max(peers, key=Trainer.images_per_s)  # the faster memory format
        rate = flops * tr.images_per_s() / a.batch / 1e9
        peak = peaks[tr.precision][0]
        table.append(
            f"| {tr.name} | {tr.images_per_s():.1f} | {tr.images_per_cpu_s():.1f} | "
            f"{tr.images_per_s() / base.images_per_s():.2f}x | {tr.images_per_s() / peer.images_per_s():.2f}x | "
            f"{rate:.0f} | {rate / peak:.0%} |"
        )
    peak_lines = [
        f"step: {flops / 1e9:.2f} GFLOP (forward + backward, attnlab's model, torch's flop counter)",
        "peaks (GFLOP/s, per wall second | per CPU second): "
        + "; ".join(f"{k} {w:.0f} | {c:.0f}" for k, (w, c) in peaks.items()),
    ]
    if "bf16 conv" in peaks:
        for tr in trainers:
            if tr.precision == "bf16":
                rate = flops * tr.images_per_s() / a.batch / 1e9
                peak_lines.append(f"{tr.name}: {rate / peaks['bf16 conv'][0]:.0%} of the bf16 conv peak")
    out = "\n".join([*table, "", *peak_lines])
    print("\n" + out)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n\n".join(["\n".join(lines), out]) + "\n")


if __name__ == "__main__":
    main()
