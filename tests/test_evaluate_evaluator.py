"""The shipped evaluators read real data right, their features separate real data from noise,
and saved evaluators load back exactly or fail with a clear message.

Accuracies are measured on eval splits, which the shipped weights never saw (they trained on the
train splits of `attnlab.evaluate.recipes.builtin_data`: shapes and tones draw train and eval items
apart by a parity rule, digits holds out a fixed 20 % of the images), and each threshold is checked
to lie more than 5 standard deviations above what a blind guess scores on that many items."""

import json

import pytest
import torch
from chance import chance_ceiling

from attnlab.data import DataConfig, build_dataset
from attnlab.data.config import COLORS, SHAPES
from attnlab.data.shapes import POSITIONS
from attnlab.data.tones import NOTES, WAVEFORMS
from attnlab.errors import CheckpointError, ConfigError
from attnlab.evaluate import Evaluator, alignment, fid_kid, request_from_item
from attnlab.evaluate.evaluator import BUILTIN, WEIGHTS_DIR
from attnlab.evaluate.train import degrade


def _eval_split(name, **kw):
    ds = build_dataset(DataConfig(name=name, **kw), "eval")
    return ds, [request_from_item(name, ds[i]) for i in range(len(ds))]


def _chance(name, ds, requests) -> dict[str, float]:
    """Per accuracy of `alignment`: a blind guess's score on these requests plus 5 standard deviations,
    from the units the accuracy counts (objects, notes or samples) and the answers it could give."""
    cfg = ds.cfg
    whole = [json.dumps(r, sort_keys=True) for r in requests]
    out = {"all_correct": chance_ceiling(len(whole), len(set(whole)), whole)}
    if name == "digits":
        return {"class_acc": chance_ceiling(len(requests), 10, [r["label"] for r in requests])}
    if name == "tones":
        notes = [n for r in requests for n in r["notes"]]
        counts = [len(r["notes"]) for r in requests]
        return {
            **out,
            "pitch_acc": chance_ceiling(len(notes), len(NOTES), [n["note"] for n in notes]),
            "waveform_acc": chance_ceiling(len(notes), len(WAVEFORMS), [n["waveform"] for n in notes]),
            "count_acc": chance_ceiling(len(counts), cfg.max_notes, counts),
        }
    objects = [o for r in requests for o in r["objects"]]
    placed = [o["position"] for o in objects if "position" in o]
    counts = [r["count"] for r in requests]
    related = [r for r in requests if r["relation"]]
    out["shape_acc"] = chance_ceiling(len(objects), len(cfg.shapes), [o["shape"] for o in objects])
    out["color_acc"] = chance_ceiling(len(objects), len(cfg.colors), [o["color"] for o in objects])
    out["count_acc"] = chance_ceiling(len(counts), cfg.max_objects - cfg.min_objects + 1, counts)
    if placed:
        out["position_acc"] = chance_ceiling(len(placed), len(POSITIONS), placed)
    if related:  # two objects placed blindly are in the asked order half the time
        out["relation_acc"] = chance_ceiling(len(related), 2)
    return out


SHAPES_SPLITS = [
    dict(size=16, max_objects=3, positions=True),
    dict(size=32, max_objects=3, positions=False),
    dict(size=64, max_objects=3, positions=True),
    dict(size=32),  # the data room's default: one object, 3 shapes x 4 colours, no positions
]


@pytest.mark.parametrize("split", SHAPES_SPLITS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_shapes_evaluator_reads_every_attribute_of_real_scenes(split):
    vocab = {} if split.keys() == {"size"} else {"shapes": SHAPES, "colors": COLORS}
    ds, requests = _eval_split("shapes", num_eval=256, **vocab, **split)
    result = alignment("shapes", ds.tensors(), requests)
    chance = _chance("shapes", ds, requests)
    keys = ["shape_acc", "color_acc"]
    if split.get("positions"):
        keys.append("position_acc")
    if split.get("max_objects", 1) > 1:
        keys += ["count_acc", "relation_acc"]
    else:  # every scene holds one object, which a blind "one" guesses too: no extra object is seen
        assert result["count_acc"] >= 0.95, result
    for key in keys:
        assert result[key] >= 0.95 > chance[key], (key, result, chance[key])


def test_digits_evaluator_reads_real_digits():
    for size in (16, 32):
        ds, requests = _eval_split("digits", size=size)
        result = alignment("digits", ds.tensors(), requests)
        assert result["n"] == 359  # the held-out 20 % of the 1797 images
        assert result["class_acc"] >= 0.95 > _chance("digits", ds, requests)["class_acc"], result


def test_tones_alignment_scores_real_clips_as_correct():
    ds, requests = _eval_split("tones", size=2048, num_eval=128, max_notes=2)
    result = alignment("tones", ds.tensors(), requests)
    chance = _chance("tones", ds, requests)
    assert result["pitch_acc"] == 1.0 > chance["pitch_acc"] and result["pitch_cents_median"] < 1.0
    for key in ("waveform_acc", "count_acc"):
        assert result[key] >= 0.95 > chance[key], (key, result, chance[key])


def test_shapes_evaluator_sees_through_mild_degradation_but_not_noise():
    ds, requests = _eval_split("shapes", size=32, num_eval=256, max_objects=3, shapes=SHAPES, colors=COLORS)
    x = ds.tensors()
    soft = degrade(x, torch.Generator().manual_seed(0))  # the blur/noise/colour shifts it trained with
    assert (
        alignment("shapes", soft, requests)["all_correct"]
        >= 0.8
        > _chance("shapes", ds, requests)["all_correct"]
    )
    noise = torch.rand_like(x) * 2 - 1
    assert alignment("shapes", noise, requests)["all_correct"] <= 0.05


@pytest.mark.parametrize("name", BUILTIN)
def test_evaluator_features_put_real_data_near_itself_and_far_from_noise(name):
    size = {"shapes": 32, "digits": 16, "tones": 2048}[name]
    cfg = DataConfig(name=name, size=size, num=400, num_eval=400)
    real, other = (build_dataset(cfg, s).tensors()[:400] for s in ("eval", "train"))
    feature = Evaluator.load(name).feature_net()
    same = fid_kid(real, real, feature)
    split = fid_kid(real, other, feature)
    noise = fid_kid(real, (torch.randn_like(real) * 0.5).clamp(-1, 1), feature)
    assert abs(same["fid"]) < 1e-6
    assert noise["fid"] > 20 * split["fid"]
    # The texture block: blurred, noisy copies of real data are worse than real data.
    soft = fid_kid(real, degrade(other, torch.Generator().manual_seed(0)), feature)
    assert soft["fid"] > 2 * split["fid"]
    assert noise["kid_mean"] > 20 * max(split["kid_mean"], 1e-4)


def test_save_and_load_give_the_same_network(tmp_path):
    ev = Evaluator.load("digits")
    ev.save(tmp_path / "evaluator")
    again = Evaluator.load(tmp_path)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(again.feature_net()(x), ev.feature_net()(x))
    assert again.task.vocab == ev.task.vocab and again.info["metrics"] == ev.info["metrics"]


def test_shipped_weights_are_small():
    for name in BUILTIN:
        assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 1_000_000


def test_bad_evaluator_files_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no evaluator here: expected a built-in name"):
        Evaluator.load(tmp_path / "nothing")
    ev = Evaluator.load("digits")
    ev.save(tmp_path / "evaluator")
    (tmp_path / "evaluator.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"evaluator\.safetensors: cannot read as safetensors"):
        Evaluator.load(tmp_path)
    Evaluator.load("tones").save(tmp_path / "evaluator")
    info = json.loads((tmp_path / "evaluator.json").read_text())
    (tmp_path / "evaluator.json").write_text(json.dumps({**info, "network": {**info["network"], "width": 8}}))
    with pytest.raises(CheckpointError, match="weights do not match the network in its JSON config"):
        Evaluator.load(tmp_path)
    (tmp_path / "evaluator.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an attnlab evaluator config"):
        Evaluator.load(tmp_path)
    (tmp_path / "evaluator.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read evaluator config"):
        Evaluator.load(tmp_path)


def test_alignment_needs_an_evaluator_for_folders_and_matching_lengths():
    with pytest.raises(ConfigError, match="no built-in evaluator.*attnlab evaluator train"):
        alignment("folder", torch.zeros(2, 3, 8, 8), [0, 1])
    with pytest.raises(ConfigError, match="2 samples but 3 requests"):
        alignment("digits", torch.zeros(2, 1, 16, 16), [0, 1, 2])


def test_score_samples_reuses_real_features_and_reports_both_tables():
    from attnlab.evaluate import extract_features, feature_network, score_samples

    cfg = DataConfig(
        name="shapes", size=32, num=256, num_eval=256, max_objects=2, shapes=SHAPES, colors=COLORS
    )
    real, fake = (build_dataset(cfg, s) for s in ("train", "eval"))
    requests = [request_from_item("shapes", fake[i]) for i in range(len(fake))]
    direct = score_samples("shapes", fake.tensors(), requests, real=real.tensors())
    features = extract_features(real.tensors(), feature_network("shapes"))
    cached = score_samples("shapes", fake.tensors(), requests, real_features=features)
    assert cached == direct
    assert direct["all_correct"] >= 0.9 > _chance("shapes", fake, requests)["all_correct"]
    assert direct["fid"] >= 0


def test_tones_at_another_sample_rate_are_resampled_for_the_evaluator():
    ds, requests = _eval_split("tones", size=4096, num_eval=64, sample_rate=16000)
    result = alignment("tones", ds.tensors(), requests, sample_rate=16000)
    chance = _chance("tones", ds, requests)
    assert result["pitch_acc"] == 1.0 > chance["pitch_acc"], result
    assert result["waveform_acc"] >= 0.9 > chance["waveform_acc"], (result, chance)


def test_chance_ceiling_is_a_blind_guess_plus_five_standard_deviations():
    assert chance_ceiling(100, 2) == pytest.approx(0.75)
    assert chance_ceiling(10, 10, [1] * 9 + [2]) == pytest.approx(0.9 + 5 * (0.09 / 10) ** 0.5)
    assert chance_ceiling(4, 3) > 1  # 4 items of 3 classes: no accuracy threshold is out of a guess's reach
    g = torch.Generator().manual_seed(0)
    truths = torch.randint(10, (359,), generator=g)
    guesses = [(torch.randint(10, (359,), generator=g) == truths).float().mean() for _ in range(200)]
    assert max(guesses) < chance_ceiling(359, 10, truths.tolist())
