"""Sample quality: FID (Heusel et al., 2017) and KID (Binkowski et al., 2018) through torchmetrics.

Both compare feature statistics of real and generated samples. The feature network is any module
mapping a batch to (N, D) features: attnlab's evaluator for the dataset (its penultimate layer) or
the FID Inception-v3 loaded from a local file. Samples are float tensors in [-1, 1], fed to the
feature network as they are, so the same call works for images and audio. Features are extracted
once and handed to torchmetrics through a pass-through module, so real-set features can be cached
and reused across variants (`fid_kid_from_features`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from attnlab.errors import ConfigError


class _Precomputed(nn.Module):
    """Tells torchmetrics the feature width; its inputs already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: Tensor) -> Tensor:
        return feats


@torch.no_grad()
def extract_features(samples: Tensor, feature: nn.Module, batch_size: int = 256) -> Tensor:
    """(N, C, *spatial) samples in [-1, 1] -> (N, D) float64 features of `feature` in eval mode."""
    was_training = feature.training
    feature.eval()
    feats = [feature(samples[i : i + batch_size]).double() for i in range(0, len(samples), batch_size)]
    feature.train(was_training)
    return torch.cat(feats)


def _check_features(real: Tensor, fake: Tensor) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(
            f"features must be (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if min(len(real), len(fake)) < 2:
        raise ConfigError(
            f"FID/KID need at least 2 samples per set, got {len(real)} real and {len(fake)} fake"
        )


def fid_kid_from_features(
    real: Tensor, fake: Tensor, *, kid_subsets: int = 50, kid_subset_size: int = 100, seed: int = 0
) -> dict[str, float]:
    """FID and KID from (N, D) real and (M, D) fake features (see `fid_kid`)."""
    _check_features(real, fake)
    dim = real.shape[1]
    size = min(kid_subset_size, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")  # ours are small
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=kid_subsets, subset_size=size)
    fid.set_dtype(torch.float64)  # the covariance square root needs float64
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "n_real": len(real),
        "n_fake": len(fake),
        "feature_dim": dim,
    }


def fid_kid(
    real: Tensor,
    fake: Tensor,
    feature: nn.Module,
    *,
    kid_subsets: int = 50,
    kid_subset_size: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID between two sample sets.

    Args:
        real: (N, C, *spatial) reference samples in [-1, 1].
        fake: (M, C, *spatial) generated samples in [-1, 1], same per-sample shape.
        feature: module mapping a batch to (B, D) features (`Evaluator.feature_net()` or
            `load_inception(path)`).
        kid_subsets: number of random subsets KID averages over.
        kid_subset_size: subset size, clipped to the smaller set.
        batch_size: feature-extraction batch size.
        seed: seeds KID's subset draws, so equal inputs give equal numbers.

    Returns:
        {"fid", "kid_mean", "kid_std", "n_real", "n_fake", "feature_dim"}.
    """
    if real.shape[1:] != fake.shape[1:]:
        raise ConfigError(
            f"real samples {tuple(real.shape[1:])} and fake {tuple(fake.shape[1:])} differ in shape"
        )
    real_f = extract_features(real, feature, batch_size)
    fake_f = extract_features(fake, feature, batch_size)
    return fid_kid_from_features(
        real_f, fake_f, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed
    )
