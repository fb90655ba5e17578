"""benchmarks/diffusers_controls.py runs end to end in its --quick mode (a tiny U-Net, one step) and
reports every row; speed itself is the benchmark's business, not the test's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "diffusers_controls.py"
CONTROLS = ["empty scope", "idle controls", "ToMe", "T-GATE", "PAG", "SAG", "heat maps"]


def test_quick_benchmark_reports_every_row(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("tomesd", reason="tomesd, the token-merging peer (make setup installs the peers)")
    pytest.importorskip("tgate", reason="the T-GATE peer: pip install tgate==1.0.0 --no-deps")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "diffusers_controls.json").read_text())["results"]
    assert len(results) == len(CONTROLS)
    for name, r in zip(CONTROLS, results):
        assert name in r["control"]
        assert r["ours_s"][0] > 0 and r["peer_s"][0] > 0 and isinstance(r["met"], bool)
    table = (tmp_path / "diffusers_controls.md").read_text()
    assert all(r["control"] in table for r in results)
    assert table.count("\n| ") == len(CONTROLS) + 1  # the header and one line per row

    by_name = {r["control"]: r for r in results}
    # outputs that should agree do: the untouched pipeline, and each peer that computes the same thing
    for r in results:
        if "no control" in r["control"] or r["control"].startswith(("T-GATE", "PAG", "SAG")):
            assert r["equal"], (r["control"], r["max_abs_diff"])
    assert by_name[results[0]["control"]]["max_abs_diff"] == 0.0
