"""The Typer app every command registers on, and what the command modules share."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape as literal  # help texts are Rich markup: `ferkit[onnx]` would lose "[onnx]"

from ferkit.models.weights import SHIPPED_MODELS

WEIGHTS_HELP = ("Weights file (.safetensors: a model or a saved ensemble) written by ferkit, a run directory (its "
                "best.safetensors), or the name of a model shipped in the package "
                f"({' | '.join(SHIPPED_MODELS)}). Default: default.")
BACKEND_HELP = literal("Who runs the emotion model: auto (onnx on CPU when ONNX Runtime is installed, else torch) | "
                       "torch | onnx (ONNX Runtime: ~10x faster per face on CPU, same probabilities; the export is "
                       "made once and cached).")
THREADS_HELP = ("CPU threads for the models (at least 1; more than this process may use is lowered). Default: the "
                "CPUs this process may use (affinity mask, cgroup CPU quota).")
TTA_HELP = ("Test-time augmentation: auto (the view the weights were selected on: a saved ensemble's fitted "
            "mode, the centre crop for models trained on crops, else the whole face) | none | flip | tencrop | "
            "center | shift (the face and 4 copies moved 2 pixels).")
LABELS_HELP = ("FER+ crowd votes (fer2013new.csv, same row order as the FER2013 CSV): their labels replace the "
               "CSV's. Rows FER+ calls not a face, unknown, or of a class outside the label set are dropped and "
               "counted per split.")
LABEL_MODE_HELP = ("With --labels: majority (most-voted class) | clear (only rows whose majority holds over half "
                   "the votes, single votes left out: FER+'s own protocol) | soft (train on the vote distribution).")
PRIOR_HELP = ("none | uniform: divide the scores by the class frequencies the model was trained on (FER2013: "
              "happy 25 %, disgust 1.5 %), for photos not distributed like FER2013; see docs/model-card.md.")
# --progress/--no-progress of the commands that train: unset means bars for a new run, and a resumed run's own
# setting (as it last had it), so resuming a run started with --no-progress under nohup writes no bars to its log.
ProgressFlag = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", show_default=False,
    help="Show progress bars (default: yes; a resumed run: as it last had them).")]
PRECISION_HELP = "auto (CPU: bf16 where the CPU has it natively, else fp32; CUDA: mixed) | fp32 | bf16 | fp16."

app = typer.Typer(
    name="ferkit",
    help="Facial emotion recognition toolkit: train, evaluate and compare FER2013 models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    try:
        return version("ferkit")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ferkit {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print ferkit's version and exit.")) -> None:
    """Facial emotion recognition toolkit: train, evaluate and compare FER2013 models."""


def check_labels_options(labels: str | os.PathLike | None, label_mode: str | None) -> None:
    """--labels must be a file; --label-mode (None: not given) one of the FER+ modes, other than majority only
    with --labels."""
    from ferkit.data.ferplus import MODES

    if label_mode is not None and label_mode not in MODES:
        _fail(f"unknown --label-mode {label_mode!r}; choose one of {', '.join(MODES)}")
    if labels is None and label_mode not in (None, "majority"):
        _fail(f"--label-mode {label_mode} needs --labels (FER+'s fer2013new.csv)")
    if labels is not None and not Path(labels).is_file():
        _fail(f"labels file {str(labels)!r} not found (--labels takes FER+'s fer2013new.csv)")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def check_output_file(path: Path, option: str) -> None:
    """Fail before the long work a command writes `path` after (scoring, fitting) when it could not be written:
    a folder in its place, a file where its folder should be, a folder that refuses new files."""
    import tempfile

    if path.is_dir():
        _fail(f"{option} {path} is a folder, not a file")
    existing = next(p for p in path.absolute().parents if p.exists())  # the folders below it are made on writing
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):  # nothing is left behind, even when a later check fails
            pass
    except OSError as e:
        _fail(f"{option} {path}: cannot write a file into {existing} ({e.strerror or e})")
