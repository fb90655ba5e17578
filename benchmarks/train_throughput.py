"""Training throughput: attnlab's U-Net against diffusers' UNet2DModel with matched widths, blocks
and attention resolutions, on the same batches in one run; plus the share of this CPU's measured
fp32 matmul peak that a training step reaches.

    .venv/bin/python benchmarks/train_throughput.py                 # 16 px, batch 64 (the demo's shape)
    .venv/bin/python benchmarks/train_throughput.py --size 32 --attn 16,8

The models' timing rounds are interleaved (and their order alternates), so load from other
processes on a shared machine hits both alike; the ratio is the number to read. On a busy machine
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
    p.add_argument("--bf16", action="store_true", help="every model's forward under bfloat16 autocast")
    return p.parse_args()


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
    """One model, its fused AdamW, and a step of forward + backward + update on a given batch."""

    def __init__(
        self, name: str, model: torch.nn.Module, call, channels_last: bool = False, bf16: bool = False
    ):
        self.name, self.model, self.call = name, model.train(), call
        self.channels_last, self.bf16 = channels_last, bf16
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.step_seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # process CPU time: the work, whatever share of the CPU we got
        self.batch = 0

    def loss(self, batch) -> torch.Tensor:
        x, t, noise = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
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

    def images_per_s_mean(self) -> float:
        return self.batch * len(self.step_seconds) / sum(self.step_seconds)

    def images_per_s_best(self) -> float:
        """Throughput at the fastest step: the one least disturbed by other processes (as timeit)."""
        return self.batch / min(self.step_seconds)

    def step_flops(self, batch) -> int:
        """FLOPs of one forward + backward, counted by torch's flop counter."""
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


def matmul_peak(sizes=(1024, 2048, 3072), tries: int = 4) -> tuple[float, float]:
    """Best fp32 GFLOP/s of square matmuls with the current thread count (max over sizes), per
    wall-clock second and per CPU second."""
    rates = [_matmul_rates(n, tries) for n in sizes]
    return max(r[0] for r in rates), max(r[1] for r in rates)


def _matmul_rates(n: int, tries: int) -> tuple[float, float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall, cpu = [], []
    for _ in range(tries):
        c0 = time.process_time()
        wall.append(_time(lambda: a @ b))
        cpu.append(time.process_time() - c0)
    return 2 * n**3 / min(wall) / 1e9, 2 * n**3 / min(cpu) / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    cfg = our_config(a)
    torch.manual_seed(0)
    ours = Trainer("attnlab UNet", build_model(cfg), lambda m, x, t: m(x, t), bf16=a.bf16)
    peers = [
        Trainer("diffusers UNet2DModel", diffusers_twin(cfg), lambda m, x, t: m(x, t).sample, bf16=a.bf16)
    ]
    if not a.no_channels_last_peer:
        twin = diffusers_twin(cfg).to(memory_format=torch.channels_last)
        peers.append(Trainer("diffusers, channels_last", twin, lambda m, x, t: m(x, t).sample, True, a.bf16))
    trainers = [ours, *peers]

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {a.batch} x {cfg.in_channels}x{a.size}x{a.size}"
        f", {'bfloat16 autocast' if a.bf16 else 'float32'}"
    )
    print(
        f"config: width {a.width}, channel_mult {cfg.channel_mult}, res blocks {a.res_blocks}, attention at {cfg.attn_resolutions}"
    )
    p_ours, p_peer = params(ours.model), params(peers[0].model)
    print(f"parameters: attnlab {p_ours:,}  diffusers {p_peer:,}  (ratio {p_ours / p_peer:.3f})")
    if abs(p_ours / p_peer - 1) > 0.10:
        print("WARNING: parameter counts differ by more than 10%; the comparison is not matched")

    batches = make_batches(a.steps, a.batch, a.size, cfg.in_channels)
    for tr in trainers:
        for i in range(a.warmup):
            tr.step(batches[i % len(batches)])
    for r in range(a.rounds):
        for tr in trainers if r % 2 == 0 else trainers[::-1]:  # alternate who goes first
            tr.timed(batches)

    print(f"\n{'images/s: median step | mean | best step    CPU s per step':>70s}")
    for tr in trainers:
        cpu = statistics.median(tr.cpu_seconds)
        rates = f"{tr.images_per_s():8.1f} | {tr.images_per_s_mean():6.1f} | {tr.images_per_s_best():6.1f}"
        print(f"{tr.name:28s} {rates}   {cpu:8.2f}")
    for peer in peers:
        median = ours.images_per_s() / peer.images_per_s()
        mean = ours.images_per_s_mean() / peer.images_per_s_mean()
        best = ours.images_per_s_best() / peer.images_per_s_best()
        cpu = statistics.median(peer.cpu_seconds) / statistics.median(ours.cpu_seconds)
        print(
            f"ratio attnlab / {peer.name}: {median:.2f}x (median step), {mean:.2f}x (mean),"
            f" {best:.2f}x (best step), {cpu:.2f}x (CPU time)"
        )

    peak, peak_cpu = matmul_peak()
    print(
        f"\nfp32 matmul peak (best square matmul, 1024-3072): {peak:.1f} GFLOP/s;"
        f" per CPU second: {peak_cpu:.1f} GFLOP"
    )
    for tr in trainers[:2]:
        flops = tr.step_flops(batches[0])
        achieved = flops * tr.images_per_s() / a.batch / 1e9
        per_cpu = flops / statistics.median(tr.cpu_seconds) / 1e9
        print(
            f"{tr.name:28s} {flops / 1e9:7.1f} GFLOP per step (fwd+bwd), {achieved:6.1f} GFLOP/s"
            f" = {achieved / peak:.0%} of peak; per CPU second {per_cpu:.1f} GFLOP = {per_cpu / peak_cpu:.0%}"
        )


if __name__ == "__main__":
    main()
