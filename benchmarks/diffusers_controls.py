"""attnlab's controls on a stock diffusers Stable Diffusion 1.5 pipeline against their peers, side by
side in one run: the overhead of an empty or idle control scope, token merging against tomesd,
T-GATE against the `tgate` package, PAG and SAG against diffusers' own pipelines, heat maps against a
DAAM-style capture.

    .venv/bin/python benchmarks/diffusers_controls.py --out benchmarks/results/diffusers_controls-cpu
    .venv/bin/python benchmarks/diffusers_controls.py --device cuda --out runs/bench/diffusers-cuda
    .venv/bin/python benchmarks/diffusers_controls.py --quick   # smoke test: tiny U-Net, one step

The U-Net is Stable Diffusion 1.5's architecture (860M parameters) built from its config with random
weights: speed does not depend on the weights. The text encoder is a small random CLIP of width 768
and the VAE a tiny one that is never run (`output_type="latent"`), so only the denoising loop is
timed. Every variant runs on the same latents and prompt. Speed: a warm-up pass over every variant
(which also records outputs and peak memory), then `--rounds` rounds running every variant once,
in an order that rotates each round, so load from other processes hits all of them alike; times are
medians, ratios the median of the per-round ratios (a variant and its peer ran in the same round),
and the spread is half the range over rounds. Peak memory is the call's peak above the memory held
when it started: CUDA's allocator peak, or on a CPU the process RSS read by a thread every
millisecond.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnlab.attention import control
from attnlab.control import PAG, SAG, HeatMaps, TGate
from attnlab.io import write_json, write_text
from attnlab.models.techniques.tome import TokenMerging

PROMPT = "a red car on the green tree"

# Stable Diffusion 1.5's U-Net (runwayml/stable-diffusion-v1-5 unet/config.json)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
QUICK_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
PAG_SCALE, SAG_SCALE, GUIDANCE = 3.0, 0.75, 7.5
TGATE = {"sp_interval": 5, "fi_interval": 1, "warm_up": 2}  # the T-GATE code's defaults
TGATE_GATE = 0.4  # its gate step 10 of 25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp16 on cuda)")
    p.add_argument(
        "--size", type=int, help="image side in pixels (latents 1/8); default 128 on cpu, 512 on cuda"
    )
    p.add_argument("--steps", type=int, help="DDIM steps; default 3 on cpu, 25 on cuda")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up pass")
    p.add_argument("--tome-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="the clock the goals are judged on"
    )
    p.add_argument("--only", nargs="*", help="rows to run (the bare pipeline always runs)")
    p.add_argument(
        "--quick", action="store_true", help="tiny U-Net, 64 px, one step, one round: a smoke test"
    )
    p.add_argument("--out", help="directory for diffusers_controls.json and .md (default: print only)")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if a.quick:
        a.size, a.steps, a.rounds = a.size or 64, a.steps or 1, min(a.rounds, 1)
    a.size = a.size or (512 if cuda else 128)
    a.steps = a.steps or (25 if cuda else 3)
    a.dtype = torch.float16 if cuda else torch.float32
    if a.size % 64:
        p.error(f"--size must be a multiple of 64 (the U-Net halves the latents three times), got {a.size}")
    return a


# The pipeline


def clip_tokenizer():
    """A CLIP tokenizer over single letters (no merges): every word is its letters plus `</w>`."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for t in [*letters, *(c + "</w>" for c in letters)]:
        vocab[t] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=[], model_max_length=77, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )  # fmt: skip


def clip_text(width: int, tokenizer):
    """A small random CLIP text encoder whose output width feeds the U-Net's cross-attention."""
    from transformers import CLIPTextConfig, CLIPTextModel

    heads = 12 if width % 64 == 0 else 4
    cfg = CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(cfg).eval()


def components(quick: bool) -> dict:
    """Random-weight SD 1.5 parts (a tiny U-Net with --quick); the VAE only sets the 1/8 scale."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet_cfg = QUICK_UNET if quick else SD15_UNET
    unet = UNet2DConditionModel(**unet_cfg).eval()
    tok = clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
    ).eval()  # fmt: skip
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return {
        "unet": unet, "vae": vae, "text_encoder": clip_text(unet_cfg["cross_attention_dim"], tok),
        "tokenizer": tok, "scheduler": sched, "safety_checker": None, "feature_extractor": None,
        "image_encoder": None,
    }  # fmt: skip


def pipeline(cls, parts: dict, **extra):
    """A diffusers pipeline of class `cls` over the shared parts (each class takes its own subset)."""
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    pipe = cls(**{k: v for k, v in parts.items() if k in names}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Peers


def run_tomesd(pipe, kw: dict, ratio: float):
    """tomesd (dbolya/tomesd) patched for one call, removed afterwards."""
    import tomesd

    tomesd.apply_patch(pipe, ratio=ratio, max_downsample=1, sx=2, sy=2, use_rand=False)
    try:
        return pipe(**kw).images
    finally:
        tomesd.remove_patch(pipe)


def run_tgate(pipe, kw: dict, gate_step: int):
    """The `tgate` package's SD loop (HaozheLiu-ST/T-GATE `TgateSDLoader`); it replaces the `forward`
    of every `Attention` module and leaves it replaced, so the call's patches are taken off after it."""
    from tgate import TgateSDLoader

    TgateSDLoader(pipe)
    try:
        return pipe.tgate(**kw, gate_step=gate_step, **TGATE).images
    finally:
        for m in pipe.unet.modules():
            if type(m).__name__ == "Attention":
                m.__dict__.pop("forward", None)
                m.__dict__.pop("cache", None)


class MapCapture:
    """DAAM's capture (castorini/daam `trace.py`): every cross-attention runs diffusers' explicit
    `AttnProcessor`, its probabilities materialised by `get_attention_scores`, and the conditional
    rows' maps are summed per layer over the steps (DAAM's heat-map collection)."""

    def __init__(self, unet):
        from diffusers.models.attention_processor import Attention

        self.unet = unet
        self.layers = {
            n: m for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention
        }
        self.sums: dict[str, torch.Tensor] = {}

    def __call__(self, pipe, kw: dict):
        from diffusers.models.attention_processor import AttnProcessor

        saved = {n: m.processor for n, m in self.layers.items()}
        for name, m in self.layers.items():
            m.processor = AttnProcessor()
            m.get_attention_scores = self._recording(name, m)
        try:
            return pipe(**kw).images
        finally:
            for name, m in self.layers.items():
                m.processor = saved[name]
                del m.get_attention_scores

    def _recording(self, name: str, module):
        scores = type(module).get_attention_scores.__get__(module)

        def record(query, key, attention_mask=None):
            p = scores(query, key, attention_mask)  # (B * heads, N, L)
            b = p.shape[0] // module.heads
            cond = p.view(b, module.heads, *p.shape[1:])[b // 2 :].detach().float()  # CFG: [uncond; cond]
            prev = self.sums.get(name)
            self.sums[name] = cond if prev is None else prev + cond
            return p

        return record


# Variants


def hosted(pipe, kw: dict, make: Callable[[], list]):
    def run():
        with control(pipe, make()):
            return pipe(**kw).images

    return run


def tgate_fraction(steps: int) -> tuple[float, int]:
    """(attnlab's gate fraction, the T-GATE code's gate step) for the same gate: ceil(gate * steps)
    == gate_step (a half step below it, so rounding cannot move the ceiling)."""
    g = max(1, math.ceil(TGATE_GATE * steps))
    return (g - 0.5) / steps, g


def variants(parts: dict, a, kw: dict) -> dict[str, Callable[[], torch.Tensor]]:
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline, StableDiffusionSAGPipeline

    pipe = pipeline(StableDiffusionPipeline, parts)
    pag_pipe = pipeline(StableDiffusionPAGPipeline, parts, pag_applied_layers=["mid"])
    sag_pipe = pipeline(StableDiffusionSAGPipeline, parts)
    tgate_pipe = pipeline(StableDiffusionPipeline, parts)  # the peer's loader adds a method to it
    gate, gate_step = tgate_fraction(a.steps)
    r = a.tome_ratio

    def idle():  # controls on every attention layer, their window empty
        return [HeatMaps(start=1.0, end=1.0), TokenMerging(ratio=r, max_downsample=None, start=1.0, end=1.0)]

    return {
        "bare": lambda: pipe(**kw).images,
        "empty scope": hosted(pipe, kw, list),
        "idle controls": hosted(pipe, kw, idle),
        "tome": hosted(pipe, kw, lambda: [TokenMerging(ratio=r, max_downsample=1, rand=False)]),
        "tomesd": lambda: run_tomesd(pipe, kw, r),
        "tgate": hosted(pipe, kw, lambda: [TGate(gate=gate, **TGATE)]),
        "tgate package": lambda: run_tgate(tgate_pipe, kw, gate_step),
        "pag": hosted(pipe, kw, lambda: [PAG(scale=PAG_SCALE, layers="mid_block")]),
        "pag pipeline": lambda: pag_pipe(**kw, pag_scale=PAG_SCALE).images,
        "sag": hosted(pipe, kw, lambda: [SAG(scale=SAG_SCALE)]),
        "sag pipeline": lambda: sag_pipe(**kw, sag_scale=SAG_SCALE).images,
        "heat maps": hosted(pipe, kw, lambda: [HeatMaps()]),
        "daam capture": lambda: MapCapture(pipe.unet)(pipe, kw),
    }


@dataclass
class Row:
    """One line of the table: an attnlab variant against its peer, and the goal it is held to."""

    control: str
    ours: str
    peer: str
    peer_label: str
    goal: str
    equal: bool  # whether the two outputs should agree
    check: Callable[[dict], bool] = field(repr=False)


def rows(a) -> list[Row]:
    gate, gate_step = tgate_fraction(a.steps)
    r = a.tome_ratio
    return [
        Row("no control: empty scope", "empty scope", "bare", "bare pipeline", "overhead < 2%, equal",
            True, lambda m: m["ratio"] < 1.02 and m["equal"]),
        Row("no control: idle controls on every layer", "idle controls", "bare", "bare pipeline",
            "overhead < 2%, equal", True, lambda m: m["ratio"] < 1.02 and m["equal"]),
        Row(f"ToMe r={r} (max_downsample=1, fixed dst)", "tome", "tomesd", f"tomesd r={r}, use_rand=False",
            "speed-up >= peer's", True, lambda m: m["speedup"] >= m["peer_speedup"]),
        Row(f"T-GATE gate {gate_step}/{a.steps}", "tgate", "tgate package", f"tgate 1.0.0 gate_step={gate_step}",
            "speed-up >= peer's, equal", True, lambda m: m["speedup"] >= m["peer_speedup"] and m["equal"]),
        Row(f"PAG s={PAG_SCALE} (mid block)", "pag", "pag pipeline", "StableDiffusionPAGPipeline",
            "time <= 1.05x peer's", True, lambda m: m["ratio"] <= 1.05),
        Row(f"SAG s={SAG_SCALE}", "sag", "sag pipeline", "StableDiffusionSAGPipeline",
            "time <= 1.05x peer's", True, lambda m: m["ratio"] <= 1.05),
        Row("heat maps (every cross-attention)", "heat maps", "daam capture", "DAAM-style capture",
            "<= 1.3x bare time, <= 1.2x bare peak memory", True,
            lambda m: m["speedup"] >= 1 / 1.3 and m["mem_vs_bare"] <= 1.2),
    ]  # fmt: skip


# Measuring


def release_memory(device: str) -> None:
    """Give freed memory back (glibc's malloc_trim; CUDA's cache), so each call starts alike."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above what was held when it started (bytes, in `.peak`)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.start = self.top = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.top = max(self.top, self.proc.memory_info().rss)
            self.stop.wait(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.top, self.proc.memory_info().rss) - self.start


def timed(fn, device: str) -> tuple[torch.Tensor, float, float]:
    """(output, wall seconds, process CPU seconds) of one call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = fn()
    sync()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(todo: dict, a) -> dict:
    """Warm-up pass (outputs and peak memory), then `a.rounds` timed rounds in rotating order."""
    res = {k: {"wall": [], "cpu": []} for k in todo}
    timed(todo["bare"], a.device)  # one-time initialisation outside every measurement
    for name, fn in todo.items():
        release_memory(a.device)
        with PeakMemory(a.device) as mem:
            out, w, c = timed(fn, a.device)
        res[name].update(out=out.float().cpu(), peak=mem.peak, warm_wall=w)
        print(f"warm-up {name}: {w:.2f}s, peak +{mem.peak / 2**20:.0f} MiB", flush=True)
    names = list(todo)
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            _, w, c = timed(todo[name], a.device)
            res[name]["wall"].append(w)
            res[name]["cpu"].append(c)
        print(f"round {r}: " + ", ".join(f"{k} {res[k]['wall'][-1]:.2f}s" for k in names), flush=True)
    return res


def paired(num: list[float], den: list[float]) -> tuple[float, float]:
    """Median of the per-round ratios num/den and half their range."""
    ratios = [n / d for n, d in zip(num, den)]
    return statistics.median(ratios), (max(ratios) - min(ratios)) / 2


def spread(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (max(xs) - min(xs)) / 2


# Results


def summarise(row: Row, res: dict, a) -> dict:
    ours, peer, bare = res[row.ours], res[row.peer], res["bare"]
    key = a.clock if ours[a.clock] else "warm_wall"
    seq = (lambda r: r[key]) if key != "warm_wall" else (lambda r: [r["warm_wall"]])
    diff = (ours["out"] - peer["out"]).abs().max().item()
    scale = peer["out"].abs().max().item() or 1.0
    tol = (1e-2 if a.dtype == torch.float16 else 1e-4) * scale
    m = {
        "control": row.control, "peer": row.peer_label, "goal": row.goal,
        "ours_s": spread(seq(ours)), "peer_s": spread(seq(peer)),
        "ratio": paired(seq(ours), seq(peer))[0], "ratio_spread": paired(seq(ours), seq(peer))[1],
        "speedup": paired(seq(bare), seq(ours))[0], "peer_speedup": paired(seq(bare), seq(peer))[0],
        "cpu_ratio": paired(ours["cpu"], peer["cpu"])[0] if ours["cpu"] else None,
        "max_abs_diff": diff, "out_scale": scale, "equal": diff <= tol, "should_equal": row.equal,
        "peak_mib": ours["peak"] / 2**20, "peer_peak_mib": peer["peak"] / 2**20,
        "bare_peak_mib": bare["peak"] / 2**20,
        "mem_vs_bare": ours["peak"] / max(bare["peak"], 1), "wall": ours["wall"], "peer_wall": peer["wall"],
        "cpu": ours["cpu"], "peer_cpu": peer["cpu"],
    }  # fmt: skip
    m["met"] = bool(row.check(m))
    return m


def table(results: list[dict]) -> str:
    keys = [
        "control",
        "peer",
        "attnlab s",
        "peer s",
        "ratio",
        "ratio (CPU s)",
        "speed-up vs bare (attnlab / peer)",
    ]
    keys += ["peak MiB (attnlab / peer / bare)", "max abs diff", "goal", "met?"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for m in results:
        cells = [m["control"], m["peer"], _pm(m["ours_s"]), _pm(m["peer_s"])]
        cells += [f"{m['ratio']:.3f} ± {m['ratio_spread']:.3f}", _f(m["cpu_ratio"], "{:.3f}")]
        cells += [f"{m['speedup']:.2f}x / {m['peer_speedup']:.2f}x"]
        cells += [f"{m['peak_mib']:.0f} / {m['peer_peak_mib']:.0f} / {m['bare_peak_mib']:.0f}"]
        eq = "equal" if m["equal"] else "differ"
        cells += [f"{m['max_abs_diff']:.2e} ({eq})", m["goal"], "yes" if m["met"] else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(v: tuple[float, float]) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def main(argv=None) -> None:
    from diffusers.utils import logging as diffusers_logging

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()  # the safety-checker and deprecation notices, once per pipeline
    parts = components(a.quick)
    for v in parts.values():
        if isinstance(v, torch.nn.Module):
            v.to(a.device, a.dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, a.size // 8, a.size // 8, generator=g).to(a.device, a.dtype)
    kw = {
        "prompt": PROMPT, "num_inference_steps": a.steps, "guidance_scale": GUIDANCE, "latents": latents,
        "output_type": "latent", "height": a.size, "width": a.size,
    }  # fmt: skip
    table_rows = [r for r in rows(a) if not a.only or r.ours in a.only or r.control in a.only]
    all_variants = variants(parts, a, kw)
    keep = {"bare"} | {r.ours for r in table_rows} | {r.peer for r in table_rows}
    todo = {k: v for k, v in all_variants.items() if k in keep}
    res = measure(todo, a)
    results = [summarise(r, res, a) for r in table_rows]
    setup = {
        "unet": "tiny (--quick)" if a.quick else "Stable Diffusion 1.5 (random weights)",
        "device": a.device, "dtype": str(a.dtype).removeprefix("torch."), "size_px": a.size,
        "latents": a.size // 8, "steps": a.steps, "rounds": a.rounds, "batch": 1, "guidance": GUIDANCE,
        "threads": a.threads, "clock": a.clock, "torch": torch.__version__, "diffusers": _version("diffusers"),
        "tomesd": _version("tomesd"), "tgate": _version("tgate"), "load_average": os.getloadavg(),
    }  # fmt: skip
    md = f"setup: {setup}\n\n{table(results)}\n"
    print(md)
    if a.out:
        out = Path(a.out)
        write_json(out / "diffusers_controls.json", {"setup": setup, "results": results})
        write_text(out / "diffusers_controls.md", md)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
