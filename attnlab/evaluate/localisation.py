"""Heat-map localisation: does a word's attention map cover its object? IoU of the thresholded map
with the object's ground-truth mask, and the pointing game (Zhang et al., 2016: is the map's
maximum inside the mask?), as DAAM (Tang et al., 2023) scores its maps. On point clouds the map
is per point and the mask is the object's points (a real cloud's per-point object ids)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError


def heatmap_localisation(maps: Tensor, masks: Tensor, threshold: float = 0.4) -> dict:
    """Score attention heat maps against ground-truth masks.

    Args:
        maps: (N, h, w) non-negative heat maps (any resolution; resized bilinearly to the masks'),
            or (N, P) per-point maps of clouds of P points.
        masks: (N, H, W) bool ground-truth masks of the objects the maps are for, or (N, P): which
            of the P points belong to the object.
        threshold: a pixel (point) is "on" where its min-max normalised map exceeds this (DAAM's 0.4).

    Returns:
        {"iou": mean IoU, "pointing": share of maps whose maximum lies inside the mask, "n"}.
    """
    images = maps.dim() == masks.dim() == 3
    points = maps.dim() == masks.dim() == 2 and maps.shape == masks.shape
    if not (images or points) or len(maps) != len(masks):
        raise ConfigError(
            f"heat maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W), "
            "or both (N, P) per point"
        )
    if images:
        maps = F.interpolate(
            maps[:, None].float(), size=masks.shape[1:], mode="bilinear", align_corners=False
        )[:, 0]
    flat = maps.float().flatten(1)  # (N, H*W) or (N, P)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    on, truth = (flat - lo) / (hi - lo).clamp(min=1e-12) > threshold, masks.flatten(1).bool()
    iou = (on & truth).sum(1) / (on | truth).sum(1).clamp(min=1)
    pointing = truth.gather(1, flat.argmax(1, keepdim=True))[:, 0]
    return {"iou": float(iou.mean()), "pointing": float(pointing.float().mean()), "n": len(maps)}


@torch.no_grad()
def word_localisation(
    model: nn.Module,
    encoder,
    images: Tensor,
    prompts: Sequence[str],
    targets: Sequence[Sequence[tuple[str, str, Tensor]]],
    scheduler,
    steps: int = 25,
    threshold: float = 0.4,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, dict]:
    """Heat-map IoU of words with their objects' masks on real images (or point clouds), so the
    masks are exact: generated samples carry no ground truth.

    Each image is noised to the sampler's timesteps (one fixed noise per image) and denoised once per
    timestep under its caption while cross-attention is recorded (DAAM's maps, `HeatMaps`: each
    layer's and head's map summed over timesteps, upsampled, clamped at zero, averaged; the
    coarsest maps left out). A word's map is min-max normalised and thresholded as in
    `heatmap_localisation`. Point clouds go the same way, DAAM-style on a real cloud: each is
    noised to the timesteps, denoised once per timestep, and its per-point maps (each step's group
    token maps spread onto the points with that step's grouping) are scored against its points'
    object ids.

    Args:
        model: a text-conditioned denoiser `model(x, t, cond)`.
        encoder: the text encoder the model was trained with (`word_token_indices`, `encode`).
        images: (N, C, H, W) images in [-1, 1], or (N, 3, P) point clouds.
        prompts: N captions.
        targets: per image, (word class, word, (H, W) bool mask of the object the word names);
            per cloud, (word class, word, (P,) bool: the points of the object), `points_word_targets`.
        scheduler: a diffusers scheduler; its `set_timesteps(steps)` gives the timesteps.
        steps, threshold, seed, batch_size: timesteps, DAAM threshold, noise seed, images per call.

    Returns:
        Per word class: {"iou", "pointing", "n", "area_iou" (IoU of an all-ones map: the object's
        share of the image, what a map that says nothing scores) and, where images hold another
        object, "other_iou" (the same map against that other object's mask)}.
    """
    from attnlab.attention import control
    from attnlab.conditioning import Condition
    from attnlab.control import HeatMaps, normalise
    from attnlab.diffusion import add_noise

    if not (len(images) == len(prompts) == len(targets)):
        raise ConfigError(f"got {len(images)} images, {len(prompts)} prompts and {len(targets)} target lists")
    scheduler.set_timesteps(steps)
    ab = scheduler.alphas_cumprod
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    maps, masks, others, classes = [], [], [], []
    for i in range(0, len(images), batch_size):
        x0, eps = images[i : i + batch_size], noise[i : i + batch_size]
        rows = list(prompts[i : i + batch_size])
        tokens, mask = encoder.encode(rows)
        cond = Condition(tokens=tokens, mask=mask).to(device)
        hm = HeatMaps()
        with control(model, hm):
            for t in scheduler.timesteps:
                tb = t.expand(len(rows))
                model(add_noise(x0, eps, ab[tb]).to(device), tb.to(device), cond)
        heat = hm.maps(images.shape[2:]).cpu()  # (B, L, H, W) or (B, L, P)
        for r, row_targets in enumerate(targets[i : i + batch_size]):
            for cls, word, m in row_targets:
                idx = encoder.word_token_indices(rows[r], word)
                maps.append(normalise(heat[r : r + 1, idx].mean(1))[0])
                masks.append(m.bool())
                other = [o for _, _, o in row_targets if not torch.equal(o.bool(), m.bool())]
                others.append(other[0].bool() if other else None)
                classes.append(cls)
    out = {}
    for cls in dict.fromkeys(classes):
        pick = [k for k, c in enumerate(classes) if c == cls]
        mk = torch.stack([masks[k] for k in pick])
        scores = heatmap_localisation(torch.stack([maps[k] for k in pick]), mk, threshold)
        area = mk.flatten(1).float().mean(1)  # IoU(all ones, mask) = |mask| / |image| (or cloud)
        out[cls] = {**scores, "area_iou": float(area.mean())}
        two = [k for k in pick if others[k] is not None]  # images with another object
        if two:
            stack = torch.stack([maps[k] for k in two])
            out[cls]["other_iou"] = heatmap_localisation(
                stack, torch.stack([others[k] for k in two]), threshold
            )["iou"]
    return out


def shapes_word_targets(item: dict) -> list[tuple[str, str, Tensor]]:
    """The colour and shape word of each object in a `shapes` item, with that object's mask."""
    return [
        (cls, obj[cls], mask)
        for obj, mask in zip(item["objects"], item["masks"])
        for cls in ("color", "shape")
    ]


def points_word_targets(item: dict) -> list[tuple[str, str, Tensor]]:
    """The shape word of each solid in a `points` item, with the points of the solids it names (both
    solids where the caption names one shape twice: the word's tokens are every occurrence)."""
    ids, shapes = item["point_objects"], [obj["shape"] for obj in item["objects"]]
    return [
        ("shape", shape, torch.isin(ids, torch.tensor([i for i, s in enumerate(shapes) if s == shape])))
        for shape in dict.fromkeys(shapes)
    ]
