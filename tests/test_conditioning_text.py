"""The offline MiniLM text encoder: padding mask, per-caption cache, word positions; make_condition."""

import pytest
import torch

from attnlab.conditioning import Condition, make_condition
from attnlab.conditioning.text import TextEncoder, get_text_encoder
from attnlab.errors import ConfigError

SHORT, LONG = "a red circle", "a red circle left of a blue square"


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return get_text_encoder()


def test_loads_once_per_process(enc):
    assert get_text_encoder() is enc and enc.dim == 384
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_mask_marks_real_tokens_and_padding_is_zero(enc):
    tokens, mask = enc.encode([SHORT, LONG])
    lengths = [len(enc.tokens_of(t)) for t in (SHORT, LONG)]
    assert lengths == [5, 10] and tokens.shape == (2, 10, 384) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths and mask[0, :5].all() and not mask[0, 5:].any()
    assert not tokens[0, 5:].any() and tokens[0, :5].abs().sum(-1).min() > 0
    padded, pmask = enc.encode([SHORT], max_len=16)
    assert padded.shape == (1, 16, 384) and pmask.sum() == 5 and torch.equal(padded[0, :5], tokens[0, :5])


def test_a_caption_gets_the_same_features_alone_or_in_any_batch(enc):
    # Bit for bit: the first batch a caption is encoded in is cached for the whole process, so its
    # features must not depend on the captions beside it (a padded batch moves them by ~1e-6).
    enc._cache.clear()
    alone, _ = enc.encode([SHORT])
    batch = enc.tokenizer([SHORT], return_tensors="pt")  # transformers on the caption alone
    assert torch.equal(alone[0], enc.model(**batch).last_hidden_state[0])
    for others in ([LONG], [LONG, "two green squares below a yellow diamond", "a blue cross"]):
        enc._cache.clear()
        batched, _ = enc.encode([*others, SHORT, "a big red circle"])
        assert torch.equal(alone[0], batched[len(others), :5]), others
    assert not torch.allclose(alone[0, 1:4], batched[0, 1:4], atol=1e-3)  # context changes features


def test_same_caption_same_tokens_and_encode_all_matches_encode(enc):
    texts = [SHORT, LONG, SHORT, "a green triangle", LONG]
    tokens, mask = enc.encode_all(texts, batch_size=2)
    assert torch.equal(tokens[0], tokens[2]) and torch.equal(mask[1], mask[4])
    for i, t in enumerate(texts):
        one, m = enc.encode([t])
        assert torch.equal(tokens[i, : one.shape[1]], one[0]) and torch.equal(mask[i, : m.shape[1]], m[0])


def test_tokens_and_word_positions(enc):
    assert enc.tokenize(LONG) == ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    seq = enc.tokens_of(LONG)
    assert seq[0] == "[CLS]" and seq[-1] == "[SEP]"
    assert [seq[i] for i in enc.word_token_indices(LONG, "blue")] == ["blue"]
    assert enc.word_token_indices(LONG, "Blue Square") == [7, 8]
    assert enc.word_token_indices("a red circle above a red square", "red") == [2, 6]
    prompt = "a sine tone at A4"
    idx = enc.word_token_indices(prompt, "A4")
    assert len(idx) == 2 and "".join(enc.tokens_of(prompt)[i].lstrip("#") for i in idx) == "a4"
    for missing in ("green", "re", ""):
        with pytest.raises(ConfigError, match="is not in the prompt"):
            enc.word_token_indices(LONG, missing)


def test_make_condition(enc):
    cond = make_condition(None, [3, -1], "class", enc)
    assert isinstance(cond, Condition) and cond.labels.tolist() == [3, -1] and cond.tokens is None
    cond = make_condition([SHORT, LONG], None, "text", enc)
    assert cond.tokens.shape == (2, 10, 384) and cond.mask.sum().item() == 15 and cond.labels is None
    assert make_condition([SHORT], [1], "none", enc) == Condition()
    with pytest.raises(ConfigError, match="model.cond='image'"):
        make_condition([SHORT], None, "image", enc)
    with pytest.raises(ConfigError, match="needs captions"):
        make_condition(None, [1], "text", enc)
