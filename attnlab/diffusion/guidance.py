"""The plug-in interface for extra guidance terms (SAG, PAG, ...) in the one sampling loop."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from attnlab.attention import Control
from attnlab.conditioning import Condition


@runtime_checkable
class Guidance(Protocol):
    """An extra term added to the guided model output at each active sampling step.

    `sample` installs `controls()` on the model for the whole run, and at each step where
    `active(i, steps)` holds adds `correction(...)` to the (CFG-combined) model output. A guidance
    that needs another model call (PAG's perturbed pass) makes it inside `correction`; that call
    sees the bus step with roles ("cond",), since it runs on the cond rows only. A guidance may
    also define `prepare(model, x, t, cond, ctx) -> x`, called at every step before the model call,
    to replace the latent entering the step (Attend-and-Excite, Prompt-to-Prompt's local blend).
    """

    def controls(self) -> list[Control]: ...

    def active(self, i: int, steps: int) -> bool: ...

    def correction(
        self,
        model: nn.Module,
        x_in: Tensor,
        t: Tensor,
        cond: Condition | None,
        out: dict[str, Tensor],
        ctx: dict[str, Any],
    ) -> Tensor:
        """Args:
            model: the denoiser.
            x_in: (B, ...) the model input of this step (cond rows only).
            t: (B,) timesteps.
            cond: the cond rows' condition (None for an unconditional model).
            out: {"cond": model output on cond rows, "uncond": on null rows (only with CFG)}.
            ctx: {"i", "steps", "scheduler", "alpha_bar_t" (B, 1, ..), "prediction_type", "guidance"}.
        Returns:
            A tensor shaped like `x_in`, added to the guided output.
        """
        ...
