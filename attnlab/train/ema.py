"""Exponential moving average of the weights (Polyak averaging), with the decay warm-up of
`min(decay, (1 + n) / (10 + n))` so short runs are not dominated by the random init."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """A float copy of a model's parameters and buffers, updated after each optimiser step.

    Args:
        model: the (unwrapped) model to average.
        decay: the target decay; 0 keeps a plain copy of the latest weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        w = 1 - self.decay_at(step)
        floats, targets = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                floats.append(self.shadow[k])
                targets.append(v.detach())
            else:
                self.shadow[k].copy_(v)
        torch._foreach_lerp_(floats, targets, w)  # shadow += w * (param - shadow)

    def to(self, device: torch.device | str) -> EMA:
        """Keep the average where the model is (after accelerate moved it to a GPU, say)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
