"""One call that scores a set of generated samples: quality against real samples, and alignment
with what was asked, both read by the same evaluator (the form a proof-of-concept table needs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from attnlab.evaluate.alignment import alignment
from attnlab.evaluate.evaluator import Evaluator, feature_network
from attnlab.evaluate.quality import extract_features, fid_kid_from_features


def score_samples(
    dataset: str,
    fake: Tensor,
    requests: Sequence[dict | str | int] | None = None,
    *,
    real: Tensor | None = None,
    real_features: Tensor | None = None,
    evaluator: Evaluator | str | Path | None = None,
    inception: str | Path | None = None,
    sample_rate: int | None = None,
    seed: int = 0,
) -> dict:
    """FID/KID and alignment of generated samples.

    Args:
        dataset: the dataset name ("shapes", "digits", "tones", "folder", ...).
        fake: (N, C, *spatial) generated samples in [-1, 1].
        requests: what each sample was asked to show (see `alignment`); None skips alignment.
        real: reference samples; or give `real_features` computed once with `extract_features`
            and the same feature network (the usual case when several variants are scored).
        evaluator: an Evaluator or name/path; None loads the dataset's built-in one.
        inception: local pytorch-fid Inception weights to use for FID/KID instead of the evaluator.
        sample_rate: audio only: the samples' rate, if not the evaluator's.
        seed: seeds KID's subset draws.

    Returns:
        {"fid", "kid_mean", "kid_std"} when real data is given, plus the alignment keys when
        requests are given and the evaluator predicts labels.
    """
    if dataset == "points":  # point clouds: the PointFlow metrics and the point evaluator
        from attnlab.evaluate.pointcloud import score_points

        return score_points(fake, requests, evaluator, real_features, seed)
    ev = evaluator if isinstance(evaluator, Evaluator) else Evaluator.load(evaluator or dataset)
    fake = ev.resample(fake, sample_rate)
    out: dict = {}
    if real is not None or real_features is not None:
        feature = feature_network(ev, inception)
        if real_features is None:
            real_features = extract_features(ev.resample(real, sample_rate), feature)
        quality = fid_kid_from_features(real_features, extract_features(fake, feature), seed=seed)
        out.update({k: quality[k] for k in ("fid", "kid_mean", "kid_std")})
    if requests is not None and ev.task.kind != "pretext":
        out.update(alignment(dataset, fake, requests, ev))
    return out
