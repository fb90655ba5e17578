"""The ratings database and the pair schedule on a real tiny PoC: one committed row per vote, undo,
refused pairs, writers in several processes at once, the export, refused ratings files left whole,
and a schedule that shows every variant pair about equally often."""

from __future__ import annotations

import csv
import multiprocessing
import random
import sqlite3
from collections import Counter

import pytest
from rate_util import NAMES, copy_poc, shapes_poc

from attnlab.rate import Item, NotAFinishedPoc, Pair, RatedPoc, Ratings, RatingsError, UnknownPair
from attnlab.rate.schedule import Schedule


@pytest.fixture
def poc(tmp_path, tmp_path_factory) -> RatedPoc:
    return RatedPoc(copy_poc(shapes_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc"))


def test_the_poc_offers_every_item_of_every_seed(poc):
    assert poc.variants == NAMES and poc.reference == "base" and not poc.audio
    assert len(poc.items) == 2 * 3 * 4  # training seeds x sampling seeds x prompts
    assert {(it.train_seed, it.seed) for it in poc.items} == {(t, s) for t in (0, 1) for s in (0, 1, 2)}
    assert all(it.prompt == poc.prompts[it.index] for it in poc.items)
    x = poc.sample("pag", poc.items[-1])
    assert x.shape == (3, 16, 16) and -1.0 <= x.min() <= x.max() <= 1.0


def test_a_vote_is_one_committed_row(poc):
    ratings = Ratings.of(poc)
    pair = Pair(poc.items[5], "pag", "base")
    v = ratings.record("ann", "quality", pair, "left", "v1")
    assert v.winner == "pag"
    other = Ratings(poc.root / "ratings.sqlite")  # another connection sees it at once: committed
    (row,) = other.votes()
    assert row == v and row.pair == pair and row.prompt == poc.items[5].prompt and row.page_version == "v1"
    mode = sqlite3.connect(poc.root / "ratings.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_undo_takes_back_the_raters_own_latest_vote(poc):
    ratings = Ratings.of(poc)
    a = ratings.record("ann", "quality", Pair(poc.items[0], "base", "pag"), "left")
    b = ratings.record("bob", "quality", Pair(poc.items[1], "base", "pag"), "tie")
    c = ratings.record("ann", "quality", Pair(poc.items[2], "attn16", "pag"), "skip")
    assert ratings.undo("ann") == c
    assert ratings.votes() == [a, b]
    assert ratings.undo("ann") == a and ratings.undo("ann") is None
    assert ratings.votes() == [b]


def test_a_pair_the_poc_does_not_hold_is_refused(poc):
    ratings = Ratings.of(poc)
    it = poc.items[0]
    for pair in (
        Pair(it, "base", "nobody"),  # no such variant
        Pair(it, "base", "base"),  # a variant against itself
        Pair(Item(0, 0, 99, it.prompt), "base", "pag"),  # no such sample
        Pair(Item(7, 0, 0, it.prompt), "base", "pag"),  # no such training seed
        Pair(Item(0, 0, 0, "another prompt"), "base", "pag"),  # not the prompt the item was drawn for
    ):
        with pytest.raises(UnknownPair, match="holds no pair"):
            ratings.record("ann", "quality", pair, "left")
    with pytest.raises(ValueError):
        ratings.record("ann", "quality", Pair(it, "base", "pag"), "both")
    assert ratings.votes() == []


def _write_votes(path: str, rater: str, n: int) -> None:
    poc = RatedPoc(path)
    ratings = Ratings.of(poc)
    rng = random.Random(rater)
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        ratings.record(
            rater, "quality", Pair(rng.choice(poc.items), a, b), rng.choice(["left", "right", "tie"])
        )


def test_writers_in_several_processes_lose_nothing(poc):
    Ratings.of(poc)  # the file exists before the writers start
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_votes, args=(str(poc.root), f"rater-{i}", 25)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    votes = Ratings.of(poc).votes()
    assert len(votes) == 100 and len({v.id for v in votes}) == 100
    assert Counter(v.rater for v in votes) == {f"rater-{i}": 25 for i in range(4)}


def test_export_writes_every_vote(poc, tmp_path):
    ratings = Ratings.of(poc)
    ratings.record("ann", "quality", Pair(poc.items[3], "attn16", "base"), "right")
    ratings.record("bob", "alignment", Pair(poc.items[4], "pag", "base"), "tie")
    assert ratings.export_csv(tmp_path / "votes.csv") == 2
    rows = list(csv.DictReader((tmp_path / "votes.csv").open()))
    assert [r["winner"] for r in rows] == ["base", "tie"]
    assert rows[0]["left_variant"] == "attn16" and rows[0]["train_seed"] == str(poc.items[3].train_seed)
    assert rows[1]["question"] == "alignment" and rows[1]["prompt"] == poc.items[4].prompt


@pytest.mark.parametrize("kind", ["garbage", "damaged", "foreign"])
def test_a_ratings_file_that_is_not_one_is_refused_and_left_whole(poc, kind):
    path = poc.root / "ratings.sqlite"
    if kind == "garbage":
        path.write_bytes(b"these are not votes\n" * 50)
    elif kind == "damaged":
        Ratings.of(poc).record("ann", "quality", Pair(poc.items[0], "base", "pag"), "left")
        sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
        data = bytearray(path.read_bytes())
        data[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree, past the header
        path.write_bytes(bytes(data))
        for side in path.parent.glob("ratings.sqlite-*"):
            side.unlink()
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE shopping (item TEXT)")
    before = path.read_bytes()
    with pytest.raises(RatingsError, match="ratings.sqlite") as e:
        Ratings.of(poc)
    assert "\n" not in str(e.value) and "left as it is" in str(e.value)
    assert path.read_bytes() == before


def test_a_folder_that_is_not_a_finished_poc(tmp_path, poc):
    with pytest.raises(NotAFinishedPoc, match="no results.json"):
        RatedPoc(tmp_path)
    next((poc.root / "variants" / "pag").rglob("seed-1.safetensors")).unlink()
    with pytest.raises(NotAFinishedPoc, match="'pag' has no samples"):
        RatedPoc(poc.root)


# The schedule


def _rate_all(schedule: Schedule, ratings: Ratings, raters: list[str]) -> None:
    """Raters take turns until each has answered everything asked of them."""
    rng = random.Random(0)
    left = set(raters)
    while left:
        r = rng.choice(sorted(left))
        ask = schedule.next(ratings.votes(), r)
        if ask is None:
            left.discard(r)
            continue
        ratings.record(r, ask.question, ask.pair, rng.choice(["left", "right", "tie", "skip"]))


def test_the_schedule_asks_every_pair_equally_often_and_raters_share_items(poc):
    ratings = Ratings.of(poc)
    schedule = Schedule(poc, ("quality",), per_pair=4, rng=random.Random(1))
    _rate_all(schedule, ratings, ["ann", "bob", "cy"])
    votes = ratings.votes()
    per_pair = Counter(v.pair.variants for v in votes)
    assert set(per_pair.values()) == {12} and len(per_pair) == 3  # 3 raters x 4 items, every pair
    for r in ("ann", "bob", "cy"):
        mine = [v for v in votes if v.rater == r]
        assert len(mine) == schedule.total == 12
        assert schedule.progress(mine) == {"done": 12, "total": 12, "left": 0}
        assert len({(v.pair.variants, v.pair.item) for v in mine}) == 12  # nothing asked twice
    shared = Counter((v.pair.variants, v.pair.item) for v in votes)
    assert set(shared.values()) == {3}  # every rater judged the same items: agreement can be measured
    sides = Counter((v.left, v.right) for v in votes)
    assert len(sides) == 6  # both orders of every pair were shown


def test_with_both_questions_alignment_follows_quality_on_the_same_pair(poc):
    ratings = Ratings.of(poc)
    schedule = Schedule(poc, ("quality", "alignment"), per_pair=2)
    first = schedule.next([], "ann")
    ratings.record("ann", first.question, first.pair, "left")
    second = schedule.next(ratings.votes(), "ann")
    assert (first.question, second.question) == ("quality", "alignment") and second.pair == first.pair
    ratings.record("ann", second.question, second.pair, "right")
    third = schedule.next(ratings.votes(), "ann")
    assert third.question == "quality" and third.pair.variants != first.pair.variants
    assert schedule.total == 2 * 3 * 2
