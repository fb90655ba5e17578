"""`attnlab rate`: blind A/B human ratings of a finished PoC's samples, on a local web page; votes in
POC_DIR/ratings.sqlite, their verdict in the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

Question = Literal["quality", "alignment", "both"]


def rate_command(
    poc_dir: Annotated[
        Path, typer.Argument(help="A finished PoC directory (what `attnlab poc --out` wrote).")
    ],
    host: Annotated[
        str, typer.Option(help="Address to serve on; 0.0.0.0 shares the page on the network (deliberately).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on (0: any free one).")] = 8000,
    question: Annotated[
        Question,
        typer.Option(
            help="What raters are asked: quality, alignment (the prompt shown prominently), or both."
        ),
    ] = "quality",
    per_pair: Annotated[int, typer.Option(help="Items of each variant pair one rater is asked.", min=1)] = 3,
    export: Annotated[
        Path | None, typer.Option(help="Write every vote to this CSV file instead of serving.")
    ] = None,
    report: Annotated[
        bool, typer.Option("--report", help="Redraw the PoC's report with the votes instead of serving.")
    ] = False,
):
    """Serve a blind A/B rating page for a PoC's variants (or export the votes, or redraw the report).

    Each page shows two variants' samples of the same prompt, sampling seed and training seed, side
    by side in random order with the names hidden. Keys: left / right arrow (that one is better),
    down or T (tie), S (skip), U (undo)."""
    from attnlab.rate.poc import RatedPoc
    from attnlab.rate.store import Ratings

    poc = RatedPoc(poc_dir)
    if export is not None or report:
        if export is not None:
            n = Ratings.of(poc).export_csv(export)
            typer.echo(f"{n} votes written to {export}")
        if report:
            _redraw(poc_dir)
        return
    if question != "quality" and not poc.conditioned:
        raise _error(f"{poc_dir}: an unconditional PoC has no prompt to align with; ask --question quality")
    from attnlab.rate.server import serve

    serve(poc, host, port, question, per_pair, echo=typer.echo)


def _redraw(poc_dir: Path) -> None:
    from attnlab.rate.verdict import redraw_report

    results = redraw_report(poc_dir)
    human = results.get("human_preference")
    typer.echo(f"{human['votes'] if human else 0} votes; report: {poc_dir / 'report.html'} (and report.md)")
    for q, a in (human or {}).get("questions", {}).items():
        typer.echo(f"{q}: Bradley-Terry score [95% interval]")
        for name, s in sorted(a["scores"].items(), key=lambda kv: -kv[1]["score"]):
            typer.echo(f"  {name:<24} {s['score']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}]")


def _error(message: str):
    from attnlab.errors import ConfigError

    return ConfigError(message)


def register(app: typer.Typer) -> None:
    app.command("rate")(rate_command)
