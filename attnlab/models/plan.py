"""A model config's architectural techniques, resolved once into the hook points the backbones read.

`resolve(cfg)` builds each technique of `model.techniques` from its options, refuses one its
declaration does not allow on this backbone or data, runs its checks against the model, and returns
a `ModelPlan`. The U-Net and the DiT ask the plan for a block's attention spec, a residual block
class, a skip gate, positions, an input layer and so on; they never see a technique's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.errors import ConfigError
from attnlab.models.blocks import ResBlock
from attnlab.models.config import ModelConfig
from attnlab.models.embeddings import sincos_pos_embed
from attnlab.models.specs import AttnSpec, Where
from attnlab.techniques.registry import (
    SINGLE_SLOT,
    Technique,
    fits,
    get,
    modality_names,
    refusal_note,
    techniques,
)


@dataclass
class ModelPlan:
    """The built techniques of one model config, in config order, and the hook points they fill.

    Attributes:
        cfg: the model config.
        built: registry name -> (its declaration, its options object).
    """

    cfg: ModelConfig
    built: dict[str, tuple[Technique, Any]] = field(default_factory=dict)

    def providers(self, hook: str) -> list[Any]:
        """The options objects of the techniques that provide `hook`, in config order."""
        return [obj for tech, obj in self.built.values() if tech.offers(hook)]

    def one(self, hook: str) -> Any | None:
        found = self.providers(hook)
        return found[0] if found else None

    # Attention blocks

    def edit(self, spec: AttnSpec, where: Where) -> AttnSpec:
        """The spec after every technique's `edit_spec`, in config order."""
        for tech in self.providers("edit_spec"):
            spec = tech.edit_spec(spec, where)
        return spec

    def unet_attn_spec(self, size: int | None, side: str | None = None) -> AttnSpec | None:
        """The attention block of a U-Net block, or None.

        Args:
            size: the block's feature size; None is the middle block.
            side: "down" or "up" (None: "down", or "mid" when size is None).
        """
        cfg = self.cfg
        side = side or ("mid" if size is None else "down")
        on = cfg.mid_attention if side == "mid" else size in cfg.attn_resolutions
        if not on:
            return None
        spec = AttnSpec(heads=cfg.heads, cross_attn=cfg.cond == "text", mlp_ratio=cfg.block_mlp_ratio())
        spec = self.edit(spec, Where(side, cfg.feature_sizes()[-1] if side == "mid" else size))
        return spec if spec.sublayers() else None

    def dit_block_specs(self) -> list[AttnSpec]:
        """One spec per DiT block, in order."""
        cfg = self.cfg
        spec = AttnSpec(
            heads=cfg.heads,
            cross_attn=cfg.cond == "text",
            mlp_ratio=cfg.block_mlp_ratio(),
            modulation="adaln_zero",
        )
        return [self.edit(spec, Where("block", index=i)) for i in range(cfg.depth)]

    # U-Net hook points

    def res_block(self) -> type[ResBlock]:
        tech = self.one("res_block")
        return ResBlock if tech is None else tech.res_block()

    def skip_gate(self, size: int, skip_channels: int, gate_channels: int) -> nn.Module | None:
        tech = self.one("skip_gate")
        return None if tech is None else tech.skip_gate(self.cfg, size, skip_channels, gate_channels)

    def cross_scale(self, size: int, dim: int) -> nn.Module | None:
        tech = self.one("cross_scale")
        return None if tech is None else tech.cross_scale(self.cfg, size, dim)

    @property
    def reads_encoder(self) -> bool:
        """Whether an up block reads encoder maps of other sizes (the forward then keeps them)."""
        return bool(self.providers("cross_scale"))

    def unet_positions(self, grid: tuple[int, ...], dim: int) -> nn.Module | None:
        tech = self.one("unet_positions")
        return None if tech is None else tech.unet_positions(grid, dim)

    # DiT hook points

    def dit_positions(self, grid: tuple[int, ...], dim: int) -> Tensor | None:
        """The (1, N, dim) table added to the patch tokens: DiT's fixed sin-cos unless a technique sets it."""
        tech = self.one("dit_positions")
        return sincos_pos_embed(grid, dim)[None] if tech is None else tech.dit_positions(grid, dim)

    def time_input(self, dim: int) -> nn.Module | None:
        tech = self.one("time_input")
        return None if tech is None else tech.time_input(dim)

    def condition_tokens(self) -> Any | None:
        """The technique that turns the condition into tokens of the sequence (in-context), or None."""
        return self.one("condition_tokens")

    def run_blocks(self, depth: int, dim: int) -> nn.Module | None:
        tech = self.one("run_blocks")
        return None if tech is None else tech.run_blocks(depth, dim)

    # Both backbones

    def input_layer(self, in_channels: int, out_channels: int, conv: Callable) -> nn.Module | None:
        tech = self.one("input_layer")
        return None if tech is None else tech.input_layer(in_channels, out_channels, conv)

    def training_condition(self, x0: Tensor, cond: Condition | None, generator) -> Condition | None:
        """The training batch's condition with what the techniques add from the clean data."""
        for tech in self.providers("training_condition"):
            cond = tech.training_condition(x0, cond, generator)
        return cond

    def attach(self, model: nn.Module) -> None:
        """Install the bus controls the model carries for its whole life (e.g. token merging)."""
        for tech in self.providers("attach"):
            tech.attach(model)


def resolve(cfg: ModelConfig) -> ModelPlan:
    """Build and check the config's architectural techniques.

    Raises:
        ConfigError: a technique that is unknown, not architectural, not for this backbone or data, with
            bad options, whose checks against the model fail, or two that fill one single slot.
    """
    plan = ModelPlan(cfg)
    for name, options in cfg.techniques.items():
        tech = _architectural(name, cfg)
        try:
            plan.built[name] = (tech, tech.build(**dict(options or {})))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.techniques.{name}: {e}") from None
    for tech in plan.providers("check"):
        tech.check(cfg)  # options that depend on the model (feature sizes, block indices, cond)
    for hook in SINGLE_SLOT:
        names = [n for n, (t, _) in plan.built.items() if t.offers(hook)]
        if len(names) > 1:
            raise ConfigError(
                f"model.techniques: {' and '.join(names)} both set the model's {hook}; keep one"
            )
    return plan


def _architectural(name: str, cfg: ModelConfig) -> Technique:
    """The declaration of `name` if a model of this backbone and data can be built with it."""
    try:
        tech = get(name)
    except KeyError:
        tech = None
    if tech is None or not tech.architectural or not fits(tech, cfg.backbone):
        known = [t.name for t in techniques() if t.architectural and fits(t, cfg.backbone)]
        raise ConfigError(
            f"model.techniques.{name} is not an architectural technique of the {cfg.backbone} backbone; "
            f"available: {', '.join(known) or 'none'}{refusal_note(tech, cfg.modality)}"
        )
    if cfg.modality not in tech.modalities:
        raise ConfigError(
            f"model.techniques.{name} works on {modality_names(tech.modalities)} data, "
            f"not {modality_names((cfg.modality,))}{refusal_note(tech, cfg.modality)}"
        )
    return tech
