"""The reference language model of the generative perplexity (as MDLM and SEDD report it, with a
small causal transformer in place of GPT-2): trained on the text set's third split, neither the
training nor the eval split, and saved as safetensors with a JSON config."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnlab.errors import CheckpointError
from attnlab.io import write_atomic, write_json

WEIGHTS, CONFIG = "reference_lm.safetensors", "reference_lm.json"


@dataclass
class LMConfig:
    vocab_size: int
    length: int  # text tokens; the model reads [BOS] + tokens and predicts tokens + [PAD]
    width: int = 64
    depth: int = 2
    heads: int = 4


class ReferenceLM(nn.Module):
    """A causal transformer LM (GPT-style, torch's encoder layers under a causal mask)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.length + 1, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        """(B, N) ids -> (B, N, V) next-token logits."""
        n = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        return self.out(self.blocks(self.embed(ids) + self.pos[:, :n], mask=causal, is_causal=True))


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


def train_reference_lm(
    ids: Tensor, vocab_size: int, bos_id: int, pad_id: int, steps: int = 600, seed: int = 0, batch: int = 64
) -> ReferenceLM:
    """Fit the reference LM to (N, L) token ids (the ref split) with AdamW."""
    torch.manual_seed(seed)
    lm = ReferenceLM(LMConfig(vocab_size, ids.shape[1]))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    lm.train()
    for _ in range(steps):
        rows = ids[torch.randint(0, ids.shape[0], (batch,), generator=g)]
        nll, n = nll_per_sequence(lm, rows, bos_id, pad_id)
        loss = nll.sum() / n.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return lm.eval()


def save_lm(lm: ReferenceLM, folder: str | Path) -> Path:
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda p: save_file(state, str(p)))
    write_json(folder / CONFIG, asdict(lm.cfg))
    return folder


def load_lm(folder: str | Path) -> ReferenceLM:
    """Raises CheckpointError naming the missing or mismatched file."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"reference LM: {folder / name} not found")
    lm = ReferenceLM(LMConfig(**json.loads((folder / CONFIG).read_text())))
    try:
        lm.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as e:
        raise CheckpointError(f"reference LM: {folder / WEIGHTS} does not match {CONFIG}: {e}") from None
    return lm.eval()
