"""Heat maps of generated tokens on condition tokens (DAAM-style aggregation, Tang et al. 2023,
arXiv:2210.04885, on a token backbone): the attention each sequence position pays to each
condition token, averaged over heads, layers and sampling steps, from cross-attention or, with an
in-context condition, from the block of self-attention whose queries are the sequence and whose
keys are the condition tokens (after the pooled condition token that leads them)."""

from __future__ import annotations

from torch import Tensor

from attnlab.attention import AttnCall, Control


class TokenMaps(Control):
    """Records (B, N, Lc) maps on the loop's conditional rows; `mean()` is their average."""

    def __init__(self):
        self.sum: Tensor | None = None
        self.count = 0
        self.source = ""

    def active(self, call: AttnCall) -> bool:
        return "cond" in call.roles and call.kind in ("self", "cross")

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        rows = p[call.chunk(p, "cond")]  # (B, heads, N + extra, K)
        n = call.grid[0]
        if call.kind == "cross":
            m, source = rows[:, :, :n], "cross-attention"
        elif rows.shape[-1] > n + 1:  # in-context: [sequence, pooled condition, condition tokens]
            m, source = rows[:, :, :n, n + 1 :], "the condition block of self-attention (in-context)"
        else:
            return p
        m = m.mean(1).float()  # (B, N, Lc)
        if self.sum is None or self.sum.shape != m.shape:
            self.sum, self.count = m.clone(), 1
        else:
            self.sum, self.count = self.sum + m, self.count + 1
        self.source = source
        return p

    def mean(self) -> Tensor | None:
        return None if self.sum is None else self.sum / self.count
