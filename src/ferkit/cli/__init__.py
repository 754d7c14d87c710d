"""ferkit command line: a thin layer over the library (each command parses, calls, prints).

One module per pipeline stage registers its commands on the shared Typer `app`:
training (train, models, reproduce), evaluation (evaluate, ensemble), inference (predict, demo, explain),
serving (export, serve).
"""

# isort: off
# Importing a command module registers its commands; this order is the order of `ferkit --help`.
from ferkit.cli import training, evaluation, inference, serving  # noqa: F401
from ferkit.cli._app import app
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    app()
