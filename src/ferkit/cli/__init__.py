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

    A torchrun worker (a process whose command made a process group with torchrun's others:
    `ferkit.training.distributed.processes`) ends with os._exit once its command has returned. Its group is gone by
    then, but in about one launch in thirty under load a worker still aborted in the interpreter's teardown, after
    the last Python frame ("terminate called without an active exception", SIGABRT: torch's gloo threads and C++
    static destructors), which failed a run that had finished and saved everything. Its output is flushed first;
    an exception other than SystemExit ends the process as usual, with its traceback. Every other process exits as
    Python does."""
    try:
        app()
    except SystemExit as e:
        distributed = sys.modules.get("ferkit.training.distributed")  # not imported: no group was made
        if distributed is None or not distributed.made_process_group():
            raise
        _exit_now(e.code)


def _exit_now(code: object) -> None:
    """os._exit with the status Python would give SystemExit(code): None is 0, a message is printed and is 1."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code or 0)
