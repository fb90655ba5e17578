"""The shipped reference LM of the scenes set (scripts/train_reference_lm.py writes it): it loads, its
tokenizer is the one a default scenes run trains, it prefers real held-out scene text to the same
words shuffled, a run with the same vocabulary in another id order gets it re-indexed (the same
likelihoods), and a run with another vocabulary, a longer sequence or a BPE tokenizer trains its own."""

import dataclasses

import pytest
import torch

from attnlab.evaluate.text_lm import (
    lm_info,
    load_lm,
    load_scenes_lm,
    perplexity,
    scenes_lm_for,
    vocab_of,
    vocab_sha256,
)
from attnlab.train.text import TextDataConfig, build_token_data, reference_language_model


@pytest.fixture(scope="module")
def default_data():
    return build_token_data(TextDataConfig())


def _ppl(lm, tok, texts):
    return perplexity(lm, tok.encode(texts), tok.bos_id, tok.pad_id)


def test_the_shipped_lm_loads_with_the_default_scenes_tokenizer(default_data):
    lm, tok, info = load_scenes_lm()
    assert vocab_of(tok) == vocab_of(default_data.tokenizer)  # the same ids, not only the same words
    assert info["vocab_sha256"] == vocab_sha256(vocab_of(default_data.tokenizer))
    assert lm.cfg.vocab_size == tok.vocab_size and lm.cfg.length == default_data.tokenizer.length
    assert info["trained_on"]["split"] == "ref" and set(info["perplexity"]) >= {"eval", "ref"}


def test_the_shipped_lm_prefers_held_out_scene_text_to_shuffled_words(default_data):
    lm, tok, info = load_scenes_lm()
    texts = default_data.splits["eval"].texts  # never in the LM's ref split: splits are a text hash
    g = torch.Generator().manual_seed(0)
    shuffled = [" ".join(t.split()[i] for i in torch.randperm(len(t.split()), generator=g)) for t in texts]
    real, bad = _ppl(lm, tok, texts), _ppl(lm, tok, shuffled)
    assert real < 3 and bad > 10 * real
    assert real == pytest.approx(info["perplexity"]["eval"], abs=1e-3)  # the recorded number


def test_a_default_scenes_run_uses_the_shipped_lm(default_data, tmp_path):
    source = reference_language_model(TextDataConfig(), default_data, tmp_path, steps=3)
    assert source.startswith("shipped")
    shipped, _, _ = load_scenes_lm()
    mine = load_lm(tmp_path)
    for k, v in shipped.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    info = lm_info(tmp_path)
    assert info["source"] == source and info["perplexity"]["eval"] == pytest.approx(2.42, abs=0.05)


def test_the_same_vocabulary_in_another_order_gets_the_lm_re_indexed(default_data, tmp_path):
    cfg = TextDataConfig(seed=1)  # other word counts, so other ids
    data = build_token_data(cfg)
    assert vocab_of(data.tokenizer) != vocab_of(default_data.tokenizer)
    assert reference_language_model(cfg, data, tmp_path, steps=3).startswith("shipped")
    shipped, tok, _ = load_scenes_lm()
    texts = data.splits["eval"].texts
    assert _ppl(load_lm(tmp_path), data.tokenizer, texts) == pytest.approx(
        _ppl(shipped, tok, texts), rel=1e-5
    )


@pytest.mark.parametrize(
    "change, why",
    [
        ({"max_objects": 3}, "vocabulary is not the shipped LM's"),
        ({"colors": ["red", "blue", "green"]}, "vocabulary is not the shipped LM's"),
        ({"length": 12}, "longer than the shipped LM's"),
        ({"tokenizer": "bpe", "vocab_size": 60}, "BPE"),
    ],
)
def test_another_tokenizer_trains_its_own_lm_and_says_why(change, why, tmp_path):
    cfg = dataclasses.replace(TextDataConfig(num=256, num_eval=32, num_ref=64), **change)
    data = build_token_data(cfg)
    source = reference_language_model(cfg, data, tmp_path, steps=3)
    info = lm_info(tmp_path)
    assert source.startswith("trained on this run's ref split") and why in info["not_shipped_because"]
    assert load_lm(tmp_path).cfg.vocab_size == data.tokenizer.vocab_size
    if cfg.tokenizer == "word":
        assert scenes_lm_for(data.tokenizer)[0] is None
