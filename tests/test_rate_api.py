"""The rating page's API (FastAPI's TestClient) on real tiny PoCs, native, audio and pipeline: pairs
of one item with names hidden, votes committed before the next pair, undo, refused votes, samples
served as the PoC drew them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from PIL import Image
from rate_util import NAMES, copy_poc, pipeline_poc, shapes_poc, tones_poc

from attnlab.rate import RatedPoc, Ratings
from attnlab.rate.server import PAGE_VERSION, create_app


def client(poc_dir, question="quality", per_pair=2) -> TestClient:
    return TestClient(create_app(RatedPoc(poc_dir), question, per_pair))


@pytest.fixture
def poc_dir(tmp_path, tmp_path_factory):
    return copy_poc(shapes_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc")


def _vote(c: TestClient, ask: dict, choice: str, rater: str = "ann"):
    body = {"rater": rater, "pair": ask["pair"]["id"], "question": ask["pair"]["question"], "choice": choice,
            "page_version": PAGE_VERSION}  # fmt: skip
    return c.post("/api/vote", json=body)


def test_a_pair_shows_one_item_of_two_variants_with_the_names_hidden(poc_dir):
    c = client(poc_dir)
    page = c.get("/")
    assert page.status_code == 200 and "Which one" in page.text and PAGE_VERSION in page.text
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    assert ask["progress"] == {"done": 0, "total": 2 * 3, "left": 6} and not ask["done"]
    text = json.dumps(ask)
    assert not any(f'"{n}"' in text or f"/{n}" in text for n in NAMES)  # no name, not even in a URL
    pair = c.app.state.ids.pairs[ask["pair"]["id"]]
    assert ask["pair"]["prompt"] == pair.item.prompt
    poc = RatedPoc(poc_dir)
    for side, name in (("left", pair.left), ("right", pair.right)):
        got = c.get(ask["pair"][side])
        assert got.headers["content-type"] == "image/png"
        img = np.asarray(Image.open(io.BytesIO(got.content)))
        want = ((np.clip(poc.sample(name, pair.item), -1, 1) + 1) * 127.5).round().astype(np.uint8)
        assert np.array_equal(img, want.transpose(1, 2, 0))  # the same prompt, seed and training seed


def test_a_vote_is_committed_before_the_next_pair_is_sent(poc_dir):
    c = client(poc_dir)
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    pair = c.app.state.ids.pairs[ask["pair"]["id"]]
    got = _vote(c, ask, "right").json()
    (v,) = Ratings(poc_dir / "ratings.sqlite").votes()  # a connection of its own: what is on disk
    assert got["recorded"] == v.id and v.winner == pair.right and (v.left, v.right) == (pair.left, pair.right)
    assert v.rater == "ann" and v.question == "quality" and v.page_version == PAGE_VERSION
    assert got["progress"]["done"] == 1 and got["pair"]["id"] != ask["pair"]["id"]


def test_undo_asks_the_same_pair_again(poc_dir):
    c = client(poc_dir)
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    _vote(c, ask, "left")
    undone = c.post("/api/undo", json={"rater": "ann"}).json()
    assert undone["undone"] and undone["pair"]["id"] == ask["pair"]["id"] and undone["progress"]["done"] == 0
    assert Ratings(poc_dir / "ratings.sqlite").votes() == []
    assert not c.post("/api/undo", json={"rater": "ann"}).json()["undone"]  # nothing left to undo


def test_refused_votes_leave_no_row(poc_dir):
    c = client(poc_dir)
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    unknown = {**ask, "pair": {**ask["pair"], "id": "0123456789abcdef0123"}}
    assert _vote(c, unknown, "left").status_code == 404  # a pair the PoC does not hold
    assert _vote(c, ask, "better").status_code == 422  # not a choice
    assert _vote(c, ask, "left", rater="").status_code == 422  # no rater
    wrong = {**ask, "pair": {**ask["pair"], "question": "alignment"}}
    assert _vote(c, wrong, "left").status_code == 422  # a question this page does not ask
    assert c.get("/media/nope").status_code == 404
    assert Ratings(poc_dir / "ratings.sqlite").votes() == []


def test_a_rater_who_answered_everything_is_done(poc_dir):
    c = client(poc_dir, per_pair=1)
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    for _ in range(3):
        ask = _vote(c, ask, "tie").json()
    assert ask["done"] and ask["pair"] is None and ask["progress"] == {"done": 3, "total": 3, "left": 0}
    assert not c.get("/api/next", params={"rater": "bob"}).json()["done"]  # another rater starts afresh


def test_both_questions_ask_alignment_after_quality(poc_dir):
    c = client(poc_dir, question="both")
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    then = _vote(c, ask, "left").json()
    assert (ask["pair"]["question"], then["pair"]["question"]) == ("quality", "alignment")
    assert then["pair"]["id"] == ask["pair"]["id"] and then["progress"]["total"] == 2 * 3 * 2


def test_an_audio_poc_gets_two_players(tmp_path, tmp_path_factory):
    out = copy_poc(tones_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc")
    c = client(out)
    assert '"audio": true' in c.get("/").text
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    got = c.get(ask["pair"]["left"])
    assert got.headers["content-type"] == "audio/wav"
    wave, sr = sf.read(io.BytesIO(got.content))
    assert sr == 8000 and wave.shape == (1024,)
    assert _vote(c, ask, "right").status_code == 200


def test_a_pipeline_poc_is_rated_like_a_native_one(tmp_path, tmp_path_factory):
    out = copy_poc(pipeline_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc")
    poc = RatedPoc(out)
    assert poc.kind == "pipeline" and poc.variants == ["reference", "tgate"] and len(poc.items) == 3 * 2
    c = client(out)
    ask = c.get("/api/next", params={"rater": "ann"}).json()
    assert ask["pair"]["prompt"] in ("a red car", "a blue cat")
    assert Image.open(io.BytesIO(c.get(ask["pair"]["right"]).content)).size == (32, 32)
    assert _vote(c, ask, "left").json()["progress"]["done"] == 1
