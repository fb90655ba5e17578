"""Evaluation: sample quality (FID, KID), condition alignment and cost of a diffusion model.

Quality (Heusel et al., 2017; Binkowski et al., 2018), through torchmetrics:

    ev = Evaluator.load("shapes")                      # shipped per built-in dataset
    fid_kid(real, fake, ev.feature_net())              # -> {"fid", "kid_mean", "kid_std", ...}
    fid_kid(real, fake, load_inception("pt_inception-2015-12-05-6726825d.pth"))  # local Inception
    feature_network("shapes", inception=None)          # either of the two, as a config would pick

    Samples are (N, C, *spatial) float tensors in [-1, 1]. Evaluator features (the embedding its
    heads read plus a calibrated texture block, see `network`) are comparable only between runs
    that use the same evaluator weights. Inception-FID is the number papers report, but it sees
    16-64 px images upsampled 5-18x to 299 px and knows nothing of audio, so the dataset's own
    evaluator is the default.

Prompt alignment of a pretrained pipeline's images, with a local CLIP (`clip_score`):

    load_clip("/models/clip-vit-b32").score(images, prompts)   # 100 x max(cos, 0) per image

Condition alignment: does each sample show what its prompt asked for?

    alignment("shapes", samples, captions_or_requests)   # shape/color/position/count/relation acc, all_correct
    alignment("tones", clips, requests)                   # FFT pitch (cents), waveform, count, all_correct
    alignment("digits", images, labels)                   # class_acc
    alignment("folder", x, labels, evaluator="runs/my-evaluator")
    parse_request("shapes", "a red circle left of a blue square")  # caption -> request dict

Both at once, as a proof of concept scores each variant (real features computed once):

    real_f = extract_features(real, feature_network("shapes"))
    score_samples("shapes", fake, requests, real_features=real_f)  # fid, kid_*, and the alignment keys

Heat-map localisation (a word's attention map against its object's mask):

    heatmap_localisation(maps, masks)                     # -> {"iou", "pointing", "n"}
    # on clouds: maps (N, P) per point, masks (N, P) the object's points (`points_word_targets`)

Cost:

    cost(model, sample_shape, cond, sampler=lambda: sample(...), n_samples=16, run_dir=run)
    # -> {"params", "flops_per_call", "flops_per_sample", "latency_s", "peak_mem_bytes", "train_seconds", ...}

Evaluators: `Evaluator.load(name_or_dir)`, `.predict(x)` (decoded objects / notes / labels),
`.feature_net()`; `attnlab evaluator train --data-root DIR --out DIR` trains one for a folder.
See each module for how every number is measured.
"""

from attnlab.evaluate.alignment import alignment
from attnlab.evaluate.clip_score import ClipScorer, load_clip
from attnlab.evaluate.cost import (
    cost,
    count_flops,
    count_parameters,
    denoiser_flops,
    peak_memory,
    sampling_latency,
    timed,
    training_time,
)
from attnlab.evaluate.evaluator import BUILTIN, Evaluator, feature_network
from attnlab.evaluate.inception import FIDInception, load_inception
from attnlab.evaluate.localisation import (
    heatmap_localisation,
    points_word_targets,
    shapes_word_targets,
    word_localisation,
)
from attnlab.evaluate.pitch import cents, fft_pitch
from attnlab.evaluate.prompts import parse_request, request_from_item
from attnlab.evaluate.quality import extract_features, fid_kid, fid_kid_from_features
from attnlab.evaluate.score import score_samples

__all__ = [
    "BUILTIN",
    "ClipScorer",
    "Evaluator",
    "FIDInception",
    "alignment",
    "cents",
    "cost",
    "count_flops",
    "count_parameters",
    "denoiser_flops",
    "extract_features",
    "feature_network",
    "fft_pitch",
    "fid_kid",
    "fid_kid_from_features",
    "heatmap_localisation",
    "load_clip",
    "load_inception",
    "parse_request",
    "peak_memory",
    "points_word_targets",
    "request_from_item",
    "sampling_latency",
    "score_samples",
    "shapes_word_targets",
    "timed",
    "training_time",
    "word_localisation",
]
