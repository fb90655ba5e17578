"""Trainer parts: condition dropout, EMA, learning-rate schedule, per-step randomness, in-memory data."""

import pytest
import torch
from torch import nn

from attnlab.conditioning import NULL_LABEL, Condition
from attnlab.config import load_config
from attnlab.train.batches import prepare_training_data
from attnlab.train.ema import EMA
from attnlab.train.trainer import drop_condition, lr_at, step_generator


def test_condition_dropout_replaces_rows_by_the_null_condition():
    n = 2000
    tokens, mask = torch.randn(n, 3, 4), torch.ones(n, 3, dtype=torch.bool)
    cond = Condition(labels=torch.arange(n) % 7, tokens=tokens, mask=mask)
    out = drop_condition(cond, 0.25, torch.Generator().manual_seed(0))
    dropped = out.labels == NULL_LABEL
    assert 0.22 < dropped.float().mean() < 0.28
    null = cond.null_like()
    assert torch.equal(out.tokens[dropped], null.tokens[dropped]) and torch.equal(
        out.mask[dropped], null.mask[dropped]
    )
    assert torch.equal(out.tokens[~dropped], tokens[~dropped]) and torch.equal(
        out.labels[~dropped], cond.labels[~dropped]
    )
    assert (
        drop_condition(cond, 0.0, torch.Generator()) is cond
        and drop_condition(None, 0.5, torch.Generator()) is None
    )


def test_ema_is_the_polyak_average_with_warm_up():
    model = nn.BatchNorm1d(3)  # float parameters plus an integer buffer
    ema = EMA(model, decay=0.9)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
        model.num_batches_tracked.add_(5)
    ema.update(model, step=1000)  # warm-up over: decay 0.9
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * old["weight"] + 0.1 * model.weight)
    assert ema.state_dict()["num_batches_tracked"] == 5
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.9


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = load_config(
        None, ["train.lr=0.01", "train.warmup=10", "train.steps=110", "train.lr_schedule=cosine"]
    )
    assert lr_at(cfg, 0) == pytest.approx(0.001) and lr_at(cfg, 9) == pytest.approx(0.01)
    assert lr_at(cfg, 60) == pytest.approx(0.0055) and lr_at(cfg, 110) == pytest.approx(0.001)
    flat = load_config(None, ["train.lr=0.01", "train.warmup=0"])
    assert lr_at(flat, 0) == lr_at(flat, 5000) == 0.01


def test_step_randomness_is_a_function_of_seed_step_and_process():
    draw = lambda *key: torch.randn(4, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0)) and not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


class _Encoder:
    """Encodes a caption as its word lengths, one token per word, padded to the batch's longest."""

    def encode(self, texts):
        n = max(len(t.split()) for t in texts)
        tokens = torch.zeros(len(texts), n, 2)
        mask = torch.zeros(len(texts), n, dtype=torch.bool)
        for i, t in enumerate(texts):
            for j, w in enumerate(t.split()):
                tokens[i, j] = torch.tensor([len(w), i])
                mask[i, j] = True
        return tokens, mask


class _Data:
    def tensors(self):
        return torch.arange(5.0).view(5, 1, 1, 1)

    def texts(self):
        return ["a b", "ccc", "a b", "dd e fff", "ccc"]

    def labels(self):
        return torch.tensor([0, 1, 0, 2, 1])


def test_captions_are_encoded_once_and_batched_by_index():
    data = prepare_training_data(_Data(), "text", _Encoder(), chunk=2)  # two encoder calls, padded to 3
    assert data.tokens.shape == (3, 3, 2)  # three distinct captions
    x, cond = data.batch(torch.tensor([3, 0, 2]))
    assert x.flatten().tolist() == [3.0, 0.0, 2.0]
    assert cond.mask.sum(1).tolist() == [3, 2, 2]
    assert cond.tokens[0, :, 0].tolist() == [2, 1, 3] and torch.equal(cond.tokens[1], cond.tokens[2])
    x, cond = prepare_training_data(_Data(), "class").batch(torch.tensor([4, 3]))
    assert cond.labels.tolist() == [1, 2] and cond.tokens is None
