"""`python -m attnlab` (and `torchrun -m attnlab`, `accelerate launch -m attnlab`) runs the CLI."""

from attnlab.cli.main import main

main()
