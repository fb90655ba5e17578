"""`attnlab datasets`: the built-in datasets and what each yields."""

from __future__ import annotations

import typer


def datasets_command():
    """List the built-in datasets: modality, sizes, classes and what each sample holds."""
    from attnlab.data import describe_datasets

    rows = describe_datasets()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['modality']}, {r['sizes']}; classes: {r['classes']}")
        typer.echo(f"{'':<{width}}  {r['description']}")


def register(app: typer.Typer) -> None:
    app.command("datasets")(datasets_command)
