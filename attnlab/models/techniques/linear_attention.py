"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv:2006.16236): softmax
replaced by a positive feature map phi, so phi(q) (phi(k)^T v) costs O(N d^2) instead of O(N^2 d)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.models.specs import AttnSpec, Where
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register

FEATURE_MAPS = ("elu", "relu")


def feature_map(x: Tensor, kind: str) -> Tensor:
    """phi(x) >= 0: elu(x) + 1 (Katharopoulos et al.) or relu(x) (as in SANA, Xie et al. 2024)."""
    return F.elu(x) + 1.0 if kind == "elu" else F.relu(x)


@dataclass(frozen=True)
class LinearKernel:
    """The kernel an Attention layer runs: out_i = phi(q_i) S / (phi(q_i) z), S = sum_j phi(k_j)^T v_j,
    z = sum_j phi(k_j) (Katharopoulos et al., eq. 5). Grid-free; `eps` keeps relu rows finite;
    padding keys (key_mask False) get phi = 0, so they add nothing to S or z."""

    feature: str = "elu"
    eps: float = 1e-6

    def keys(self, k: Tensor, key_mask: Tensor | None) -> Tensor:
        k = feature_map(k, self.feature)
        return k if key_mask is None else k * key_mask[:, None, :, None]  # (B, heads, N, d)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], key_mask: Tensor | None = None
    ) -> Tensor:
        q, k = feature_map(q, self.feature), self.keys(k, key_mask)  # (B, heads, N, d)
        kv = k.transpose(-2, -1) @ v  # (B, heads, d, d): the whole key-value summary
        z = k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, heads, d, 1)
        return (q @ kv) / (q @ z + self.eps)  # (B, heads, N, d)

    def probs(self, q: Tensor, k: Tensor, grid: tuple[int, ...], key_mask: Tensor | None = None) -> Tensor:
        """The same attention as an explicit (B, heads, N, N) matrix: phi(q) phi(k)^T, rows normalised."""
        a = feature_map(q, self.feature) @ self.keys(k, key_mask).transpose(-2, -1)
        return a / (a.sum(dim=-1, keepdim=True) + self.eps)


@register(
    "linear_attention",
    level=2,
    paper="Transformers are RNNs (Katharopoulos et al., 2020, arXiv:2006.16236)",
    training_free=False,
    provides=("check", "edit_spec"),
    summary=(
        "self-attention in O(N d^2) with a positive feature map instead of softmax: saves compute "
        "only when tokens outnumber the head width; blurrier attention (no sharp peaks)"
    ),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class LinearAttention:
    """Linear attention in the selected self-attention layers.

    Args:
        feature: the feature map phi: "elu" (elu + 1) or "relu".
        resolutions: U-Net feature sizes that get it (None: every attention resolution).
        blocks: DiT block indices that get it (None: every block).
    """

    feature: Literal["elu", "relu"] = "elu"
    resolutions: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.feature not in FEATURE_MAPS:
            raise ConfigError(
                f"model.techniques.linear_attention.feature={self.feature!r} is not allowed: "
                f"expected one of {', '.join(FEATURE_MAPS)}"
            )
        self.scope = Scope("linear_attention", self.resolutions, self.blocks)

    def check(self, cfg) -> None:
        self.scope.check(cfg)
        if "window_attention" in cfg.techniques:
            raise ConfigError(
                "model.techniques: linear_attention and window_attention both replace the self-attention "
                "kernel; choose one"
            )

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        if not (spec.self_attn and self.scope.contains(where)):
            return spec
        return dataclasses.replace(spec, mixer=LinearKernel(self.feature))
