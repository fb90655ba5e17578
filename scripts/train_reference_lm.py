"""Train the reference language model attnlab ships for the built-in scenes text set and write it to
attnlab/evaluate/weights/scenes_lm.safetensors + scenes_lm.json (its config, what it was trained on,
the vocabulary's SHA-256 and its perplexities) + scenes_lm.tokenizer.json (the tokenizer whose ids it reads).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_reference_lm.py          # about 10 s on one core
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_reference_lm.py --check  # no training: the shipped one's perplexities

It is trained on the ref split of the default scenes config (the third split: no description of it is in
any run's train or eval split, since a description's split is a hash of its text), stopping early on a
held-out tenth of the ref split's distinct descriptions. Everything is seeded and it runs on one thread:
a rerun on the same machine and library versions writes the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

import attnlab
from attnlab.evaluate.text_lm import (
    SCENES_LM,
    SHIPPED,
    load_scenes_lm,
    perplexity,
    save_lm,
    train_reference_lm,
    vocab_of,
    vocab_sha256,
)
from attnlab.train.text import TextDataConfig, build_token_data

STEPS, CHECK_EVERY, WIDTH, DROPOUT, SEED = 600, 25, 32, 0.3, 0


def shuffled(texts: list[str], seed: int = 0) -> list[str]:
    """Each text with its words in a random order (the same words, no grammar)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.permutation(t.split())) for t in texts]


def perplexities(lm, data, held_out_rows) -> dict[str, float]:
    tok = data.tokenizer
    ppl = lambda ids: round(perplexity(lm, ids, tok.bos_id, tok.pad_id), 4)  # noqa: E731
    out = {s: ppl(data.ids[s]) for s in ("eval", "ref", "train")}
    out["ref_held_out"] = ppl(data.ids["ref"][held_out_rows])
    out["eval_shuffled_words"] = ppl(tok.encode(shuffled(data.splits["eval"].texts)))
    return out


def held_out(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the ref split to fit on and the rows of every tenth distinct description (sorted)."""
    keep = set(sorted(set(texts))[::10])
    rows = torch.tensor([t in keep for t in texts])
    return (~rows).nonzero().flatten(), rows.nonzero().flatten()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=SHIPPED, help="directory for scenes_lm.*")
    parser.add_argument(
        "--check", action="store_true", help="no training: the perplexities of the shipped LM"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_cfg = TextDataConfig()  # the default scenes set, word tokenizer
    data = build_token_data(data_cfg)
    tok = data.tokenizer
    fit, hold = held_out(data.splits["ref"].texts)
    if args.check:
        lm, shipped, info = load_scenes_lm()
        assert vocab_of(shipped) == vocab_of(tok), "the default scenes tokenizer is not the shipped one"
        print("shipped:", info["perplexity"], "\nnow:    ", perplexities(lm, data, hold))
        return
    ref = data.ids["ref"]
    lm = train_reference_lm(ref[fit], tok.vocab_size, tok.bos_id, tok.pad_id, STEPS, SEED,
                            width=WIDTH, dropout=DROPOUT, holdout=ref[hold], check_every=CHECK_EVERY)  # fmt: skip
    scenes = dataclasses.asdict(data_cfg.scenes())
    info = {
        "format": "attnlab-reference-lm/1",
        "name": "scenes",
        "trained_on": {
            **scenes,
            "split": "ref",
            "texts": len(fit),
            "distinct": len(set(data.splits["ref"].texts)),
        },
        "early_stopping": f"lowest perplexity on {len(hold)} ref rows (every tenth distinct description), "
        f"checked every {CHECK_EVERY} of {STEPS} steps; kept step {lm.best_step}",
        "seed": SEED,
        "tokenizer": f"{SCENES_LM}.tokenizer.json",
        "vocab_sha256": vocab_sha256(vocab_of(tok)),
        "perplexity": perplexities(lm, data, hold),
        "versions": {"attnlab": attnlab.__version__, "torch": torch.__version__},
        "regenerate": "OMP_NUM_THREADS=1 python scripts/train_reference_lm.py",
    }
    tok.save(args.out / f"{SCENES_LM}.tokenizer.json")
    save_lm(lm, args.out, info, stem=SCENES_LM)
    print(f"wrote {args.out / SCENES_LM}.*: kept step {lm.best_step}; perplexity {info['perplexity']}")


if __name__ == "__main__":
    main()
