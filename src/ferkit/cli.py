"""ferkit command line: a thin layer over the library (each command parses, calls, prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="ferkit",
    help="Facial emotion recognition toolkit: train, evaluate and compare FER2013 models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


TRAIN_EPILOG = """
Examples:

  ferkit train --data fer2013.csv.gz --model ferkit_vgg_s --epochs 60

  ferkit train --data fer2013.csv.gz --model frivas_cnn3 --optimizer adam --lr 1e-3 \\
      --schedule step --batch-size 128 --epochs 50

  ferkit train --data fer2013.csv.gz --model bokanyi_deep augment.rotation=15 label_smoothing=0.1

  ferkit train --resume runs/ferkit_vgg_s-20261123-101500     (continue a killed run)

Trailing key=value pairs set any config field (see config.json in a run directory); values are JSON
(numbers, true/false, lists) or bare strings. Each run writes runs/<name>/ with config.json,
metrics.csv, curves.png, best.safetensors, last.safetensors, checkpoint.pt and manifest.json.
"""


@app.command(epilog=TRAIN_EPILOG)
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help="Extra config overrides, key=value.")] = None,
    data: Annotated[str | None, typer.Option(help="FER2013 CSV (.csv or .csv.gz) or image-folder root.")] = None,
    model: Annotated[str | None, typer.Option(help="Registry model name (see `ferkit models`).")] = None,
    label_set: Annotated[str | None, typer.Option(help="fer7 (all 7 emotions) or fer6 (no disgust).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam | adamw | rmsprop.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (peak rate for onecycle).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(help="none | step | plateau | cosine | onecycle.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing for cross-entropy.")] = None,
    class_weights: Annotated[str | None, typer.Option(help="none | balanced.")] = None,
    early_stopping: Annotated[int | None, typer.Option(help="Patience in epochs; 0 disables.")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm; 0 disables.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 CPU / mixed CUDA) | fp32 | bf16 | fp16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (runs are deterministic given a seed).")] = None,
    out: Annotated[str | None, typer.Option(help="Parent directory of run directories.")] = None,
    name: Annotated[str | None, typer.Option(help="Run directory name (default <model>-<time>).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Keep a snapshot every N steps (0 = off).")] = None,
    limit_train: Annotated[int | None, typer.Option(help="Use only the first N training faces.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume the run in this directory.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a model on the Training split, selecting the best epoch on PublicTest."""
    from ferkit.data import DataError
    from ferkit.training import TrainConfig
    from ferkit.training import train as run_training

    flags = {"data": data, "model": model, "label_set": label_set, "epochs": epochs, "batch_size": batch_size,
             "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
             "label_smoothing": label_smoothing, "class_weights": class_weights, "early_stopping": early_stopping,
             "grad_clip": grad_clip, "device": device, "precision": precision, "seed": seed, "out_dir": out,
             "run_name": name, "save_every": save_every, "limit_train": limit_train}
    try:
        cfg = TrainConfig().override([f"{k}={_json(v)}" for k, v in flags.items() if v is not None]
                                     + list(overrides or []))
        cfg.progress = progress
        if resume is None and not Path(cfg.data).exists():
            _fail(f"data file {cfg.data!r} not found (pass --data PATH to fer2013.csv or fer2013.csv.gz)")
        run_training(cfg, resume=resume)
    except (DataError, ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command(epilog="""
Examples:

  ferkit models                 (every registered model)

  ferkit models 'frivas*'       (shell-style pattern)
""")
def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style name filter.")] = "*",
    flops: Annotated[bool, typer.Option(help="Count FLOPs per image (slower).")] = True,
) -> None:
    """List the registered models with parameter counts, FLOPs per image, source and published accuracy."""
    from ferkit.models import count_flops, count_parameters, create_model, get_spec, list_models

    names = list_models(pattern)
    if not names:
        _fail(f"no model matches {pattern!r}")
    header = f"{'name':<24} {'input':>5} {'params':>9} {'MFLOPs':>8}  published accuracy — source"
    typer.echo(header)
    typer.echo("-" * len(header))
    for n in names:
        spec = get_spec(n)
        m = create_model(n)
        mflops = f"{count_flops(m, spec.input_size) / 1e6:8.1f}" if flops else f"{'-':>8}"
        typer.echo(f"{n:<24} {spec.input_size:>5} {count_parameters(m) / 1e6:>8.2f}M {mflops}  "
                   f"{spec.reported} — {spec.source}")


def _json(value: object) -> str:
    import json

    return json.dumps(value)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
