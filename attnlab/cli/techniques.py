"""`attnlab techniques`: the registry of attention designs, by level."""

from __future__ import annotations

import typer


def techniques_cmd(
    level: int = typer.Option(None, "--level", "-l", min=1, max=5, help="Only this level (1-5)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the README's markdown block."),
):
    """List every registered attention technique: level, paper, training-free or not, options."""
    from rich.console import Console
    from rich.table import Table

    from attnlab.techniques.registry import LEVELS, techniques
    from attnlab.techniques.table import HEADER, readme_block, row

    if markdown:
        typer.echo(readme_block())
        return
    keep = (0, 1, 2, 3, 4, 5, 7)  # the paper and options are in `--markdown` and the README
    table = Table(*[HEADER[i] for i in keep], title="attnlab techniques")
    for t in techniques(level):
        cells = row(t)
        table.add_row(*[cells[i].replace("`", "") for i in keep])
    Console().print(table)
    for k, v in LEVELS.items():
        if level in (None, k):
            typer.echo(f"L{k}: {v}")


def register(app: typer.Typer) -> None:
    app.command("techniques")(techniques_cmd)
