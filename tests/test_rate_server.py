"""The rating server as raters meet it: `attnlab rate` in a subprocess on the address it prints,
raters voting at once over HTTP losing nothing, and a server killed with SIGKILL losing no vote it
had answered; after a restart the same pairs keep their ids."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest
from rate_util import copy_poc, shapes_poc, start_server

from attnlab.rate import Ratings


@pytest.fixture
def poc_dir(tmp_path, tmp_path_factory):
    return copy_poc(shapes_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc")


def _rate(url: str, rater: str, n: int, choice: str = "left") -> list[int]:
    """Vote `n` times as `rater`; returns the recorded vote ids."""
    ids = []
    with httpx.Client(base_url=url, timeout=60) as c:
        ask = c.get("/api/next", params={"rater": rater}).json()
        for _ in range(n):
            body = {"rater": rater, "pair": ask["pair"]["id"], "question": "quality", "choice": choice}
            r = c.post("/api/vote", json=body)
            r.raise_for_status()
            ask = r.json()
            ids.append(ask["recorded"])
    return ids


def test_raters_voting_at_once_lose_nothing(poc_dir):
    proc, url = start_server(poc_dir, "--per-pair", "8")
    try:
        assert url.startswith("http://127.0.0.1:")
        got: dict[str, list[int]] = {}
        threads = [
            threading.Thread(target=lambda r=r: got.setdefault(r, _rate(url, r, 10)))
            for r in ("ann", "bob", "cy")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        proc.terminate()
        proc.wait(30)
    votes = Ratings(poc_dir / "ratings.sqlite").votes()
    assert len(votes) == 30 and sorted(v.id for v in votes) == sorted(i for ids in got.values() for i in ids)
    assert {r: sum(v.rater == r for v in votes) for r in got} == {"ann": 10, "bob": 10, "cy": 10}


def test_a_killed_server_loses_no_answered_vote(poc_dir):
    proc, url = start_server(poc_dir)
    try:
        answered = _rate(url, "ann", 5, "right")
        with httpx.Client(base_url=url) as c:
            pending = c.get("/api/next", params={"rater": "ann"}).json()["pair"]["id"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    votes = Ratings(poc_dir / "ratings.sqlite").votes()
    assert [v.id for v in votes] == answered and {v.choice for v in votes} == {"right"}
    proc, url = start_server(poc_dir)  # a restart finds them, and the page's pair is still valid
    try:
        with httpx.Client(base_url=url) as c:
            ask = c.get("/api/next", params={"rater": "ann"}).json()
            assert ask["progress"]["done"] == 5
            body = {"rater": "ann", "pair": pending, "question": "quality", "choice": "tie"}
            assert c.post("/api/vote", json=body).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(Ratings(poc_dir / "ratings.sqlite").votes()) == 6
