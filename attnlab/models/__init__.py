"""Models: the native backbones (U-Net, DiT) assembled from shared blocks and the one Attention module."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.models.config import PRESETS, ModelConfig, preset
from attnlab.models.diffusers_backbone import DiffusersBackbone
from attnlab.models.dit import DiT
from attnlab.models.plan import ModelPlan, resolve
from attnlab.models.points import PointTransformer
from attnlab.models.specs import AttnSpec
from attnlab.models.tokens import TokenTransformer
from attnlab.models.unet import UNet

BACKBONE_CLASSES: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "dit": DiT,
    "diffusers": DiffusersBackbone,
    "points": PointTransformer,
    "tokens": TokenTransformer,
}


def build_model(cfg: ModelConfig | Mapping) -> nn.Module:
    """Build the denoiser a config describes.

    Args:
        cfg: a ModelConfig, or a plain mapping of its fields (as read from JSON or YAML).
    Returns:
        An nn.Module with `forward(x, t, cond=None)` returning a tensor shaped like x, its config in
        `.config`, and every Attention layer named by its module path.
    """
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(dict(cfg))
    plan = resolve(cfg)
    model = BACKBONE_CLASSES[cfg.backbone](cfg, plan)
    plan.attach(model)  # techniques that act through the attention bus (tome) stay on
    model.plan = plan
    return model


def training_condition(
    cfg: ModelConfig | ModelPlan, x0: Tensor, cond: Condition | None, generator
) -> Condition | None:
    """The training batch's condition with what the config's techniques add from the clean data
    (mask_cond: a random region to inpaint per sample); unchanged for every other model.

    Args:
        cfg: the model config, or its resolved plan (resolved once, as the trainer does).
    """
    plan = cfg if isinstance(cfg, ModelPlan) else resolve(cfg)
    return plan.training_condition(x0, cond, generator)


__all__ = [
    "PRESETS",
    "AttnSpec",
    "DiT",
    "ModelConfig",
    "ModelPlan",
    "UNet",
    "build_model",
    "preset",
    "resolve",
    "training_condition",
]
