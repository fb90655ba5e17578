"""Run the PoCs behind examples/findings/claims.yaml and write docs/findings.md from their reports.

    .venv/bin/python scripts/findings.py list                    # the claims, their runs and commands
    .venv/bin/python scripts/findings.py run                     # every unfinished PoC, one at a time
    .venv/bin/python scripts/findings.py run --only tgate-keeps-fid
    .venv/bin/python scripts/findings.py report                  # docs/findings.md (numbers = the reports')
                                                                 # and the reports under docs/findings/

A killed `run` resumes where it stopped (each PoC resumes itself); a finished PoC is not rerun.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from attnlab.errors import AttnlabError
from attnlab.io import write_text
from attnlab.poc.findings import (
    command,
    findings_markdown,
    load_claims,
    publish_reports,
    read_results,
    run_name,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("list", "run", "report"))
    p.add_argument("--claims", type=Path, default=Path("examples/findings/claims.yaml"))
    p.add_argument("--runs", type=Path, default=Path("runs/findings"), help="where the PoCs write their runs")
    p.add_argument("--out", type=Path, default=Path("docs/findings.md"))
    p.add_argument(
        "--reports",
        type=Path,
        default=Path("findings"),
        help="where the reports are copied, relative to --out's folder",
    )
    p.add_argument("--only", nargs="*", help="claim ids (run: only their PoCs)")
    return p.parse_args()


def main() -> int:
    a = parse_args()
    try:
        claims = load_claims(a.claims)
        picked = [c for c in claims if not a.only or c.id in a.only]
        if a.only and len(picked) < len(set(a.only)):
            unknown = sorted(set(a.only) - {c.id for c in claims})
            raise AttnlabError(f"--only: no claim {', '.join(unknown)} in {a.claims}")
        if a.action == "list":
            for c in picked:
                done = read_results(a.runs / run_name(c)) is not None
                print(f"{c.id:24s} {'done' if done else 'to run':7s} {command(c, a.claims.parent, a.runs)}")
        elif a.action == "run":
            run_all(picked, a)
        else:
            copied = publish_reports(claims, a.runs, a.out.parent / a.reports)
            print(f"copied {len(copied)} report file(s) to {a.out.parent / a.reports}")
            print(f"wrote {write_text(a.out, findings_markdown(claims, a.claims, a.runs, a.reports))}")
    except AttnlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_all(claims, a) -> None:
    """Each distinct PoC of `claims` that has not finished, in order."""
    seen = set()
    for c in claims:
        name = run_name(c)
        if name in seen or read_results(a.runs / name) is not None:
            continue
        seen.add(name)
        cmd = command(c, a.claims.parent, a.runs)
        print(f"== {c.id}: {cmd}", flush=True)
        exe = Path(sys.executable).with_name("attnlab")
        argv = [str(exe) if exe.exists() else "attnlab", *shlex.split(cmd)[1:]]
        subprocess.run(argv, check=True)


if __name__ == "__main__":
    sys.exit(main())
