"""Heat-map localisation: does a word's attention map cover its object? IoU of the thresholded map
with the object's ground-truth mask, and the pointing game (Zhang et al., 2016: is the map's
maximum inside the mask?), as DAAM (Tang et al., 2023) scores its maps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError


def heatmap_localisation(maps: Tensor, masks: Tensor, threshold: float = 0.4) -> dict:
    """Score attention heat maps against ground-truth masks.

    Args:
        maps: (N, h, w) non-negative heat maps (any resolution; resized bilinearly to the masks').
        masks: (N, H, W) bool ground-truth masks of the objects the maps are for.
        threshold: a pixel is "on" where its min-max normalised map exceeds this (DAAM's 0.4).

    Returns:
        {"iou": mean IoU, "pointing": share of maps whose maximum lies inside the mask, "n"}.
    """
    if maps.dim() != 3 or masks.dim() != 3 or len(maps) != len(masks):
        raise ConfigError(
            f"heat maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)"
        )
    maps = F.interpolate(maps[:, None].float(), size=masks.shape[1:], mode="bilinear", align_corners=False)[
        :, 0
    ]
    flat = maps.flatten(1)  # (N, H*W)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    on, truth = (flat - lo) / (hi - lo).clamp(min=1e-12) > threshold, masks.flatten(1).bool()
    iou = (on & truth).sum(1) / (on | truth).sum(1).clamp(min=1)
    pointing = truth.gather(1, flat.argmax(1, keepdim=True))[:, 0]
    return {"iou": float(iou.mean()), "pointing": float(pointing.float().mean()), "n": len(maps)}
