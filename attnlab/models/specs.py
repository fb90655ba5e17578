"""Typed specs of the attention blocks a backbone is assembled from, and where a block sits.

A backbone never reads the config to decide what a block contains; it asks the model plan
(`attnlab.models.plan`), which starts from the base spec and lets each technique edit it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from attnlab.attention.core import AttnKernel

Modulation = Literal["none", "adaln_zero"]


@dataclass(frozen=True)
class AttnSpec:
    """One transformer block over tokens: its sub-layers and how the conditioning vector enters.

    Attributes:
        heads: attention heads.
        self_attn: a self-attention sub-layer (named "self").
        cross_attn: a cross-attention sub-layer to the condition tokens (named "cross").
        mlp_ratio: MLP hidden width over token width; 0 means no MLP sub-layer.
        modulation: "none": pre-norm sub-layers with learned affine norms, output projections
            zero-initialised (ADM); the timestep enters elsewhere. "adaln_zero": shift, scale and
            gate of every sub-layer regressed from the conditioning vector, zero at init (DiT).
        mixer: the self-attention kernel (linear, windowed); None is softmax over all tokens (SDPA).
        channel_attn: factory (dim, heads) -> module of a channel-attention sub-layer (named "chan",
            after self-attention); None: no such sub-layer.
        time_gate: factory (emb_dim, dim, sub-layer names) -> module mapping the conditioning vector
            to a gate per attention sub-layer, which scales its residual; None: no gate.
        rotary: factory (dim, heads) -> the self-attention's rotary position module (RoPE); None: none.
    """

    heads: int
    self_attn: bool = True
    cross_attn: bool = False
    mlp_ratio: float = 0.0
    modulation: Modulation = "none"
    mixer: AttnKernel | None = None
    channel_attn: Callable[[int, int], nn.Module] | None = None
    time_gate: Callable[[int, int, tuple[str, ...]], nn.Module] | None = None
    rotary: Callable[[int, int], nn.Module] | None = None

    def sublayers(self) -> tuple[str, ...]:
        """Sub-layer names in the order they run."""
        on = {
            "self": self.self_attn,
            "chan": self.channel_attn is not None,
            "cross": self.cross_attn,
            "mlp": self.mlp_ratio > 0,
        }
        return tuple(n for n, o in on.items() if o)


@dataclass(frozen=True)
class Where:
    """Where a block sits, for techniques that change some blocks only.

    Attributes:
        side: U-Net "down", "mid" or "up"; DiT "block".
        size: U-Net feature size of the block (H, or T for audio); None in a DiT.
        index: DiT block index (0-based); None in a U-Net.
    """

    side: Literal["down", "mid", "up", "block"]
    size: int | None = None
    index: int | None = None
