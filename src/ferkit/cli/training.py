"""`ferkit train`, `ferkit models`, `ferkit reproduce`: the training side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ferkit.cli._app import (
    LABEL_MODE_HELP,
    LABELS_HELP,
    PRECISION_HELP,
    ProgressFlag,
    _fail,
    app,
    check_labels_options,
    check_output_file,
)

TRAIN_EPILOG = """
Examples:

  ferkit train --data fer2013.csv.gz --model ferkit_vgg_s --epochs 60

  ferkit train --data fer2013.csv.gz --model frivas_cnn3 --optimizer adam --lr 1e-3 \\
      --schedule step --batch-size 128 --epochs 50

  ferkit train --data fer2013.csv.gz --model bokanyi_deep augment.rotation=15 label_smoothing=0.1

  ferkit train --data fer2013.csv.gz --model mini_xception teacher=runs/<big>/best.safetensors \\
      distill_weight=0.7 distill_temperature=4       (knowledge distillation from a trained model;
      distill_view=online runs the teacher on every augmented batch instead of once on the plain faces;
      distill_view=cached distill_views=16 runs it once on 16 stored augmentations of each face;
      teacher=T.npz distils from cross-fitted targets: see `ferkit crossfit --help`)

  ferkit train --data fer2013.csv.gz --model ferkit_vgg_s --average ema --sam-rho 0.05 \\
      --mixup-alpha 0.2 --cutmix-alpha 1.0 mix_prob=0.5   (weight averaging, SAM, mixup/CutMix; README)

  ferkit train --data fer2013.csv.gz --model ferkit_vgg_s --lr 0.01 loss=squared_hinge
      (Tang's one-vs-rest L2-SVM loss instead of cross-entropy; it wants a lower lr)

  ferkit train --resume runs/ferkit_vgg_s-20261123-101500     (continue a killed run)
  ferkit train --resume runs/<name> --time-limit 240 threads=2 (resume with a longer limit, more threads)

  torchrun --nproc_per_node 2 -m ferkit train --data fer2013.csv.gz --model ferkit_vgg_s --batch-size 64
      (2 processes train one run: --batch-size is the global batch, each takes 32 per step; see
      docs/scale-out.md. Resume it with torchrun and the same number of processes.)

Trailing key=value pairs set any config field (see config.json in a run directory); values are JSON
(numbers, true/false, lists) or bare strings. Each run writes runs/<name>/ with config.json,
metrics.csv, curves.png, best.safetensors, last.safetensors, checkpoint.pt and manifest.json.
"""


def _default(field: str) -> str:
    """A TrainConfig field's default, for `train --help` (the flags default to None: unset means "the config's")."""
    from ferkit.training.config import TrainConfig

    return str(getattr(TrainConfig(), field))


@app.command(epilog=TRAIN_EPILOG)
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help="Extra config overrides, key=value.")] = None,
    data: Annotated[str | None, typer.Option(
        show_default=_default("data"), help="FER2013 CSV (.csv or .csv.gz) or image-folder root.")] = None,
    model: Annotated[str | None, typer.Option(
        show_default=_default("model"), help="Registry model name (see `ferkit models`).")] = None,
    label_set: Annotated[str | None, typer.Option(
        show_default=_default("label_set"),
        help="fer7 (all 7 emotions), fer6 (no disgust) or ferplus8 (FER+'s 8, with contempt; needs --labels).")] = None,
    labels: Annotated[str | None, typer.Option(
        help=LABELS_HELP, show_default=False)] = None,
    label_mode: Annotated[str | None, typer.Option(show_default=_default("label_mode"), help=LABEL_MODE_HELP)] = None,
    epochs: Annotated[int | None, typer.Option(show_default=_default("epochs"), help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(show_default=_default("batch_size"), help="Batch size.")] = None,
    optimizer: Annotated[str | None, typer.Option(
        show_default=_default("optimizer"), help="sgd | adam | adamw | rmsprop.")] = None,
    lr: Annotated[float | None, typer.Option(
        show_default=_default("lr"), help="Learning rate (peak rate for onecycle).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        show_default=_default("weight_decay"), help="Weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(
        show_default=_default("schedule"), help="none | step | plateau | cosine | onecycle.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(
        show_default=_default("label_smoothing"), help="Label smoothing of the targets, in [0, 1] (0 = off).")] = None,
    class_weights: Annotated[str | None, typer.Option(
        show_default=_default("class_weights"), help="none | balanced.")] = None,
    early_stopping: Annotated[int | None, typer.Option(
        show_default=_default("early_stopping"), help="Patience in epochs; 0 disables.")] = None,
    grad_clip: Annotated[float | None, typer.Option(
        show_default=_default("grad_clip"), help="Max gradient norm; 0 disables.")] = None,
    average: Annotated[str | None, typer.Option(
        show_default=_default("average"),
        help="none | ema | swa: select and save averaged weights (ema_decay=0.999 per step; swa_start=0.75: SWA "
             "averages once per epoch after that fraction of the epochs).")] = None,
    sam_rho: Annotated[float | None, typer.Option(
        show_default=_default("sam_rho"),
        help="SAM radius (e.g. 0.05), 0 = off; sam_adaptive=true for ASAM. Two passes per step: ~2x step "
             "time.")] = None,
    mixup_alpha: Annotated[float | None, typer.Option(
        show_default=_default("mixup_alpha"), help="mixup Beta(alpha, alpha), 0 = off; mix_prob=P mixes that "
                                                   "fraction of the batches.")] = None,
    cutmix_alpha: Annotated[float | None, typer.Option(
        show_default=_default("cutmix_alpha"), help="CutMix Beta(alpha, alpha), 0 = off (with mixup: one of the "
                                                    "two per batch, 50/50).")] = None,
    time_limit: Annotated[float | None, typer.Option(
        show_default=_default("time_limit"),
        help="Minutes of training; the run ends after the epoch that reaches them (0 = off).")] = None,
    device: Annotated[str | None, typer.Option(
        show_default=_default("device"), help="auto | cpu | cuda | cuda:N.")] = None,
    precision: Annotated[str | None, typer.Option(show_default=_default("precision"), help=PRECISION_HELP)] = None,
    seed: Annotated[int | None, typer.Option(
        show_default=_default("seed"), help="Random seed (runs are deterministic given a seed).")] = None,
    out: Annotated[str | None, typer.Option(
        show_default=_default("out_dir"), help="Parent directory of run directories.")] = None,
    name: Annotated[str | None, typer.Option(help="Run directory name (default <model>-<time>).")] = None,
    save_every: Annotated[int | None, typer.Option(
        show_default=_default("save_every"), help="Keep a snapshot every N steps (0 = off).")] = None,
    limit_train: Annotated[int | None, typer.Option(
        show_default=_default("limit_train"), help="Use only the first N training faces.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Resume the run in this directory with its saved config; only --time-limit, --early-stopping, "
             "--progress/--no-progress and threads=N change.")] = None,
    progress: ProgressFlag = None,
) -> None:
    """Train a model on the Training split, selecting the best epoch on PublicTest."""
    from ferkit.data import DataError
    from ferkit.training import TrainConfig, TrainingError
    from ferkit.training import train as run_training

    flags = {"data": data, "model": model, "label_set": label_set, "labels": labels, "label_mode": label_mode,
             "epochs": epochs, "batch_size": batch_size,
             "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
             "label_smoothing": label_smoothing, "class_weights": class_weights, "early_stopping": early_stopping,
             "grad_clip": grad_clip, "average": average, "sam_rho": sam_rho, "mixup_alpha": mixup_alpha,
             "cutmix_alpha": cutmix_alpha, "time_limit": time_limit, "device": device, "precision": precision,
             "seed": seed, "out_dir": out, "run_name": name, "save_every": save_every, "limit_train": limit_train,
             "progress": progress}
    assignments = [f"{k}={_json(v)}" for k, v in flags.items() if v is not None] + list(overrides or [])
    try:
        if resume is not None:  # the run's saved config, with only its run settings (RESUME_SETTINGS) changed
            run_training(resume=resume, changes=TrainConfig().resume_changes(assignments))
            return
        cfg = TrainConfig().override(assignments)
        if not Path(cfg.data).exists():
            _fail(f"data file {cfg.data!r} not found (pass --data PATH to fer2013.csv or fer2013.csv.gz)")
        check_labels_options(cfg.labels or None, None)  # the mode is checked with the config
        run_training(cfg)
    except (DataError, TrainingError, ValueError, FileNotFoundError) as e:
        _fail_once(str(e))


@app.command(epilog="""
Examples:

  ferkit models                 (every registered model)

  ferkit models 'frivas*'       (shell-style pattern)

  ferkit models 'timm:efficientnet_b*' --input-size 64     (timm architectures, with the timm extra)

  ferkit models --all --no-flops                           (ferkit's models and all of timm's)

A timm architecture trains as --model timm:NAME (model_kwargs.input_size=64 for 64-pixel faces).
""")
def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style name filter (timm:PATTERN for timm's).")] = "*",
    flops: Annotated[bool, typer.Option(help="Count FLOPs per image (slower).")] = True,
    markdown: Annotated[bool, typer.Option(help="Print a Markdown table (as in the README).")] = False,
    all_models: Annotated[bool, typer.Option(
        "--all", help="Also list timm's architectures as timm:NAME (needs the timm extra).")] = False,
    input_size: Annotated[int | None, typer.Option(
        help="Count FLOPs at this face size (default: each model's input size).", min=8, max=1024)] = None,
) -> None:
    """List the registered models with parameter counts, FLOPs per image, source and published accuracy."""
    import torch

    from ferkit.models import count_flops, count_parameters, create_model, get_spec, list_models

    try:
        names = list_models(pattern, include_timm=True if all_models else None)
    except ImportError as e:
        _fail(str(e))
    if not names:
        _fail(f"no model matches {pattern!r}")
    if markdown:
        typer.echo("| registry name | input | params | MFLOPs/image | published accuracy | source |")
        typer.echo("|---|---|---|---|---|---|")
    else:
        header = f"{'name':<24} {'input':>5} {'params':>9} {'MFLOPs':>8}  published accuracy — source"
        typer.echo(header)
        typer.echo("-" * len(header))
    for n in names:
        spec = get_spec(n)
        size = input_size or spec.input_size
        kwargs = {"input_size": size} if input_size and n.startswith("timm:") else {}
        params, shown, note = "?", "n/a", ""
        try:
            with torch.device("meta"):  # shapes only: no memory, no compute, whatever the model's size
                m = create_model(n, **kwargs)
            params = f"{count_parameters(m) / 1e6:.2f}"
            mflops = count_flops(m, size) / 1e6 if flops else None
            shown = "-" if mflops is None else (f"{mflops:.0f}" if markdown else f"{mflops:.1f}")
        except Exception as e:  # an architecture that cannot take this input size (e.g. a fixed window)
            note = f"cannot run on {size}px faces: {(str(e).splitlines() or [type(e).__name__])[0][:70]}"
        if markdown:
            typer.echo(f"| `{n}` | {size} | {params} M | {shown} | {note or spec.reported} | {spec.source} |")
        else:
            typer.echo(f"{n:<24} {size:>5} {params:>8}M {shown:>8}  {note or spec.reported + ' — ' + spec.source}")


SWEEP_EPILOG = """
Examples:

  ferkit sweep --data fer2013.csv.gz --name opt-grid model=frivas_cnn1 epochs=10 \\
      optimizer=sgd,adam,adamw schedule=cosine,step,plateau lr=0.01,0.001

  ferkit sweep --data fer2013.csv.gz --name lr-search --random 6 lr=0.1,0.03,0.01,0.003,0.001 \\
      batch_size=32,64,128 model=frivas_cnn1 epochs=5     (6 of the 15 combinations, drawn with --seed)

  ferkit sweep --resume runs/opt-grid          (after a kill: finished trials are not re-run)

  ferkit sweep --resume runs/opt-grid --parallel 4 --ray-address auto    (the rest as Ray tasks on a cluster)

  ferkit sweep --resume runs/opt-grid --retry-failed      (run the trials that failed again)

Each key=v1,v2,... is any `ferkit train` setting (config key, dotted for augment.* and model_kwargs.*); a key with
one value is fixed. Every combination is a trial, trained one after another in DIR/trial-NNN (a normal run
directory). DIR/results.csv and results.md tabulate best and final PublicTest accuracy per trial; DIR/sweep.png
draws PublicTest accuracy per epoch for every trial and the final accuracy per cell of the grid. A trial that
fails (diverges, settings that do not go together, a Ray worker lost) is recorded in DIR/trial-NNN/failed.json and
the others go on; the command then exits with status 1, naming the failed trials.
"""


@app.command(epilog=SWEEP_EPILOG)
def sweep(
    settings: Annotated[list[str] | None, typer.Argument(
        help="key=value1,value2,... settings to combine (one value: fixed for every trial).")] = None,
    data: Annotated[str | None, typer.Option(
        show_default=_default("data"), help="FER2013 CSV (.csv or .csv.gz) or image-folder root.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Sweep directory name under --out (default sweep-<time>); an existing one resumes.")] = None,
    out: Annotated[Path, typer.Option(help="Parent directory of the sweep directory.")] = Path("runs"),
    resume: Annotated[Path | None, typer.Option(
        help="Resume the sweep in this directory with the settings it started with.")] = None,
    random: Annotated[int, typer.Option(
        help="Train this many of the combinations, drawn at random (0 = every one).", min=0)] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the --random draw.")] = 0,
    parallel: Annotated[int, typer.Option(
        help="Trials at once, as Ray tasks (the cluster extra); 1 = one after another here.", min=1)] = 1,
    ray_address: Annotated[str, typer.Option(
        help="With --parallel: 'local' (a private Ray here), 'auto' or host:port (a cluster whose nodes see the "
             "data and the sweep directory).")] = "local",
    retry_failed: Annotated[bool, typer.Option(
        help="Run the trials that failed before again (by default a failed trial counts as finished).")] = False,
    progress: ProgressFlag = None,
) -> None:
    """Train every combination of some settings (grid or random search), one run per trial, and compare them."""
    import time

    from ferkit.data import DataError
    from ferkit.training import TrainingError
    from ferkit.training.config import TrainConfig
    from ferkit.training.sweep import SweepError, load_plan, parse_grid, run_sweep

    try:
        if resume is not None:
            plan = load_plan(resume)
            grid, random, seed, sweep_dir = plan["grid"], int(plan.get("random", 0)), int(plan.get("seed", 0)), resume
        else:
            grid = parse_grid(list(settings or []))
            if "data" not in grid:
                grid["data"] = [data or TrainConfig().data]
            elif data is not None:
                _fail("give the data once: --data or data=...")
            sweep_dir = out / (name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
        for d in grid["data"]:
            if not Path(d).exists():
                _fail(f"data file {d!r} not found (pass --data PATH to fer2013.csv or fer2013.csv.gz)")
        result = run_sweep(grid, sweep_dir, random=random, seed=seed, progress=progress, parallel=parallel,
                           ray_address=ray_address, retry_failed=retry_failed)
    except (SweepError, DataError, TrainingError, ValueError, FileNotFoundError, ImportError) as e:
        _fail(str(e))
    done = sum(r["status"] == "done" for r in result.rows)
    typer.echo(f"{done}/{len(result.rows)} trials done; {sweep_dir / 'results.md'}, {sweep_dir / 'results.csv'}, "
               f"{sweep_dir / 'sweep.png'}")
    if result.failed:
        named = ", ".join(f"{r['trial']} ({str(r['error']).partition(':')[0]})" for r in result.failed)
        _fail(f"{len(result.failed)} of {len(result.rows)} trials failed: {named}; the reasons are in "
              f"{sweep_dir / 'results.md'}; run them again with `ferkit sweep --resume {sweep_dir} --retry-failed`",
              code=1)


CROSSFIT_EPILOG = """
Examples:

  ferkit sweep --data fer2013.csv.gz --name cf5 holdout=1/5,2/5,3/5,4/5,5/5 model=ferkit_vgg_s epochs=60 \\
      lr=0.03 weight_decay=5e-4 label_smoothing=0.1 average=ema    (5 runs, each without one fifth of Training)

  ferkit crossfit runs/cf5/trial-* --out cf5.npz      (each fold scored by the run that never saw it)

  ferkit train --data fer2013.csv.gz --model ferkit_vgg_s teacher=cf5.npz    (distil from the held-out scores)

Runs trained with holdout=K/N leave fold K of N out of Training (stratified by class; the same folds for every
run of the same data, labels and label settings, and limit_train). Each run scores the faces it left out, under
flip TTA (or its own view: a saved ensemble's, the centre crop for crop-trained weights); runs leaving out the
same fold are averaged. The file holds one probability row per Training face, joined to a student's faces by
their row in the CSV.
"""


@app.command(epilog=CROSSFIT_EPILOG)
def crossfit(
    runs: Annotated[list[Path], typer.Argument(help="Run directories trained with holdout=K/N, every K of one N.")],
    out: Annotated[Path, typer.Option(help="The targets file to write (.npz), for teacher=FILE.")],
    data: Annotated[str | None, typer.Option(
        help="The data file the runs trained on (default: the one in their config.json).")] = None,
    weights: Annotated[str, typer.Option(help="Which weights of each run score its fold.")] = "best.safetensors",
) -> None:
    """Cross-fitted distillation targets: every Training face scored by the run that held it out."""
    from ferkit.data import DataError
    from ferkit.training.crossfit import crossfit_targets

    if out.suffix != ".npz":
        _fail(f"--out {out}: the targets file must end in .npz (teacher=FILE tells targets from weights by it)")
    check_output_file(out, "--out")
    try:
        targets = crossfit_targets(runs, data, weights)
    except (DataError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        targets.save(out)
    except OSError as e:
        _fail(f"cannot write {out}: {e}")
    typer.echo(f"wrote {out}: {len(targets.rows)} training faces, {targets.folds} folds, held-out accuracy "
               f"{targets.accuracy():.4f}")


REPRODUCE_EPILOG = """
Examples:

  ferkit reproduce --list                                   (every system, its recipe and published number)

  ferkit reproduce frivas_cnn3 --data fer2013.csv.gz         (train, evaluate, update results/seeds.csv)

  ferkit reproduce khaireddin_vgg --data fer2013.csv.gz epochs=40    (override a recipe setting)

Rerunning a system whose run directory (runs/repro-<system>) holds a checkpoint resumes it.
Results: results/seeds.csv, results/predictions/<system>.npz, results/runs/<system>/.
"""


@app.command(epilog=REPRODUCE_EPILOG)
def reproduce(
    system: Annotated[str | None, typer.Argument(help="System name (see --list).")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Extra config overrides, key=value.")] = None,
    data: Annotated[str, typer.Option(help="FER2013 CSV (.csv or .csv.gz).")] = "fer2013.csv.gz",
    runs: Annotated[Path, typer.Option(help="Parent directory of the run directories.")] = Path("runs"),
    results: Annotated[Path, typer.Option(help="Where seeds.csv, predictions/ and runs/ are written.")] = Path(
        "results"),
    list_systems: Annotated[bool, typer.Option("--list", help="List the systems and their recipes.")] = False,
    report: Annotated[bool, typer.Option(
        "--report", help="Only refresh docs/results.md's table and docs/results.png from results/seeds.csv.")] = False,
    progress: ProgressFlag = None,
    labels: Annotated[str | None, typer.Option(
        help=LABELS_HELP + " The system is then recorded as NAME_ferplus.", show_default=False)] = None,
    label_mode: Annotated[str | None, typer.Option(help=LABEL_MODE_HELP, show_default=False)] = None,
) -> None:
    """Retrain a published FER2013 system with its recipe and record its measured accuracy."""
    from ferkit.data import DataError
    from ferkit.reproduce import RECIPES, epochs_label, write_report
    from ferkit.reproduce import reproduce as run_reproduce
    from ferkit.training import TrainingError

    if report:
        try:
            write_report(results)
        except ValueError as e:
            _fail(str(e))
        typer.echo("refreshed docs/results.md and docs/results.png")
        return

    if list_systems or system is None:
        from ferkit.reproduce import read_seeds

        try:
            measured = {row["name"]: row for row in read_seeds(results / "seeds.csv")}
        except ValueError as e:
            _fail(str(e))
        for r in RECIPES.values():
            row = measured.get(r.name)
            status = (f"measured {float(row['private_test']):.3f} ({epochs_label(row)} epochs)" if row
                      else "not run yet")
            typer.echo(f"{r.name:<22} reported {r.reported:.3f}  {status:<28} {r.system}")
            typer.echo(f"{'':<22} {' '.join(r.overrides)}" + (f"  tta={r.tta}" if r.tta != "none" else ""))
            if r.notes:
                typer.echo(f"{'':<22} note: {r.notes}")
            if row and row.get("command"):  # its settings may differ from the recipe (e.g. a longer schedule)
                typer.echo(f"{'':<22} measured by: {row['command']}")
        return
    if not Path(data).exists():
        _fail(f"data file {data!r} not found (pass --data PATH to fer2013.csv or fer2013.csv.gz)")
    check_labels_options(labels, label_mode)
    flags = [f"labels={labels}"] * (labels is not None) + [f"label_mode={label_mode}"] * (label_mode is not None)
    try:
        row = run_reproduce(system, data, runs_dir=runs, results_dir=results, extra=[*flags, *(overrides or [])],
                            progress=progress)
    except (DataError, TrainingError, ValueError, FileNotFoundError) as e:
        _fail_once(str(e))
    if not row:  # one of several torchrun processes, not rank 0: rank 0 evaluates and reports
        return
    typer.echo(f"{system}: PublicTest {row['public_test']}  PrivateTest {row['private_test']}  "
               f"(reported {row['reported']}); row written to {results / 'seeds.csv'}")
    # docs/results.md renders the project's own results/; a run recorded elsewhere (--results) leaves it alone.
    if Path("docs/results.md").is_file() and Path(results).resolve() == Path("results").resolve():
        write_report(results)


def _fail_once(message: str) -> None:
    """`_fail`, said by one of several torchrun processes (rank 0; they all stop with the same error)."""
    import os

    if int(os.environ.get("RANK", "0") or 0) > 0:
        raise typer.Exit(2)
    _fail(message)


def _json(value: object) -> str:
    import json

    return json.dumps(value)
