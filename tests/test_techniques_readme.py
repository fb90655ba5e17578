"""The README's techniques table is the registry's, and the registry is complete on a fresh import."""

import subprocess
import sys
from pathlib import Path

from attnlab.techniques.table import README_BEGIN, README_END, readme_block

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_generated_from_the_registry():
    text = (ROOT / "README.md").read_text()
    block = text[text.index(README_BEGIN) : text.index(README_END) + len(README_END)]
    assert block == readme_block(), "README techniques table is stale: rerun `attnlab techniques --markdown`"


def test_every_level_has_a_technique_in_a_fresh_process():
    code = "from attnlab.techniques import techniques; print(sorted({t.level for t in techniques()}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1, 2, 3, 4, 5]"
