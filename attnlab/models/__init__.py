"""Models: the native backbones (U-Net, DiT) assembled from shared blocks and the one Attention module."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.models.config import PRESETS, ModelConfig, preset
from attnlab.models.dit import DiT
from attnlab.models.specs import AttnSpec, built_techniques, check_techniques
from attnlab.models.unet import UNet

BACKBONE_CLASSES: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}


def build_model(cfg: ModelConfig | Mapping) -> nn.Module:
    """Build the denoiser a config describes.

    Args:
        cfg: a ModelConfig, or a plain mapping of its fields (as read from JSON or YAML).
    Returns:
        An nn.Module with `forward(x, t, cond=None)` returning a tensor shaped like x, its config in
        `.config`, and every Attention layer named by its module path.
    """
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(dict(cfg))
    check_techniques(cfg)
    model = BACKBONE_CLASSES[cfg.backbone](cfg)
    for tech in built_techniques(cfg).values():
        if hasattr(tech, "attach"):  # techniques that act through the attention bus (tome) stay on
            tech.attach(model)
    return model


def training_condition(cfg: ModelConfig, x0: Tensor, cond: Condition | None, generator) -> Condition | None:
    """The training batch's condition with what the config's techniques add from the clean data
    (mask_cond: a random region to inpaint per sample); unchanged for every other model."""
    for tech in built_techniques(cfg).values():
        if hasattr(tech, "training_condition"):
            cond = tech.training_condition(x0, cond, generator)
    return cond


__all__ = ["PRESETS", "AttnSpec", "DiT", "ModelConfig", "UNet", "build_model", "preset", "training_condition"]
