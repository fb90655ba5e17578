"""The `attnlab` command: the commands of every room, each registered by its command module."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on shared cores a spinning team of two threads ran
# a forward pass 7-11x slower than one thread, a sleeping team as fast as one thread. Set before
# anything imports torch; a value in the environment (e.g. OMP_WAIT_POLICY=ACTIVE) wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from attnlab.cli import control, cost, datasets, evaluator, poc, rate, sample, techniques, train  # noqa: E402
from attnlab.errors import AttnlabError  # noqa: E402

# Each exposes register(app), which adds its commands.
COMMAND_MODULES = (datasets, train, sample, control, techniques, poc, rate, evaluator, cost)


class _Group(TyperGroup):
    """Turns a user-facing AttnlabError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttnlabError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    cls=_Group,
    name="attnlab",
    help="Attention in diffusion models, by level: build, train, control and measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register(app: typer.Typer) -> None:
    for module in COMMAND_MODULES:
        module.register(app)


_register(app)


def main() -> None:
    from attnlab.runtime import tune_malloc

    tune_malloc()
    app()


if __name__ == "__main__":
    main()
