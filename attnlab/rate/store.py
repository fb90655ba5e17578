"""The ratings database: POC_DIR/ratings.sqlite (SQLite in WAL mode), one row per vote, each vote its
own committed transaction, so a killed server loses no vote it answered and raters writing at once
wait for each other instead of losing a vote.

A file there that is not a ratings database is refused by name and never written to.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import secrets
import sqlite3
import threading
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from attnlab.errors import AttnlabError, DataError
from attnlab.io import write_text
from attnlab.rate.poc import QUESTIONS, Item, Pair, RatedPoc

FILE = "ratings.sqlite"
SCHEMA_VERSION = "1"
CHOICES = ("left", "right", "tie", "skip")
HEADER = b"SQLite format 3\x00"
BUSY_MS = 30_000  # how long a writer waits for another's transaction before giving up

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rater TEXT NOT NULL,
    question TEXT NOT NULL CHECK (question IN {QUESTIONS}),
    prompt TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    train_seed INTEGER NOT NULL,
    left_variant TEXT NOT NULL,
    right_variant TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN {CHOICES}),
    created TEXT NOT NULL,
    page_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_by_rater ON votes (rater, id);
"""


class RatingsError(DataError):
    """A ratings file that is not a readable ratings database."""


class UnknownPair(AttnlabError):
    """A vote about a pair of samples the PoC does not hold."""


@dataclass(frozen=True)
class Vote:
    """One row of the votes table."""

    id: int
    rater: str
    question: str
    prompt: str
    prompt_index: int
    seed: int
    train_seed: int
    left: str
    right: str
    choice: str
    created: str
    page_version: str

    @property
    def pair(self) -> Pair:
        item = Item(self.train_seed, self.seed, self.prompt_index, self.prompt)
        return Pair(item, self.left, self.right)

    @property
    def winner(self) -> str | None:
        """The preferred variant's name; None for a tie or a skip."""
        return {"left": self.left, "right": self.right}.get(self.choice)


COLUMNS = "id, rater, question, prompt, prompt_index, seed, train_seed, left_variant, right_variant, choice, created, page_version"


class Ratings:
    """The votes of one PoC.

    Args:
        path: the database file (created with its tables when missing).
        poc: the PoC the votes are about; `record` refuses pairs it does not hold.
        create: make the file when it is missing (else a missing file reads as no votes).
    Raises:
        RatingsError: the file is there but is not a readable ratings database (it is left as it is).
    """

    def __init__(self, path: str | Path, poc: RatedPoc | None = None, create: bool = True):
        self.path, self.poc = Path(path), poc
        self._local = threading.local()
        self.exists = self.path.is_file() and self._check()
        if create and not self.exists:
            self._create()
            self.exists = True

    @classmethod
    def of(cls, poc: RatedPoc) -> Ratings:
        """The ratings of a PoC, in its folder."""
        return cls(poc.root / FILE, poc)

    # The file

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
        return conn

    def _check(self) -> bool:
        """Read-only checks before anything may write: the header, the integrity, the tables.
        Returns whether the file holds the ratings tables (False: empty, SQLite may make it one)."""
        how = "it is left as it is; move it aside to start a new one"
        try:
            with self.path.open("rb") as f:
                head = f.read(len(HEADER))
        except OSError as e:
            raise RatingsError(f"{self.path}: cannot be read ({e})") from None
        if head and head != HEADER:
            raise RatingsError(f"{self.path}: not an SQLite database, so not a ratings file; {how}")
        if not head:
            return False
        try:
            conn = self._connect()
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            self.close()
            raise RatingsError(f"{self.path}: a damaged database ({e}); {how}") from None
        if ok != "ok":
            self.close()
            raise RatingsError(f"{self.path}: a damaged database (integrity check: {ok}); {how}")
        if tables and not {"meta", "votes"} <= tables:
            self.close()
            raise RatingsError(
                f"{self.path}: an SQLite database without the ratings tables (it has {', '.join(sorted(tables))}); {how}"
            )
        version = self._meta("schema") if tables else SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            self.close()
            raise RatingsError(
                f"{self.path}: ratings schema {version!r}, this attnlab reads {SCHEMA_VERSION!r}; {how}"
            )
        return bool(tables)

    def _create(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")  # kept in the file: readers never block the writer
        conn.executescript(SCHEMA)
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            c.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(16),))

    def _write(self):
        return _Transaction(self._connect())

    def _meta(self, key: str) -> str | None:
        row = self._connect().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def secret(self) -> str:
        """A random key made with the file: the page's opaque ids of pairs and samples derive from it."""
        return self._meta("secret") or ""

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # Votes

    def record(self, rater: str, question: str, pair: Pair, choice: str, page_version: str = "") -> Vote:
        """Add one vote (committed when this returns).

        Raises:
            UnknownPair: the PoC does not hold this pair of samples.
            ValueError: a question or choice outside QUESTIONS or CHOICES, or an empty rater name.
        """
        if self.poc is not None and not self.poc.holds(pair):
            raise UnknownPair(
                f"the PoC in {self.poc.root} holds no pair {pair.left!r} / {pair.right!r} of training seed "
                f"{pair.item.train_seed}, seed {pair.item.seed}, sample {pair.item.index}"
            )
        if question not in QUESTIONS or choice not in CHOICES or not rater.strip():
            raise ValueError(f"question {question!r}, choice {choice!r}, rater {rater!r}")
        it = pair.item
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        row = (
            rater.strip(),
            question,
            it.prompt,
            it.index,
            it.seed,
            it.train_seed,
            pair.left,
            pair.right,
            choice,
            created,
            page_version,
        )
        with self._write() as c:
            cur = c.execute(
                f"INSERT INTO votes ({COLUMNS.partition(', ')[2]}) VALUES ({', '.join('?' * len(row))})", row
            )
        return Vote(cur.lastrowid, *row)

    def undo(self, rater: str, questions: tuple[str, ...] = QUESTIONS) -> Vote | None:
        """Remove the rater's latest vote on one of `questions`; returns it (None: nothing to undo)."""
        marks = ", ".join("?" * len(questions))
        with self._write() as c:
            row = c.execute(
                f"SELECT {COLUMNS} FROM votes WHERE rater = ? AND question IN ({marks}) ORDER BY id DESC LIMIT 1",
                (rater.strip(), *questions),
            ).fetchone()
            if row is not None:
                c.execute("DELETE FROM votes WHERE id = ?", (row[0],))
        return None if row is None else Vote(*row)

    def votes(self, rater: str | None = None) -> list[Vote]:
        """Every vote (or one rater's), oldest first."""
        if not self.exists:
            return []
        where, args = ("WHERE rater = ?", (rater.strip(),)) if rater is not None else ("", ())
        try:
            rows = (
                self._connect().execute(f"SELECT {COLUMNS} FROM votes {where} ORDER BY id", args).fetchall()
            )
        except sqlite3.DatabaseError as e:
            raise RatingsError(f"{self.path}: the votes cannot be read ({e})") from None
        return [Vote(*r) for r in rows]

    def digest(self) -> str | None:
        """A short hash of every vote (None without votes): it changes with each vote and each undo."""
        rows = self.votes()
        if not rows:
            return None
        return hashlib.sha256("\n".join("|".join(map(str, astuple(v))) for v in rows).encode()).hexdigest()[
            :16
        ]

    def export_csv(self, path: str | Path) -> int:
        """Write every vote to a CSV file (whole or not at all), with the winner spelled out; returns the count."""
        rows = self.votes()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        names = [f.name for f in fields(Vote)]
        w.writerow(
            names[:7] + ["left_variant", "right_variant", "choice", "winner", "created", "page_version"]
        )
        for v in rows:
            values = astuple(v)
            w.writerow([*values[:10], v.winner or v.choice, *values[10:]])
        write_text(path, buf.getvalue())
        return len(rows)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): a writer takes the lock before it reads."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind, value, tb) -> None:
        self.conn.execute("ROLLBACK" if kind else "COMMIT")
