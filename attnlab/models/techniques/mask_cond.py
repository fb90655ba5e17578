"""Mask conditioning for inpainting: the model gets the known data and the mask of the region to
generate (`Condition.inpaint`), as the extra input channels of Stable Diffusion's inpainting U-Net
(Rombach et al. 2022, arXiv:2112.10752) and, in a DiT, as mask tokens: each patch token carries an
embedding of its known pixels and of how much of it is masked (the mask token of MAE, He et al. 2022,
arXiv:2111.06377), so self-attention can tell context tokens from tokens to fill in.

Where masks come from: training draws a random box (a span for audio) per sample from any dataset
(`random_regions`); at sampling the user gives the region, e.g. an object's mask from the `shapes`
ground truth (`object_region`). A missing `inpaint` means nothing is known, so the model also samples
without a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.errors import ConfigError
from attnlab.techniques import register

# Regions


def random_regions(
    batch: int, spatial: tuple[int, ...], generator: torch.Generator, low: float = 0.25, high: float = 0.75
) -> Tensor:
    """One random box per sample, each side a uniform fraction in [low, high] of the axis.

    Returns:
        (B, 1, *spatial) float, 1 inside the box (to generate), 0 outside (known).
    """
    region = torch.zeros(batch, 1, *spatial)
    for b in range(batch):
        box = []
        for n in spatial:
            side = max(1, round(n * (low + (high - low) * torch.rand((), generator=generator).item())))
            start = int(torch.randint(0, n - side + 1, (), generator=generator))
            box.append(slice(start, start + side))
        region[(b, 0, *box)] = 1.0
    return region


def object_region(masks: Tensor, which: int, grow: int = 1) -> Tensor:
    """The region covering object `which` of a `shapes` item's ground truth, grown by `grow` pixels.

    Args:
        masks: (n_obj, H, W) bool, the item's 'masks'.
        which: the object's index.
        grow: pixels added around the object (its anti-aliased edge belongs to it).
    Returns:
        (1, H, W) float region.
    """
    if not 0 <= which < masks.shape[0]:
        raise ConfigError(f"mask_cond: object {which} is not among the item's {masks.shape[0]} objects")
    m = masks[which].float()[None, None]  # (1, 1, H, W)
    if grow > 0:
        m = torch.nn.functional.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    return m[0]


def inpaint_input(x0: Tensor, region: Tensor) -> Tensor:
    """(B, C + 1, *spatial): the data with the region zeroed, then the region (1 = to generate)."""
    region = region.to(x0)
    return torch.cat([x0 * (1 - region), region], dim=1)


def with_inpaint(cond: Condition | None, x0: Tensor, region: Tensor) -> Condition:
    """`cond` (or no condition) plus the inpainting input of data x0 and its region."""
    return (cond or Condition()).replace(inpaint=inpaint_input(x0, region))


def composite(x: Tensor, x0: Tensor, region: Tensor) -> Tensor:
    """Samples x inside the region, the known data x0 outside it."""
    region = region.to(x)
    return region * x + (1 - region) * x0


# The input layer


class MaskInput(nn.Module):
    """Known data + region -> a feature map added to the backbone's first map (zero at init, so a
    fresh mask-conditioned model computes exactly what the same weights compute without it).

    Args:
        layer: a convolution from C + 1 channels to the stem's channels with the stem's stride.
    """

    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        self.layer = layer
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)

    def forward(self, cond: Condition | None, x_map: Tensor) -> Tensor:
        """cond.inpaint as the stem sees it; x_map: the data as a (B, C, H, W) map (H = 1 for audio)."""
        inpaint = cond.inpaint if cond is not None else None
        if inpaint is None:  # nothing known: zero data, all to generate
            b, c = x_map.shape[:2]
            inpaint = torch.cat(
                [x_map.new_zeros(b, c, *x_map.shape[2:]), x_map.new_ones(b, 1, *x_map.shape[2:])], 1
            )
        elif inpaint.dim() == x_map.dim() - 1:  # audio (B, C + 1, T) -> (B, C + 1, 1, T)
            inpaint = inpaint.unsqueeze(2)
        if inpaint.shape[2:] != x_map.shape[2:] or inpaint.shape[1] != x_map.shape[1] + 1:
            raise ConfigError(
                f"mask_cond: inpaint input of shape {tuple(inpaint.shape)} does not fit data of shape "
                f"{tuple(x_map.shape)}; expected (B, C + 1, *spatial)"
            )
        return self.layer(inpaint.to(x_map).contiguous(memory_format=torch.channels_last))


@register(
    "mask_cond",
    level=1,
    paper="SD inpainting input channels (Rombach et al., 2022, arXiv:2112.10752); mask tokens (MAE, He et al., 2022, arXiv:2111.06377)",
    training_free=False,
    provides=("input_layer", "training_condition"),
    summary=(
        "inpainting: the known data and the region to fill enter the stem (U-Net) or every patch "
        "token (DiT), so attention tells context from holes; one small convolution"
    ),
    modality_notes={
        "points": "inpaints a box of pixels or a span of samples; a point cloud has no grid to mask",
        "tokens": "inpaints a region of pixels or samples; on tokens the samplers keep given tokens themselves (x_T)",
    },
)
@dataclass
class MaskConditioning:
    """Mask conditioning. Training draws a random box per sample (sides `low`..`high` of each axis).

    Args:
        low, high: the range of a training box's side, as fractions of the axis.
    """

    low: float = 0.25
    high: float = 0.75

    def __post_init__(self):
        if not 0 < self.low <= self.high <= 1:
            raise ConfigError(
                f"model.techniques.mask_cond: need 0 < low <= high <= 1, got low={self.low}, high={self.high}"
            )

    def training_condition(self, x0: Tensor, cond: Condition | None, generator: torch.Generator) -> Condition:
        """The batch's condition with a random region to inpaint per sample."""
        region = random_regions(x0.shape[0], tuple(x0.shape[2:]), generator, self.low, self.high)
        return with_inpaint(cond, x0, region.to(x0.device))

    def input_layer(self, in_channels: int, out_channels: int, conv) -> MaskInput:
        """The zero-initialised layer for a stem `conv(cin, cout)` (same kernel and stride)."""
        return MaskInput(conv(in_channels + 1, out_channels))
