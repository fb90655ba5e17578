"""Sampling-time controls on a trained model: speed-up and quality change of T-GATE (classifier-free
guidance kept after the gate, and dropped as the T-GATE code does), attention caching, token
merging (when registered), PAG and SAG, against the uncontrolled sampler with the same seeds.

    attnlab train benchmarks/configs/shapes32-text-2obj.yaml --out runs/shapes32-2obj  # or shapes64-text-2obj
    .venv/bin/python benchmarks/sampling_controls.py --run runs/shapes32-2obj --num 64 --rounds 3

Prompts are the captions of the run's eval split; sample k uses seed k in every variant. Speed:
`--rounds` rounds, each sampling one batch per variant in rotating order, so load from other
processes hits all of them alike; the median wall-clock and process CPU time per sample are
reported (CPU time moves much less with other processes' load). Quality: RMSE to the
uncontrolled samples (pixel units of [-1, 1]) and, when the dataset's evaluator is available,
evaluator-feature FID against the eval images and the share of samples whose every requested
attribute is right (`all_correct`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from attnlab.attention import attention_layers
from attnlab.conditioning import Condition, get_text_encoder
from attnlab.control.plan import sampling_plan
from attnlab.data import build_dataset
from attnlab.diffusion import sample, scheduler_for
from attnlab.errors import AttnlabError
from attnlab.io import write_json, write_text
from attnlab.techniques import REGISTRY, techniques
from attnlab.train.checkpoint import load_model

GATE = 0.4  # T-GATE's own setting: gate step 10 of 25


def variants() -> dict[str, dict]:
    out = {
        "baseline": {},
        f"T-GATE g={GATE} (as T-GATE code: CFG dropped, self-attention cached)": {"tgate": {"gate": GATE}},
        # variants, reported apart: CFG kept after the gate, no self-attention cache (sp_interval=1)
        f"T-GATE g={GATE}, CFG kept (own cache per chunk)": {
            "tgate": {"gate": GATE, "average": False, "drop_cfg": False, "sp_interval": 1}
        },
        f"T-GATE g={GATE}, CFG kept (averaged cache)": {
            "tgate": {"gate": GATE, "drop_cfg": False, "sp_interval": 1}
        },
        f"T-GATE g={GATE}, CFG dropped, no self-attention cache": {"tgate": {"gate": GATE, "sp_interval": 1}},
        "attention cache k=2": {"attn_cache": {"every": 2}},
        "attention cache k=3": {"attn_cache": {"every": 3}},
        "PAG s=2 (mid block, as diffusers)": {"pag": {"scale": 2.0}},
        "PAG s=2, every self-attention layer": {"pag": {"scale": 2.0, "layers": "**"}},
        "SAG s=0.5 (mid block, uncond branch, as diffusers)": {"sag": {"scale": 0.5}},
        "SAG s=0.5, every layer, cond branch, 7 taps": {
            "sag": {"scale": 0.5, "layers": "**", "branch": "cond", "blur_taps": 7}
        },
    }
    techniques()  # load every provider
    tome = REGISTRY.get("tome")
    if tome is not None and tome.training_free:
        out["token merging (tomesd defaults)"] = {"tome": {}}
        out["token merging, every resolution, fixed destinations"] = {
            "tome": {"rand": False, "max_downsample": None}
        }
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run or checkpoint directory of a text-conditioned model")
    p.add_argument("--num", type=int, default=64, help="samples per variant")
    p.add_argument("--batch", type=int, default=16, help="samples per batch; timing uses one batch")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale (3 breaks these small models)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (one batch per variant each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="variant names to run (baseline always runs)")
    p.add_argument("--out", help="results directory (default: RUN/bench)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights")
    return p.parse_args()


# Sampling one variant


class Counter:
    """Rows that went through the model and through each kind of attention projection."""

    def __init__(self, model):
        self.rows = {"model": 0, "self": 0, "cross": 0}
        self.handles = [model.register_forward_hook(self._hook("model"))]
        for layer in attention_layers(model).values():
            proj = layer.to_kv if layer.kind == "cross" else layer.to_qkv
            self.handles.append(proj.register_forward_hook(self._hook(layer.kind)))
        for m in model.modules():  # a diffusers denoiser's own attention modules: their key projection
            if hasattr(m, "is_cross_attention") and isinstance(getattr(m, "to_k", None), torch.nn.Module):
                kind = "cross" if m.is_cross_attention else "self"
                self.handles.append(m.to_k.register_forward_hook(self._hook(kind)))

    def _hook(self, key):
        def hook(module, inp, out):
            self.rows[key] += inp[0].shape[0]

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def draw(model, cfg, conds, seeds, spec, a) -> tuple[torch.Tensor, float, float]:
    """Samples of one variant, with the wall-clock and the process CPU seconds the sampling took.

    CPU time is what the sampler itself used; on a shared machine it moves much less with other
    processes' load than wall time does, so both are reported.
    """
    plan = sampling_plan(spec)
    out, wall, cpu = [], 0.0, 0.0
    with plan.installed(model):
        for cond, sd in zip(conds, seeds):
            scheduler = scheduler_for(cfg, a.sampler)
            t0, c0 = time.perf_counter(), time.process_time()
            x = sample(
                model, cfg.model.sample_shape(len(sd)), cond, scheduler=scheduler, steps=a.steps,
                guidance=plan.guidance(a.guidance), seeds=sd, guidances=plan.guidances,
            )  # fmt: skip
            wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
            out.append(x.clamp(-1, 1))
    return torch.cat(out), wall, cpu


# Quality


def evaluator_scores(name: str, samples: torch.Tensor, prompts: list[str], real: torch.Tensor) -> dict:
    """FID on evaluator features and alignment, or {} when the dataset has no evaluator here."""
    try:
        from attnlab.evaluate import Evaluator, alignment, fid_kid

        ev = Evaluator.load(name)
    except Exception as e:  # no shipped evaluator: the RMSE proxy stands alone
        return {"evaluator": f"unavailable ({type(e).__name__}: {e})"}
    scores = fid_kid(real, samples, ev.feature_net())
    align = alignment(name, samples, prompts)
    return {"fid": scores["fid"], "kid": scores.get("kid_mean"), "all_correct": align.get("all_correct")}


def table(rows: list[dict]) -> str:
    keys = ["variant", "s/sample", "speed-up", "CPU s/sample", "CPU speed-up", "model rows", "cross rows"]
    keys += ["self rows", "rmse", "fid", "all_correct"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [r["variant"], f"{r['seconds_per_sample']:.3f}", f"{r['speedup']:.2f}x"]
        cells += [f"{r['cpu_seconds_per_sample']:.3f}", f"{r['cpu_speedup']:.2f}x"]
        cells += [f"{r['rows'][k]:.0f}" for k in ("model", "cross", "self")]
        cells += [f"{r['rmse']:.4f}", _fmt(r.get("fid")), _fmt(r.get("all_correct"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    model, cfg = load_model(a.run, ema=not a.no_ema)
    eval_set = build_dataset(cfg.data, "eval")
    prompts = eval_set.texts()[: a.num]
    real = eval_set.tensors()  # the whole eval split: one FID reference for every variant
    tokens, mask = get_text_encoder().encode(prompts)
    chunks = range(0, a.num, a.batch)
    conds = [Condition(tokens=tokens[i : i + a.batch], mask=mask[i : i + a.batch]) for i in chunks]
    seeds = [list(range(i, min(i + a.batch, a.num))) for i in chunks]
    todo = {k: v for k, v in variants().items() if k == "baseline" or not a.only or k in a.only}

    samples, rows = {}, {}
    refused = {}
    for name, spec in todo.items():  # quality: every prompt once
        counter = Counter(model)
        try:
            samples[name] = draw(model, cfg, conds, seeds, spec, a)[0]
        except AttnlabError as e:  # a control this backbone does not take: reported, not run
            refused[name] = str(e)
            print(f"refused {name}: {e}", flush=True)
            continue
        finally:
            counter.remove()
        rows[name] = {k: v / a.num for k, v in counter.rows.items()}
        print(f"drew {name}", flush=True)

    todo = {k: v for k, v in todo.items() if k not in refused}
    wall, cpu = {k: [] for k in todo}, {k: [] for k in todo}
    n_time = len(seeds[0])
    for r in range(a.rounds):  # speed: one batch per variant per round, order rotating
        names = list(todo)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _, w, c = draw(model, cfg, conds[:1], seeds[:1], todo[name], a)
            wall[name].append(w / n_time)
            cpu[name].append(c / n_time)
        print(f"round {r}: " + ", ".join(f"{k} {wall[k][-1]:.2f}s" for k in todo), flush=True)

    base = samples["baseline"]
    w_base, c_base = statistics.median(wall["baseline"]), statistics.median(cpu["baseline"])
    results = []
    for name in todo:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        res = {
            "variant": name, "spec": todo[name], "seconds_per_sample": w, "speedup": w_base / w,
            "cpu_seconds_per_sample": c, "cpu_speedup": c_base / c, "rows": rows[name],
            "rmse": (samples[name] - base).pow(2).mean().sqrt().item(), "wall": wall[name], "cpu": cpu[name],
        }  # fmt: skip
        res.update(evaluator_scores(cfg.data.name, samples[name], prompts, real))
        results.append(res)

    out = Path(a.out or Path(a.run) / "bench")
    setup = {
        "run": a.run, "num": a.num, "steps": a.steps, "sampler": a.sampler, "guidance": a.guidance,
        "threads": a.threads, "rounds": a.rounds, "size": cfg.model.size,
        "load_average": os.getloadavg(),
    }  # fmt: skip
    write_json(out / "sampling_controls.json", {"setup": setup, "results": results, "refused": refused})
    md = f"setup: {setup}\n\n{table(results)}\n"
    if refused:
        md += "\nRefused on this backbone:\n\n" + "".join(f"- {k}: {v}\n" for k, v in refused.items())
    write_text(out / "sampling_controls.md", md)
    print(md)


if __name__ == "__main__":
    main()
