"""The scenes grammar (every description parses back to its scene; wording does not change the
attributes), the splits (never sharing a description), the tokenizer (JSON round trip, lengths),
the text folder's bad rows, and the text metrics against hand-computed values."""

import json
import math

import numpy as np
import pytest
import torch

from attnlab.data.scenes import (
    Scene,
    ScenesConfig,
    build_scenes,
    condition_vocab,
    describe,
    draw_scene,
    parse,
)
from attnlab.data.text_folder import read_text_folder
from attnlab.data.tokenizer import TextTokenizer, train_tokenizer
from attnlab.errors import CheckpointError, ConfigError, DataError
from attnlab.evaluate.text import agreement, attribute_accuracy, distinct_n, self_bleu, validity
from attnlab.evaluate.text_lm import LMConfig, ReferenceLM, load_lm, perplexity, save_lm, train_reference_lm

CFG = ScenesConfig(num=300, num_eval=60, num_ref=60, max_objects=3)


def test_every_description_parses_back_to_its_scene():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scene = draw_scene(rng, CFG)
        text = describe(scene, rng)
        assert parse(text, CFG) == scene, text
        assert set(scene.condition()) <= set(condition_vocab(CFG))


def test_wordings_of_one_scene_state_the_same_attributes():
    a = parse("a small red circle left of one large blue square", CFG)
    b = parse("a large blue square right of a small red circle", CFG)
    assert a == b == Scene((("small", "red", "circle"), ("large", "blue", "square")), layout="horizontal")
    assert parse("there is a large green triangle at the top left", CFG) == Scene(
        (("large", "green", "triangle"),), place="top_left"
    )
    assert parse("a small red circle , a large blue square and one small green triangle", CFG).objects[2] == (
        "small",
        "green",
        "triangle",
    )


def test_the_swapped_wording_of_every_two_object_scene_parses_to_it():
    # describe draws "A left of B" / "A above B" only (see attnlab/data/scenes.py); parse also reads
    # "B right of A" / "B below A" as the same scene, exactly
    rng = np.random.default_rng(1)
    swapped = {"horizontal": "right of", "vertical": "below"}
    seen = 0
    for _ in range(2000):
        scene = draw_scene(rng, CFG)
        if len(scene.objects) != 2:
            continue
        (a, b), det = scene.objects, ("a", "one")[rng.integers(2)]
        text = f"{det} {' '.join(b)} {swapped[scene.layout]} {det} {' '.join(a)}"
        assert parse(text, CFG) == scene, text
        seen += 1
    assert seen > 500


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a small red circle",  # no place
        "a red circle at the top left",  # no size
        "a small red circle left of",
        "a small purple circle on the left",  # not a colour of the config
        "a small red circle left of a large blue square at the top",
        "there is a small red circle left of a large blue square",
        "small red circle on the left",
    ],
)
def test_what_is_not_a_sentence_of_the_grammar_is_refused(text):
    assert parse(text, CFG) is None


def test_splits_never_share_a_description_and_are_reproducible():
    splits = {s: build_scenes(CFG, s) for s in ("train", "eval", "ref")}
    texts = {s: set(sp.texts) for s, sp in splits.items()}
    assert (
        not texts["train"] & texts["eval"]
        and not texts["train"] & texts["ref"]
        and not texts["eval"] & texts["ref"]
    )
    assert len(splits["train"]) == 300 and len(splits["eval"]) == 60
    assert build_scenes(CFG, "eval").texts == splits["eval"].texts
    with pytest.raises(ConfigError, match="split='test' is not allowed"):
        build_scenes(CFG, "test")


def test_bad_scenes_options_are_refused():
    with pytest.raises(ConfigError, match="data.max_objects=4"):
        ScenesConfig(max_objects=4)
    with pytest.raises(ConfigError, match="data.colors"):
        ScenesConfig(colors=("red", "mauve"))


def test_tokenizer_round_trips_through_its_json(tmp_path):
    texts = build_scenes(CFG, "train").texts
    tok = train_tokenizer(texts, "word")
    ids = tok.encode(texts[:5])
    assert ids.shape == (5, tok.length) and tok.length == max(len(t.split()) for t in texts)
    tok.save(tmp_path / "tokenizer.json")
    json.loads((tmp_path / "tokenizer.json").read_text())  # JSON, not a pickle
    again = TextTokenizer.load(tmp_path / "tokenizer.json", tok.length)
    assert torch.equal(again.encode(texts[:5]), ids)
    for row, text in zip(ids, texts[:5]):
        assert again.decode(row) == (text, True)


def test_decode_flags_text_that_is_not_content_then_padding():
    tok = train_tokenizer(["a small red circle on the left"], "word", length=8)
    ids = tok.encode(["a small red circle on the left"])[0]
    broken = ids.clone()
    broken[2], broken[6] = tok.pad_id, ids[2]  # a hole, then content after padding
    assert tok.decode(broken)[1] is False
    masked = ids.clone()
    masked[0] = tok.mask_id
    assert tok.decode(masked)[1] is False


def test_bpe_tokenizer_restores_spaces():
    tok = train_tokenizer(["the quick brown fox", "jumps over the lazy dog"] * 5, "bpe", vocab_size=300)
    assert tok.decode(tok.encode(["the lazy fox"])[0]) == ("the lazy fox", True)


def test_bad_tokenizer_input_is_refused(tmp_path):
    tok = train_tokenizer(["a b c"], "word")
    with pytest.raises(DataError, match="eval split item 0: 4 tokens, more than the sequence length 3"):
        tok.encode(["a b c a"], "eval split")
    with pytest.raises(ConfigError, match="data.tokenizer='char'"):
        train_tokenizer(["a"], "char")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        TextTokenizer.load(tmp_path / "bad.json", 4)
    with pytest.raises(DataError, match="not found"):
        TextTokenizer.load(tmp_path / "none.json", 4)


# The user's text


def _folder(tmp_path, lines):
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_text_folder_reads_text_splits_and_conditions(tmp_path):
    root = _folder(
        tmp_path,
        [
            '{"text": "hello there", "split": "train", "mood": "glad"}',
            '{"text": "good night", "split": "eval", "mood": "calm"}',
            '{"text": "see you", "split": "reference", "mood": "glad"}',
        ],
    )
    train, skipped = read_text_folder(root, "train", ("mood",))
    assert train.texts == ["hello there"] and train.conditions == [["mood=glad"]] and skipped == 0
    assert read_text_folder(root, "ref")[0].texts == ["see you"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": ""}', r"metadata.jsonl line 2: no 'text'"),
        ('{"caption": "x"}', r"metadata.jsonl line 2: no 'text'"),
        ("[1, 2]", r"metadata.jsonl line 2: expected a JSON object"),
        (
            '{"text": "x", "split": "later", "mood": "calm"}',
            r"metadata.jsonl line 2: split 'later' is not one of",
        ),
        ('{"text": "x", "split": "train"}', r"metadata.jsonl line 2: no value in condition column 'mood'"),
        ("{oops", r"metadata.jsonl line 2: not valid JSON"),
    ],
)
def test_text_folder_names_the_bad_row(tmp_path, line, message):
    root = _folder(tmp_path, ['{"text": "fine", "split": "train", "mood": "glad"}', line])
    with pytest.raises(DataError, match=message):
        read_text_folder(root, "train", ("mood",))
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        split, skipped = read_text_folder(root, "train", ("mood",), skip_bad=True)
    assert split.texts == ["fine"] and skipped == 1


def test_text_folder_without_metadata_or_rows_is_refused(tmp_path):
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        read_text_folder(tmp_path, "train")
    root = _folder(tmp_path, ['{"text": "only", "split": "train"}'])
    with pytest.raises(DataError, match="no usable rows in the eval split"):
        read_text_folder(root, "eval")


# Metrics


def test_validity_and_agreement_check_exactly():
    asked = [Scene((("small", "red", "circle"),), place="left")] * 3
    texts = ["a small red circle on the left", "a small red square on the left", "small red"]
    valid = validity(texts, [True, True, True], CFG)
    assert valid == [True, True, False]
    assert agreement(texts, valid, asked, CFG) == [True, False, False]
    # n, place, size, colour, shape: 5 + 4 of the second's 5 + none of the invalid one's
    assert attribute_accuracy(texts, valid, asked, CFG) == pytest.approx(9 / 15)
    assert validity(texts[:1], [False], CFG) == [False]  # not well formed: not valid


def test_distinct_n_by_hand():
    texts = ["a b a", "a b c"]  # bigrams: ab ba ab bc -> 3 distinct of 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a"], 2) == 0.0


def test_self_bleu_is_one_for_copies_and_low_for_disjoint_texts():
    assert self_bleu(["a small red circle on the left"] * 4) == pytest.approx(1.0)
    assert self_bleu(["a b c d e", "f g h i j", "k l m n o"]) < 0.1


def test_perplexity_of_a_uniform_lm_is_the_vocabulary_size(tmp_path):
    lm = ReferenceLM(LMConfig(vocab_size=7, length=4))
    with torch.no_grad():
        lm.out.weight.zero_()
        lm.out.bias.zero_()
    ids = torch.tensor([[4, 5, 0, 0], [6, 4, 5, 6]])
    assert perplexity(lm, ids, bos_id=3, pad_id=0) == pytest.approx(7.0, rel=1e-5)
    save_lm(lm, tmp_path)
    assert perplexity(load_lm(tmp_path), ids, 3, 0) == pytest.approx(7.0, rel=1e-5)
    (tmp_path / "reference_lm.json").write_text(json.dumps({"vocab_size": 9, "length": 4}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_lm(tmp_path)


def test_a_trained_reference_lm_prefers_grammatical_text():
    texts = build_scenes(CFG, "ref").texts
    tok = train_tokenizer(texts, "word")
    lm = train_reference_lm(tok.encode(texts), tok.vocab_size, tok.bos_id, tok.pad_id, steps=60, batch=32)
    good = perplexity(lm, tok.encode(texts[:20]), tok.bos_id, tok.pad_id)
    shuffled = [" ".join(reversed(t.split())) for t in texts[:20]]
    bad = perplexity(lm, tok.encode(shuffled), tok.bos_id, tok.pad_id)
    assert good < 4 and 2 * good < bad and math.isfinite(bad)
