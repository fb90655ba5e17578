"""Human judgement of a finished PoC: a blind A/B rating page, its votes in SQLite, and the verdict
(Bradley-Terry scores with bootstrap intervals) folded into the PoC report.

    attnlab rate runs/poc-shapes                      # serve the page on http://127.0.0.1:8000/
    attnlab rate runs/poc-shapes --export votes.csv   # every vote, one row each
    attnlab rate runs/poc-shapes --report             # redraw the report with a Human preference section

Votes live in POC_DIR/ratings.sqlite; rerunning `attnlab poc` redraws the report when they change.
"""

from attnlab.rate.poc import Item, NotAFinishedPoc, Pair, RatedPoc
from attnlab.rate.store import Ratings, RatingsError, UnknownPair, Vote

__all__ = ["Item", "NotAFinishedPoc", "Pair", "RatedPoc", "Ratings", "RatingsError", "UnknownPair", "Vote"]
