"""The rating page and its API (FastAPI, served by uvicorn): one pair at a time, names hidden behind
opaque ids, each vote committed before the next pair is sent.

    GET  /                 the page
    GET  /api/next?rater=  the next pair and the rater's progress
    POST /api/vote         {rater, pair, question, choice, page_version} -> the next pair
    POST /api/undo         {rater} -> the pair of the vote taken back, asked again
    GET  /media/ID         a sample (PNG or WAV)
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import socket
from collections.abc import Callable
from importlib import resources
from string import Template
from typing import Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

import attnlab
from attnlab.errors import AttnlabError
from attnlab.rate.poc import QUESTIONS, Item, Pair, RatedPoc
from attnlab.rate.schedule import Ask, Schedule
from attnlab.rate.store import Ratings

PAGE = "page.html"
PAGE_TEXT = (resources.files("attnlab.rate") / PAGE).read_text(encoding="utf-8")
PAGE_VERSION = hashlib.sha256((attnlab.__version__ + PAGE_TEXT).encode()).hexdigest()[:12]
QUESTION_MODES = {"quality": ("quality",), "alignment": ("alignment",), "both": QUESTIONS}


class PortInUse(AttnlabError):
    """The port the page should be served on is taken."""


class VoteIn(BaseModel):
    rater: str = Field(min_length=1, max_length=80)
    pair: str = Field(min_length=1, max_length=64)
    question: Literal["quality", "alignment"]
    choice: Literal["left", "right", "tie", "skip"]
    page_version: str = Field(default="", max_length=64)


class UndoIn(BaseModel):
    rater: str = Field(min_length=1, max_length=80)


class Ids:
    """Opaque ids of pairs and samples, keyed by the ratings file's secret: the page never sees a
    variant's name, and an id means the same pair after a restart."""

    def __init__(self, poc: RatedPoc, secret: str):
        self.key = secret.encode()
        self.pairs: dict[str, Pair] = {}
        self.media: dict[str, tuple[str, Item]] = {}
        for it in poc.items:
            for v in poc.variants:
                self.media[self._id("media", v, it)] = (v, it)
                for w in poc.variants:
                    if w != v:
                        pair = Pair(it, v, w)
                        self.pairs[self.pair_id(pair)] = pair

    def _id(self, *parts) -> str:
        text = "|".join(str(p) for p in parts)
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()[:20]

    def pair_id(self, pair: Pair) -> str:
        return self._id("pair", pair.item.train_seed, pair.item.seed, pair.item.index, pair.left, pair.right)

    def media_id(self, variant: str, item: Item) -> str:
        return self._id("media", variant, item)


def create_app(
    poc: RatedPoc, question: str = "quality", per_pair: int = 3, schedule: Schedule | None = None
) -> FastAPI:
    """The rating app of `poc`; votes go to POC_DIR/ratings.sqlite.

    Args:
        poc: a finished PoC.
        question: "quality", "alignment" or "both" (each pair is asked both, one after the other).
        per_pair: items of each variant pair one rater is asked.
        schedule: the pair schedule (default: a `Schedule` of these questions).
    """
    questions = QUESTION_MODES[question]
    ratings = Ratings.of(poc)
    ids = Ids(poc, ratings.secret())
    schedule = schedule or Schedule(poc, questions, per_pair)
    app = FastAPI(title=f"attnlab rate: {poc.title}", docs_url=None, redoc_url=None)
    app.state.ratings, app.state.ids, app.state.schedule = ratings, ids, schedule
    page = Template(PAGE_TEXT).substitute(
        title=_escape(poc.title),
        config=json.dumps({"questions": list(questions), "audio": poc.audio, "page_version": PAGE_VERSION}),
    )

    def answer(rater: str, ask: Ask | None) -> dict:
        mine = ratings.votes(rater)
        out = {"progress": schedule.progress(mine), "done": ask is None, "pair": None}
        if ask is not None:
            p = ask.pair
            out["pair"] = {
                "id": ids.pair_id(p),
                "question": ask.question,
                "prompt": p.item.prompt,
                "left": f"/media/{ids.media_id(p.left, p.item)}",
                "right": f"/media/{ids.media_id(p.right, p.item)}",
            }
        return out

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_pair(rater: str = Query(min_length=1, max_length=80)) -> dict:
        return answer(rater, schedule.next(ratings.votes(), rater))

    @app.post("/api/vote")
    def vote(body: VoteIn) -> dict:
        pair = ids.pairs.get(body.pair)
        if pair is None:
            raise HTTPException(
                404, "this PoC holds no such pair (the page may be older than the ratings file): reload"
            )
        if body.question not in questions:
            raise HTTPException(422, f"this page asks {' and '.join(questions)}, not {body.question}")
        v = ratings.record(body.rater, body.question, pair, body.choice, body.page_version)  # committed here
        return {"recorded": v.id, **answer(body.rater, schedule.next(ratings.votes(), body.rater))}

    @app.post("/api/undo")
    def undo(body: UndoIn) -> dict:
        v = ratings.undo(body.rater, questions)
        ask = Ask(v.pair, v.question) if v is not None else schedule.next(ratings.votes(), body.rater)
        return {"undone": v is not None, **answer(body.rater, ask)}

    @app.get("/media/{media_id}")
    def media(media_id: str) -> Response:
        found = ids.media.get(media_id)
        if found is None:
            raise HTTPException(404, "no such sample")
        data, kind = poc.media(*found)
        return Response(data, media_type=kind, headers={"Cache-Control": "private, max-age=86400"})

    return app


def _escape(text: str) -> str:
    import html

    return html.escape(text).replace("$", "$$")


# Serving


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one).

    Raises:
        PortInUse: naming the port and how to pick another.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is in use: pick another with --port (or --port 0 for any free one)"
            ) from None
        raise PortInUse(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def serve(poc: RatedPoc, host: str = "127.0.0.1", port: int = 8000, question: str = "quality", per_pair: int = 3,
          echo: Callable[[str], None] = print) -> None:  # fmt: skip
    """Serve the rating page until Ctrl-C (or SIGTERM); says the address first."""
    import uvicorn

    app = create_app(poc, question, per_pair)  # a ratings file that is not one stops here, before binding
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    echo(
        f"rating page: http://{shown}:{sock.getsockname()[1]}/ ({len(poc.variants)} variants, {question}; Ctrl-C stops)"
    )
    echo(f"votes: {poc.root / 'ratings.sqlite'}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
