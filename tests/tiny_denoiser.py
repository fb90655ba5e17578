"""A tiny conditional denoiser for tests of the diffusion loop and the trainer (seconds, not minutes)."""

import torch
from torch import nn

from attnlab.attention import Attention, bus_state, name_layers


class TinyDenoiser(nn.Module):
    """conv -> self-attention -> cross-attention to text tokens (or a class embedding) -> conv.

    Records the bus state of every call in `self.calls` so tests can check what the loop told it.
    """

    def __init__(self, channels=3, width=16, context_dim=8, num_classes=4):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, context_dim)  # last row = null class
        self.attn = Attention(width, heads=2)
        self.cross = Attention(width, heads=2, context_dim=context_dim)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.calls = []
        name_layers(self)

    def forward(self, x, t, cond=None):
        st = bus_state(self)
        self.calls.append((st.step, st.num_steps, st.roles, x.shape[0]))
        b, _, h, w = x.shape
        emb = self.time(t.float().view(-1, 1) / 1000)[:, :, None, None]
        z = torch.nn.functional.silu(self.inp(x) + emb)
        tok = z.flatten(2).transpose(1, 2)  # (B, H*W, width)
        tok = tok + self.attn(tok, grid=(h, w))
        if cond is not None:
            ctx, mask = cond.tokens, cond.mask
            if ctx is None:
                labels = torch.where(cond.labels < 0, self.label.num_embeddings - 1, cond.labels)
                ctx, mask = self.label(labels)[:, None], None  # (B, 1, context_dim)
            tok = tok + self.cross(tok, ctx, mask, grid=(h, w))
        z = tok.transpose(1, 2).reshape(b, -1, h, w)  # (B, width, H, W)
        return self.out(z)
