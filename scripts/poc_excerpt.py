"""Print the README's excerpt of a finished PoC: its summary bullets and a compact table of the
headline numbers, from results.json (`python scripts/poc_excerpt.py runs/poc-shapes`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnlab.poc.metrics import ALL, Stat, show

COLUMNS = [
    ("fid", "FID"),
    ("all_correct", "all asked right"),
    ("shape_acc", "shape right"),
    ("heatmap_iou", "heat-map IoU"),
    ("latency_s", "latency / sample"),
    ("flops_per_sample", "FLOPs / sample"),
    ("train_seconds", "training"),
]


def excerpt(results: dict) -> str:
    lines = [f"- {s}" for s in results["summary"]["sentences"]]
    have = [(k, label) for k, label in COLUMNS if any(k in v["metrics"] for v in results["variants"])]
    lines += ["", "| variant | level | " + " | ".join(label for _, label in have) + " |"]
    lines.append("|---|---|" + "---|" * len(have))
    floor = results.get("real_data")
    if floor:
        cells = [_cell(k, floor["metrics"].get(k)) if k in floor["metrics"] else "–" for k, _ in have]
        lines.append("| real data | – | " + " | ".join(cells) + " |")
    for v in results["variants"]:
        levels = ", ".join(f"L{lv}" for lv in v["levels"]) or "–"
        cells = []
        for k, _ in have:
            if k == "train_seconds" and v["trained_by"] != v["name"]:
                cells.append(f"(reuses {v['trained_by']})")
            else:
                cells.append(_cell(k, v["metrics"].get(k)))
        lines.append(f"| `{v['name']}` | {levels} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(key: str, stat: dict | None) -> str:
    return show(ALL[key], Stat.from_dict(stat) if stat else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("poc_dir", type=Path)
    args = parser.parse_args()
    print(excerpt(json.loads((args.poc_dir / "results.json").read_text())))


if __name__ == "__main__":
    main()
