"""The reference language model of the generative perplexity (as MDLM and SEDD report it, with a
small causal transformer in place of GPT-2): trained on the text set's third split, neither the
training nor the eval split, and saved as safetensors with a JSON config.

For the built-in scenes set attnlab ships one (`weights/scenes_lm.*`, trained by
`scripts/train_reference_lm.py`); a run whose tokenizer has the shipped tokenizer's vocabulary uses
it, re-indexed to the run's token ids. Other text trains its own per run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnlab.data.tokenizer import TextTokenizer
from attnlab.errors import CheckpointError
from attnlab.io import write_atomic, write_json

STEM = "reference_lm"
WEIGHTS, CONFIG = f"{STEM}.safetensors", f"{STEM}.json"
SHIPPED = Path(__file__).parent / "weights"
SCENES_LM = "scenes_lm"  # scenes_lm.safetensors, scenes_lm.json, scenes_lm.tokenizer.json in SHIPPED


@dataclass
class LMConfig:
    vocab_size: int
    length: int  # text tokens; the model reads [BOS] + tokens and predicts tokens + [PAD]
    width: int = 64
    depth: int = 2
    heads: int = 4
    dropout: float = 0.0  # training only


class ReferenceLM(nn.Module):
    """A causal transformer LM (GPT-style, torch's encoder layers under a causal mask)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.length + 1, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        """(B, N) ids -> (B, N, V) next-token logits."""
        n = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        return self.out(self.blocks(self.embed(ids) + self.pos[:, :n], mask=causal, is_causal=True))


# Likelihood


def lm_targets(ids: Tensor, bos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs [BOS] x_1..x_L, targets x_1..x_L [PAD], and a weight on each target up to and including
    the first [PAD] (the end of the text), so padding counts once, as an end-of-text token."""
    b = ids.shape[0]
    inp = torch.cat([torch.full((b, 1), bos_id, dtype=ids.dtype, device=ids.device), ids], 1)
    tgt = torch.cat([ids, torch.full((b, 1), pad_id, dtype=ids.dtype, device=ids.device)], 1)
    is_pad = tgt == pad_id
    after_end = (is_pad.cumsum(1) - is_pad.long()) > 0  # positions past the first pad
    return inp, tgt, (~after_end).float()


def nll_per_sequence(lm: ReferenceLM, ids: Tensor, bos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(B,) summed negative log-likelihood of each sequence and (B,) its counted tokens."""
    inp, tgt, w = lm_targets(ids, bos_id, pad_id)
    nll = F.cross_entropy(lm(inp).transpose(1, 2), tgt, reduction="none")  # (B, L + 1)
    return (nll * w).sum(1), w.sum(1)


@torch.no_grad()
def perplexity(lm: ReferenceLM, ids: Tensor, bos_id: int, pad_id: int, batch: int = 256) -> float:
    """exp(total NLL / total tokens) of the sequences under the reference LM."""
    lm.eval()
    tot, count = 0.0, 0.0
    for i in range(0, ids.shape[0], batch):
        nll, n = nll_per_sequence(lm, ids[i : i + batch], bos_id, pad_id)
        tot, count = tot + nll.sum().item(), count + n.sum().item()
    return math.exp(tot / max(count, 1.0))


# Training


def train_reference_lm(
    ids: Tensor,
    vocab_size: int,
    bos_id: int,
    pad_id: int,
    steps: int = 600,
    seed: int = 0,
    batch: int = 64,
    *,
    width: int = 64,
    dropout: float = 0.0,
    holdout: Tensor | None = None,
    check_every: int = 25,
) -> ReferenceLM:
    """Fit the reference LM to (N, L) token ids (the ref split) with AdamW.

    Args:
        holdout: (M, L) ids of texts left out of `ids`; when given, the weights returned are those
            with the lowest perplexity on them, checked every `check_every` steps (early stopping:
            a few hundred distinct descriptions are memorised within a few hundred steps).
    Returns:
        The LM in eval mode; with `holdout`, its `best_step` attribute is the step it was kept at.
    """
    torch.manual_seed(seed)
    lm = ReferenceLM(LMConfig(vocab_size, ids.shape[1], width=width, dropout=dropout))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    best, best_ppl = None, math.inf
    lm.train()
    for step in range(1, steps + 1):
        rows = ids[torch.randint(0, ids.shape[0], (batch,), generator=g)]
        nll, n = nll_per_sequence(lm, rows, bos_id, pad_id)
        loss = nll.sum() / n.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if holdout is not None and (step % check_every == 0 or step == steps):
            ppl = perplexity(lm, holdout, bos_id, pad_id)
            if ppl < best_ppl:
                best, best_ppl = (step, copy.deepcopy(lm.state_dict())), ppl
            lm.train()
    if best is not None:
        lm.load_state_dict(best[1])
        lm.best_step = best[0]
    return lm.eval()


# Files


def save_lm(lm: ReferenceLM, folder: str | Path, info: dict | None = None, stem: str = STEM) -> Path:
    """`stem`.safetensors and `stem`.json (the LMConfig, plus `info`: where the LM came from)."""
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    write_atomic(folder / f"{stem}.safetensors", lambda p: save_file(state, str(p)))
    write_json(folder / f"{stem}.json", {**asdict(lm.cfg), **({"info": info} if info else {})})
    return folder


def lm_info(folder: str | Path, stem: str = STEM) -> dict:
    """The `info` a saved LM's JSON holds ({} for one saved without it)."""
    return json.loads((Path(folder) / f"{stem}.json").read_text()).get("info", {})


def load_lm(folder: str | Path, stem: str = STEM) -> ReferenceLM:
    """Raises CheckpointError naming the missing or mismatched file."""
    folder = Path(folder)
    weights, config = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    for path in (weights, config):
        if not path.is_file():
            raise CheckpointError(f"reference LM: {path} not found")
    raw = json.loads(config.read_text())
    lm = ReferenceLM(LMConfig(**{f.name: raw[f.name] for f in fields(LMConfig) if f.name in raw}))
    try:
        lm.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise CheckpointError(f"reference LM: {weights} does not match {config.name}: {e}") from None
    return lm.eval()


# The shipped LM of the scenes set


def vocab_of(tok: TextTokenizer) -> list[str]:
    """The tokenizer's tokens in id order."""
    v = tok.tok.get_vocab()
    return sorted(v, key=v.get)


def vocab_sha256(vocab: list[str]) -> str:
    """The identity of a vocabulary: the SHA-256 of its tokens in id order, as JSON."""
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def load_scenes_lm() -> tuple[ReferenceLM, TextTokenizer, dict]:
    """The shipped scenes LM, its tokenizer and its info.

    Raises:
        CheckpointError: a file missing, or the tokenizer not the one the LM was trained with.
    """
    lm = load_lm(SHIPPED, SCENES_LM)
    tok_file = SHIPPED / f"{SCENES_LM}.tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"reference LM: {tok_file} not found")
    tok = TextTokenizer.load(tok_file, lm.cfg.length)
    info = lm_info(SHIPPED, SCENES_LM)
    if vocab_sha256(vocab_of(tok)) != info.get("vocab_sha256"):
        raise CheckpointError(
            f"{SHIPPED / SCENES_LM}.tokenizer.json is not the tokenizer of {SCENES_LM}.json"
        )
    return lm, tok, info


def scenes_lm_for(tok: TextTokenizer) -> tuple[ReferenceLM | None, str]:
    """The shipped scenes LM re-indexed to `tok`'s ids when `tok` holds exactly its vocabulary (the
    same words, in any id order; the order follows word counts, so it varies with a run's size and
    seed) and its sequences fit the LM; else None and why not."""
    try:
        lm, shipped, _ = load_scenes_lm()
    except CheckpointError as e:
        return None, f"the shipped scenes LM is not usable ({e})"
    mine, theirs = vocab_of(tok), vocab_of(shipped)
    if type(tok.tok.model).__name__ != "WordLevel" or set(mine) != set(theirs):
        extra, missing = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        return (
            None,
            f"the run's vocabulary is not the shipped LM's (extra {extra[:5]}, missing {missing[:5]})",
        )
    if tok.length > lm.cfg.length:
        return (
            None,
            f"the run's sequences ({tok.length} tokens) are longer than the shipped LM's ({lm.cfg.length})",
        )
    return reindexed(lm, [theirs.index(w) for w in mine]), "shipped"


@torch.no_grad()
def reindexed(lm: ReferenceLM, perm: list[int]) -> ReferenceLM:
    """The LM over ids permuted so that new id i is old id perm[i] (its embedding and output rows
    moved; every likelihood is the same)."""
    out = copy.deepcopy(lm)
    out.embed.weight.copy_(lm.embed.weight[perm])
    out.out.weight.copy_(lm.out.weight[perm])
    out.out.bias.copy_(lm.out.bias[perm])
    return out.eval()
