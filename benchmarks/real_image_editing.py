"""Real-image editing on shapes: invert an eval image, recolour one object, measure the locality.

    attnlab train benchmarks/configs/shapes32-text-2obj.yaml train.steps=6000 train.batch_size=32 train.warmup=100 train.ckpt_every=500 data.num=16384 --out runs/shapes32-2obj-edit
    .venv/bin/python benchmarks/real_image_editing.py --run runs/shapes32-2obj-edit --num 16 --steps 50

The model: the two-object text U-Net of `benchmarks/configs/shapes32-text-2obj.yaml`, trained on
the CPU with the override above (6000 steps of 32 images in bf16: 51 minutes on one thread of a
shared 2-core machine, against the config's 6000 steps of 256 on a GPU); it samples here in fp32.

Per two-object eval image (real pixels, exact per-object masks and attributes from the dataset),
the first or second object (alternating) is recoloured ("a red circle left of a green square" ->
"a blue circle left of a green square", the next palette colour that neither object has) with
Prompt-to-Prompt (replace, local blend on the edited colour word: `--blend`) from the image's
inversion, with NO mask given, for each inversion method (`attnlab.control.inversion`):
- reconstruction: PSNR of the source row (the image sampled back from its inversion, no edit);
- edit success: the shapes evaluator reads the asked colour on that object (the edited caption's
  objects matched to the found ones, as `attnlab.evaluate.alignment` does);
- preservation: PSNR outside that object's mask against the input, and whether the evaluator reads
  the other object's shape and colour as they were;
- time per edit: inversion plus the sampling of source and edit rows, on this machine's CPU.
- the blend region: the share of the image the local blend lets the edit change, and its IoU with
  the edited object's mask (how well the attention localised the edit).
Rows '<method>+mask' give the edited object's exact mask (`edit_image(mask=...)`), reported apart.
The evaluator's reading of the input images themselves is reported as the ceiling it allows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attnlab.cli.flags import technique_options
from attnlab.conditioning import get_text_encoder
from attnlab.control import PromptToPrompt
from attnlab.control.edit import edit_image
from attnlab.control.figures import side_by_side
from attnlab.control.inversion import METHODS, NULL_TOKENS, psnr
from attnlab.data import build_dataset
from attnlab.diffusion import scheduler_for
from attnlab.evaluate.alignment import score_shapes
from attnlab.evaluate.evaluator import Evaluator
from attnlab.evaluate.prompts import parse_request
from attnlab.io import write_json, write_text
from attnlab.train.checkpoint import load_model

BLEND_WORDS = {
    "color": "the edited colour word (the old in the source row, the new in the edit)",
    "shape": "the edited object's shape word",
    "both": "the edited colour word and the object's shape word",
}
GOALS = {"ddpm": 40.0, "null-text": 30.0}  # reconstruction PSNR goals, dB


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--num", type=int, default=32, help="two-object eval images")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale (3 breaks these small models)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--null-tokens", nargs="+", default=["all"], choices=list(NULL_TOKENS),
        help="null-text: the null embedding optimised (each value is a row)",
    )  # fmt: skip
    p.add_argument(
        "--masked", nargs="*", default=["ddpm"], choices=list(METHODS),
        help="methods also run with the edited object's exact mask given (rows '<method>+mask', apart)",
    )  # fmt: skip
    p.add_argument(
        "--blend", choices=["color", "shape", "both"], default="color",
        help="local blend words: the edited colour word (source and edit), the object's shape word, or both",
    )  # fmt: skip
    p.add_argument(
        "--p2p", nargs="*", default=[], metavar="KEY=VALUE",
        help="PromptToPrompt options over the reference defaults (YAML values, e.g. self_end=0.6 self_max_tokens=null)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/real_image_editing-shapes32.md")
    return p.parse_args()


def p2p_options(pairs: list[str]) -> dict:
    """["self_end=0.6", "self_max_tokens=null"] -> {"self_end": 0.6, "self_max_tokens": None}
    (values read as YAML, as `attnlab sample --technique` reads them)."""
    return technique_options(["p2p", *(f"p2p.{pair}" for pair in pairs)])["p2p"]


def edit_caption(item: dict, k: int, colors: list[str]) -> tuple[str, str]:
    """(edited caption, new colour): object k recoloured to the next palette colour no object has."""
    objs = item["objects"]
    taken = {o["color"] for o in objs}
    start = colors.index(objs[k]["color"])
    new = next(
        colors[(start + j) % len(colors)]
        for j in range(1, len(colors))
        if colors[(start + j) % len(colors)] not in taken
    )
    old_part, new_part = f"a {objs[k]['color']} {objs[k]['shape']}", f"a {new} {objs[k]['shape']}"
    text = item["text"]
    at = text.index(old_part) if k == 0 else text.rindex(old_part)
    return text[:at] + new_part + text[at + len(old_part) :], new


def judge(evaluator: Evaluator, x: torch.Tensor, caption: str, k: int) -> dict:
    """Whether the evaluator reads caption's object k's colour, and every other object's shape and colour."""
    hits = score_shapes(parse_request("shapes", caption), evaluator.predict(x[None])[0])
    others = [j for j in range(len(hits["color"])) if j != k]
    return {
        "edited": bool(hits["color"][k] and hits["shape"][k]),
        "others": all(hits["color"][j] and hits["shape"][j] for j in others),
    }


def run_method(
    method, items, model, cfg, encoder, evaluator, args, null_tokens="all", masked=False
) -> tuple[dict, list]:
    rows, figures = [], []
    for n, item in enumerate(items):
        k = n % 2
        caption, new = edit_caption(item, k, list(cfg.data.colors))
        obj = item["objects"][k]
        words = {
            "shape": (obj["shape"],),
            "color": (obj["color"], new),
            "both": (obj["shape"], obj["color"], new),
        }
        p2p = PromptToPrompt(mode="replace", blend=words[args.blend], **p2p_options(args.p2p))
        start = time.perf_counter()
        r = edit_image(
            model, encoder, item["x"], item["text"], [caption], p2p, method=method,
            scheduler=scheduler_for(cfg, "ddim"), steps=args.steps, guidance=args.guidance, seed=n,
            null_tokens=null_tokens, mask=item["masks"][k][None].float() if masked else None,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        outside = ~item["masks"][k][None]
        region = p2p.blend_region(tuple(item["x"].shape[1:]))[0, 0]  # (*S): where the edit row may change
        verdict = judge(evaluator, r.edits[0], caption, k)
        rows.append(
            {
                "recon_psnr": r.psnr,
                "success": verdict["edited"],
                "others_kept": verdict["others"],
                "outside_psnr": psnr(r.edits[0], item["x"], outside),
                "blend_area": float(region.mean()),
                "blend_iou": float(
                    (region.bool() & item["masks"][k]).sum() / (region.bool() | item["masks"][k]).sum()
                ),
                "seconds": seconds,
                "inversion_seconds": r.seconds["inversion"],
            }
        )
        if n < 4:
            figures.append((item["x"], r.reconstruction, r.edits[0], caption))
    return summarise(rows), figures


def summarise(rows: list[dict]) -> dict:
    mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)  # noqa: E731
    ok = [r["outside_psnr"] for r in rows if r["success"]]
    return {
        "n": len(rows),
        "recon_psnr": mean("recon_psnr"),
        "recon_psnr_min": min(r["recon_psnr"] for r in rows),
        "success": mean("success"),
        "outside_psnr": mean("outside_psnr"),
        "outside_psnr_successful": sum(ok) / len(ok) if ok else float("nan"),
        "others_kept": mean("others_kept"),
        "blend_area": mean("blend_area"),
        "blend_iou": mean("blend_iou"),
        "seconds": mean("seconds"),
        "inversion_seconds": mean("inversion_seconds"),
    }


def table(results: dict, ceiling: float, args) -> str:
    head = (
        "| inversion | reconstruction PSNR (mean / min, dB) | edit success | PSNR outside the object (dB) "
        "| other object kept | blend region (share of image / IoU with the object) | s per edit (inversion) |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {m} | {s['recon_psnr']:.1f} / {s['recon_psnr_min']:.1f} | {s['success']:.2f} | "
        f"{s['outside_psnr']:.1f} | {s['others_kept']:.2f} | {s['blend_area']:.2f} / {s['blend_iou']:.2f} | {s['seconds']:.2f} ({s['inversion_seconds']:.2f}) |"
        for m, s in results.items()
    ]
    options = f" (options: {', '.join(args.p2p)})" if args.p2p else ""
    note = (
        f"\n{results[next(iter(results))]['n']} two-object eval images of shapes (32 px), {args.steps} DDIM "
        f"steps, guidance {args.guidance}, Prompt-to-Prompt replace with a local blend on "
        f"{BLEND_WORDS[args.blend]}{options}, no mask given (rows '+mask': the edited object's exact "
        f"mask given, reported apart). The evaluator reads both objects of the "
        f"input images right in {ceiling:.2f} of them (the ceiling for 'other object kept').\n"
    )
    return head + "\n".join(lines) + "\n" + note


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.run)
    encoder, evaluator = get_text_encoder(), Evaluator.load("shapes")
    data = build_dataset(cfg.data, "eval")
    items = [it for it in (data[i] for i in range(4 * args.num)) if len(it["objects"]) == 2][: args.num]
    ceiling = sum(
        judge(evaluator, it["x"], it["text"], 0)["others"]
        and judge(evaluator, it["x"], it["text"], 1)["others"]
        for it in items
    ) / len(items)
    results, out = {}, Path(args.out)
    runs = [
        (m, nt, m if m != "null-text" or len(args.null_tokens) == 1 else f"{m}-{nt}", False)
        for m in args.methods
        for nt in (args.null_tokens if m == "null-text" else ["all"])
    ] + [(m, "all", f"{m}+mask", True) for m in args.masked]
    for method, null_tokens, name, masked in runs:
        results[name], figures = run_method(
            method, items, model, cfg, encoder, evaluator, args, null_tokens, masked
        )  # fmt: skip
        print(name, results[name], flush=True)
        images = [x for row in figures for x in row[:3]]
        titles = [t for row in figures for t in ("input", "reconstruction", row[3])]
        side_by_side(out.with_name(f"{out.stem}-{name}.png"), images, titles)
    write_text(out, f"# Real-image editing on shapes (32 px)\n\n{table(results, ceiling, args)}")
    write_json(
        out.with_suffix(".json"), {"args": vars(args), "evaluator_ceiling": ceiling, "results": results}
    )
    print(table(results, ceiling, args))


if __name__ == "__main__":
    main()
