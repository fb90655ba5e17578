"""The tiny token backbone the text tests build (vocabulary V, length L), optionally with its
weights perturbed off their zero init so that outputs depend on the input."""

from __future__ import annotations

import torch

from attnlab.models import ModelConfig, build_model


def tiny_tokens(vocab: int, length: int, *, context_dim: int = 6, cond: str = "text", techniques=None,
                seed: int = 0, noise: float = 0.0, **kw):  # fmt: skip
    """A 2-block, width-32 `tokens` backbone over `vocab` tokens of `length`, seeded; `noise`: the
    std of a perturbation added to every parameter (0: the init as built)."""
    cfg = ModelConfig(backbone="tokens", dims=1, in_channels=vocab, size=length, width=32, depth=2, heads=2,
                      cond=cond, context_dim=context_dim, techniques=techniques or {}, **kw)  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg)
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    return model
