"""Heat-map localisation and Attend-and-Excite on a text model trained on shapes.

    attnlab train benchmarks/configs/shapes32-text-2obj.yaml --out runs/shapes32-2obj  # or shapes64-text-2obj
    .venv/bin/python benchmarks/heatmap_iou.py --run runs/shapes32-2obj --num 128 --excite 48

1. Real eval images, exact masks: each image is noised to the sampling timesteps (one fixed noise
   per image) and denoised once per timestep under its caption with the heat-map recorder on, so
   image and masks are the dataset's. A word's map (DAAM: summed over steps, each layer and head upsampled and clamped, then averaged)
   is min-max normalised and thresholded at tau (DAAM's 0.4); its IoU with the mask of the object
   the word names is reported per word class (colour words, shape words), beside the IoU with the
   other object's mask (two-object images) and the IoU of an all-ones map (the object's area).
2. Generated samples: each caption is sampled with the recorder on; an object's mask is the pixels
   close to its palette colour (an oracle this procedural data allows); IoU as above, over the
   objects that appear.
3. Attend-and-Excite: two-object captions sampled with and without it (on the two shape words);
   "both appear" by the dataset's evaluator when there is one, and by the palette oracle (each
   requested colour covers at least `--min-area` of the image).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from attnlab.attention import control
from attnlab.conditioning import Condition, get_text_encoder
from attnlab.control import AttendExcite, HeatMaps, normalise
from attnlab.data import build_dataset
from attnlab.data.shapes import PALETTE
from attnlab.diffusion import sample, scheduler_for
from attnlab.evaluate import shapes_word_targets, word_localisation
from attnlab.io import write_json, write_text
from attnlab.train.checkpoint import load_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--num", type=int, default=128, help="eval images / captions for the IoU parts")
    p.add_argument("--excite", type=int, default=48, help="two-object captions for Attend-and-Excite")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale (3 breaks these small models)")
    p.add_argument("--tau", type=float, default=0.4, help="heat-map threshold (DAAM)")
    p.add_argument("--min-area", type=float, default=0.02, help="palette oracle: least colour coverage")
    p.add_argument("--excite-step", type=float, default=20.0, help="Attend-and-Excite step size")
    p.add_argument("--excite-refine", type=int, default=5, help="Attend-and-Excite refinement iterations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", help="results directory (default: RUN/bench)")
    return p.parse_args()


# Masks and IoU


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else float("nan")


def palette_mask(x: torch.Tensor, color: str, tol: float = 0.3) -> torch.Tensor:
    """Pixels of image x (3, H, W) in [-1, 1] within `tol` (max over RGB) of a palette colour."""
    rgb = torch.tensor(PALETTE[color]).view(3, 1, 1)
    return ((x + 1) / 2 - rgb).abs().amax(0) < tol


def word_maps(hm: HeatMaps, encoder, prompts, words_per_row, size):
    """Per row: {word: (H, W) min-max normalised map}."""
    maps = hm.maps(size)  # (B, L, H, W)
    out = []
    for r, (p, words) in enumerate(zip(prompts, words_per_row)):
        out.append(
            {w: normalise(maps[r : r + 1, encoder.word_token_indices(p, w)].mean(1))[0] for w in words}
        )
    return out


def object_words(objects) -> list[tuple[str, str]]:
    return [(o["color"], o["shape"]) for o in objects]


class Tally:
    """IoUs per word class: with the named object, the other object, and an all-ones map."""

    def __init__(self):
        self.v = {f"{c}/{k}": [] for c in ("color", "shape") for k in ("own", "other", "all_ones")}

    def add(self, heat: dict, words: list[tuple[str, str]], masks: list[torch.Tensor | None], tau: float):
        for k, (wc, ws) in enumerate(words):
            if masks[k] is None:
                continue
            for cls, w in (("color", wc), ("shape", ws)):
                m = heat[w] > tau
                self.v[f"{cls}/own"].append(iou(m, masks[k]))
                self.v[f"{cls}/all_ones"].append(iou(torch.ones_like(m), masks[k]))
                others = [masks[j] for j in range(len(words)) if j != k and masks[j] is not None]
                if others:
                    self.v[f"{cls}/other"].append(iou(m, others[0]))

    def summary(self) -> dict:
        return {k: {"mean_iou": sum(v) / len(v) if v else None, "n": len(v)} for k, v in self.v.items()}


# Parts


def real_images(model, cfg, encoder, items, a) -> dict:
    """Part 1 through `attnlab.evaluate.word_localisation`, in the table's terms."""
    scores = word_localisation(
        model,
        encoder,
        torch.stack([it["x"] for it in items]),
        [it["text"] for it in items],
        [shapes_word_targets(it) for it in items],
        scheduler_for(cfg, "ddim"),
        steps=a.steps,
        threshold=a.tau,
        batch_size=a.batch,
    )
    out = {}
    for cls, s in scores.items():
        out[f"{cls}/own"] = {"mean_iou": s["iou"], "n": s["n"], "pointing": s["pointing"]}
        out[f"{cls}/other"] = {"mean_iou": s.get("other_iou"), "n": None}
        out[f"{cls}/all_ones"] = {"mean_iou": s["area_iou"], "n": s["n"]}
    return out


def generated(model, cfg, encoder, items, a) -> dict:
    tally = Tally()
    shape = cfg.model.sample_shape()
    for i in range(0, len(items), a.batch):
        chunk = items[i : i + a.batch]
        prompts = [it["text"] for it in chunk]
        tokens, mask = encoder.encode(prompts)
        hm = HeatMaps()
        with control(model, hm):
            x = sample_batch(
                model, cfg, Condition(tokens=tokens, mask=mask), list(range(i, i + len(chunk))), a
            )
        words = [object_words(it["objects"]) for it in chunk]
        heat = word_maps(hm, encoder, prompts, [[w for pair in ws for w in pair] for ws in words], shape[1:])
        for h, ws, xi in zip(heat, words, x):
            masks = [palette_mask(xi, c) for c, _ in ws]
            present = [m if m.float().mean() >= a.min_area else None for m in masks]
            tally.add(h, ws, present, a.tau)
    return tally.summary()


def sample_batch(model, cfg, cond, seeds, a, guidances=()):
    scheduler = scheduler_for(cfg, "ddim")
    shape = cfg.model.sample_shape(len(seeds))
    x = sample(
        model,
        shape,
        cond,
        scheduler=scheduler,
        steps=a.steps,
        guidance=a.guidance,
        seeds=seeds,
        guidances=guidances,
    )
    return x.clamp(-1, 1)


def both_appear(x: torch.Tensor, objects, min_area: float) -> bool:
    return all(palette_mask(x, o["color"]).float().mean() >= min_area for o in objects)


def excite(model, cfg, encoder, items, a) -> dict:
    """Both objects present, without and with Attend-and-Excite on the two shape words."""
    out = {}
    for name, use in (("without", False), ("with", True)):
        xs, seconds = [], 0.0
        for i in range(0, len(items), a.batch):
            chunk = items[i : i + a.batch]
            prompts = [it["text"] for it in chunk]
            tokens, mask = encoder.encode(prompts)
            guidances = []
            if use:
                ae = AttendExcite(step_size=a.excite_step, max_refine=a.excite_refine)
                idx = [
                    [j for o in it["objects"] for j in encoder.word_token_indices(p, o["shape"])]
                    for p, it in zip(prompts, chunk)
                ]
                spans = [(1, int(m.sum()) - 1) for m in mask]  # between [CLS] and [SEP]
                guidances = [ae.bind(idx, spans)]
            t0 = time.perf_counter()
            xs.append(
                sample_batch(
                    model,
                    cfg,
                    Condition(tokens=tokens, mask=mask),
                    list(range(i, i + len(chunk))),
                    a,
                    guidances,
                )
            )
            seconds += time.perf_counter() - t0
        x = torch.cat(xs)
        res = {
            "both_appear_palette": sum(both_appear(xi, it["objects"], a.min_area) for xi, it in zip(x, items))
            / len(items),
            "seconds_per_sample": seconds / len(items),
        }
        res.update(evaluator_alignment(cfg.data.name, x, items))
        out[name] = res
    return out


def evaluator_alignment(name: str, x: torch.Tensor, items: list[dict]) -> dict:
    """The evaluator's alignment scores, and the share of samples in which it finds every requested
    (shape, colour) pair; {"evaluator": why} when the dataset has no evaluator here."""
    try:
        from attnlab.evaluate import Evaluator, alignment

        ev = Evaluator.load(name)
    except Exception as e:  # no shipped evaluator: the palette oracle stands alone
        return {"evaluator": f"unavailable ({type(e).__name__}: {e})"}
    found = [{(o["shape"], o["color"]) for o in p["objects"]} for p in ev.predict(x)]
    asked = [{(o["shape"], o["color"]) for o in it["objects"]} for it in items]
    scores = alignment(name, x, [it["text"] for it in items])
    out = {f"evaluator_{k}": float(v) for k, v in scores.items() if k != "n"}
    out["both_appear_evaluator"] = sum(q <= f for q, f in zip(asked, found)) / len(items)
    return out


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    model, cfg = load_model(a.run, ema=not a.no_ema)
    encoder = get_text_encoder()
    data = build_dataset(cfg.data, "eval")
    items = [data[i] for i in range(min(a.num, len(data)))]
    pairs = [data[i] for i in range(len(data)) if len(data[i]["objects"]) == 2][: a.excite]
    results = {"setup": {**{k: v for k, v in vars(a).items()}, "load_average": os.getloadavg()}}
    results["real_images"] = real_images(model, cfg, encoder, items, a)
    print("real images:", results["real_images"], flush=True)
    results["generated"] = generated(model, cfg, encoder, items, a)
    print("generated:", results["generated"], flush=True)
    if pairs:
        results["attend_and_excite"] = excite(model, cfg, encoder, pairs, a)
        print("attend-and-excite:", results["attend_and_excite"], flush=True)
    out = Path(a.out or Path(a.run) / "bench")
    write_json(out / "heatmap_iou.json", results)
    write_text(out / "heatmap_iou.md", report(results))
    print(report(results))


def report(r: dict) -> str:
    lines = [
        "| images | word class | IoU own object | IoU other object | IoU all-ones map | n |",
        "|---|---|---|---|---|---|",
    ]
    for part in ("real_images", "generated"):
        for cls in ("color", "shape"):
            s = r[part]
            cells = [_f(s[f"{cls}/{k}"]["mean_iou"]) for k in ("own", "other", "all_ones")]
            lines.append(f"| {part} | {cls} words | " + " | ".join(cells) + f" | {s[f'{cls}/own']['n']} |")
    if "attend_and_excite" in r:
        head = (
            "| Attend-and-Excite | both appear (evaluator) | both appear (palette) | all_correct | s/sample |"
        )
        lines += ["", head, "|---|---|---|---|---|"]
        for k, v in r["attend_and_excite"].items():
            cells = [v.get("both_appear_evaluator"), v["both_appear_palette"], v.get("evaluator_all_correct")]
            lines.append(
                f"| {k} | " + " | ".join(_f(c) for c in cells) + f" | {_f(v['seconds_per_sample'])} |"
            )
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
