"""The rating page in a real browser: Debian's headless Chromium driven by Playwright (its own
browser download needs the internet, so `executable_path` points at /usr/bin/chromium). A rater
gives a name, votes with the keyboard, undoes one, reloads: the database holds the votes and the
page the progress, and the name is remembered."""

from __future__ import annotations

import os
import shutil

import pytest
from rate_util import copy_poc, shapes_poc, start_server

from attnlab.rate import Ratings

CHROMIUM = os.environ.get("ATTNLAB_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)


@pytest.fixture
def served(tmp_path, tmp_path_factory):
    poc_dir = copy_poc(shapes_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc")
    proc, url = start_server(poc_dir, "--per-pair", "2")
    yield poc_dir, url
    proc.terminate()
    proc.wait(30)


def test_vote_with_the_keyboard_reload_and_find_the_votes(served, tmp_path):
    poc_dir, url = served
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url + "/")
            page.fill("#name", "ann")
            page.press("#name", "Enter")
            progress = page.locator("#progress")
            sync_api.expect(progress).to_contain_text("0 of 6 rated")
            for key, done in (("ArrowLeft", 1), ("ArrowRight", 2), ("t", 3), ("s", 4), ("u", 3)):
                page.keyboard.press(key)
                sync_api.expect(progress).to_contain_text(f"{done} of 6 rated")
            page.wait_for_function(
                "() => [...document.querySelectorAll('figure img')].every(i => i.naturalWidth)"
            )
            assert page.locator("#left img").evaluate("img => img.naturalWidth") == 16  # the sample itself
            page.reload()
            sync_api.expect(progress).to_contain_text("3 of 6 rated · 3 left")
            assert page.locator("#rater").inner_text() == "ann"  # kept in the browser
            assert page.locator("#namebox").is_hidden()
        finally:
            browser.close()
    votes = Ratings(poc_dir / "ratings.sqlite").votes()
    assert [(v.rater, v.choice) for v in votes] == [("ann", "left"), ("ann", "right"), ("ann", "tie")]
