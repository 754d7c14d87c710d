"""ferkit command line: a thin layer over the library (each command parses, calls, prints).

One module per pipeline stage registers its commands on the shared Typer `app`:
training (train, models, reproduce), evaluation (evaluate, ensemble), inference (predict, demo, explain),
serving (export, serve).
"""

import os
import sys

# isort: off
# Importing a command module registers its commands; this order is the order of `ferkit --help`.
from ferkit.cli import training, evaluation, inference, serving  # noqa: F401
from ferkit.cli._app import app
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """The `ferkit` command (and `python -m ferkit`).

    A process that torchrun started (WORLD_SIZE > 1) ends with os._exit once its command has returned: its process
    group is gone by then (`ferkit.training.distributed.processes`), but in about one launch in thirty under load a
    worker still aborted in the interpreter's teardown, after the last Python frame ("terminate called without an
    active exception", SIGABRT: torch's gloo threads and C++ static destructors), which failed a run that had
    finished and saved everything. Its output is flushed first; an exception other than SystemExit ends the process
    as usual, with its traceback."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app()
        return
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, and status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
