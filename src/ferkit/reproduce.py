"""Reproduce the published FER2013 systems: each recipe is data (a model plus TrainConfig overrides).

`reproduce(name, data)` trains the recipe (resuming its run directory if one exists), evaluates the
best-on-PublicTest weights on PublicTest and PrivateTest with `ferkit.evaluation.evaluate` (the
code behind `ferkit evaluate`), and records everything a reviewer needs under `results/`:
  results/seeds.csv                      one row per system (the table in docs/results.md)
  results/predictions/<name>.npz         class probabilities on both test splits (for ensembles)
  results/runs/<name>/                   manifest.json, config.json, metrics.csv, curves.png
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferkit.data import load_dataset
from ferkit.ensembles.predictions import save_prediction_file
from ferkit.evaluation import evaluate
from ferkit.models.weights import load_model
from ferkit.shared_files import locked, read_rows, replacing, write_rows, write_text
from ferkit.training import RESUME_SETTINGS, TrainConfig, create_run, distributed, hold_run, train
from ferkit.training.report import hardware
from ferkit.training.trainer import removed_on_failure

# epochs: epochs trained; planned_epochs: the recipe's schedule (more than `epochs` when early stopping or a time
# limit ended the run).
SEEDS_COLUMNS = ("system", "registry_name", "classes", "reported", "public_test", "private_test", "epochs",
                 "planned_epochs", "train_minutes", "hardware", "command")
# The columns the table, figure and --list read: a table written before planned_epochs, name or command existed
# still reads, and its next row adds them.
SEEDS_READ_COLUMNS = ("system", "registry_name", "classes", "reported", "public_test", "private_test", "epochs",
                      "train_minutes", "hardware")

# Augmentation the papers either describe as "flips and shifts" or do not describe at all; recipes
# that name stronger augmentation override it.
LIGHT_AUGMENT = ("augment.crop_scale=[1,1]", "augment.crop_ratio=[1,1]", "augment.rotation=0",
                 "augment.translate=0.1", "augment.hflip=0.5", "augment.erasing=0")
NO_AUGMENT = ("augment.crop_scale=[1,1]", "augment.crop_ratio=[1,1]", "augment.rotation=0",
              "augment.translate=0", "augment.hflip=0", "augment.erasing=0")


@dataclass(frozen=True)
class Recipe:
    name: str  # row key in results/seeds.csv; usually the registry name
    system: str  # who published it, in words
    model: str  # registry name
    reported: float  # headline published accuracy (fraction); the target to meet within 1.5 points
    overrides: tuple[str, ...]  # TrainConfig key=value settings
    notes: str = ""  # choices made where the publication is silent
    tta: str = "none"  # test-time augmentation used when evaluating, as published


_BOKANYI = ("optimizer=sgd", "lr=0.01", "momentum=0.9", "weight_decay=1e-7", "schedule=none", "batch_size=128",
            "epochs=80", "early_stopping=10", *LIGHT_AUGMENT)
_FRIVAS = ("optimizer=adam", "lr=0.001", "weight_decay=0", "schedule=step", "step_every=1000", "gamma=0.98",
           "batch_size=128", "epochs=50", *LIGHT_AUGMENT)
_TAN = ("batch_size=64", "weight_decay=0", "schedule=none", *NO_AUGMENT)
_SIXCLASS = ("label_set=fer6", "optimizer=adam", "lr=0.001", "weight_decay=0", "schedule=none", "batch_size=64",
             "epochs=30", "save_every=1000", *LIGHT_AUGMENT)

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bokanyi_shallow", "Bokányi & Mészégető shallow CNN", "bokanyi_shallow", 0.606, _BOKANYI,
           "Optimizer not stated: SGD momentum 0.9; early stopping patience 10 on PublicTest; flips+shifts."),
    Recipe("bokanyi_deep", "Bokányi & Mészégető deep CNN", "bokanyi_deep", 0.665, _BOKANYI,
           "As the shallow CNN."),
    Recipe("agrawal_mittal", "Agrawal & Mittal 2020 CNN (Bokányi reconstruction)", "agrawal_mittal", 0.6336,
           ("optimizer=adam", "lr=0.001", "weight_decay=0", "schedule=cosine", "batch_size=64", "epochs=40",
            "augment.erasing=0"),
           "64x64 input (faces upscaled); 'data augmentation': random resized crop, flip, rotation, shifts."),
    *[Recipe(f"frivas_cnn{i}", f"F-Riv model {i}", f"frivas_cnn{i}", rep, _FRIVAS,
             "Adam 1e-3 x0.98 every 1,000 steps, batch 128, 50 epochs as published; flips+shifts.")
      for i, rep in zip(range(1, 7), (0.635, 0.651, 0.67, 0.648, 0.652, 0.66), strict=True)],
    Recipe("frivas_cnn1_balanced", "F-Riv model 1 with balanced class weights", "frivas_cnn1", 0.635,
           (*_FRIVAS, "class_weights=balanced"), "Published: 'did not increase accuracy' (target: model 1)."),
    Recipe("tan_mlp", "Tan et al. MLP (300 hidden)", "tan_mlp", 0.25,
           (*_TAN, "optimizer=sgd", "lr=0.01", "momentum=0", "nesterov=false", "epochs=20")),
    Recipe("tan_default", "Tan et al. Keras CNN 'default'", "tan_default", 0.463,
           (*_TAN, "optimizer=rmsprop", "lr=1e-4", "momentum=0", "epochs=20")),
    Recipe("tan_improved", "Tan et al. 'improved' (deeper, BN, Adam)", "tan_improved", 0.513,
           (*_TAN, "optimizer=adam", "lr=1e-3", "epochs=20")),
    Recipe("tan_dropout", "Tan et al. 'dropout' (50 epochs)", "tan_dropout", 0.568,
           (*_TAN, "optimizer=adam", "lr=1e-3", "epochs=50")),
    Recipe("tan_more_dropout", "Tan et al. 'more dropout'", "tan_more_dropout", 0.581,
           (*_TAN, "optimizer=adam", "lr=1e-3", "epochs=50")),
    Recipe("tan_swish", "Tan et al. 'more dropout' with swish", "tan_swish", 0.537,
           (*_TAN, "optimizer=adam", "lr=1e-3", "epochs=50")),
    Recipe("tan_pca", "Tan et al. PCA-98 % preprocessing (90 epochs)", "tan_pca", 0.57,
           (*_TAN, "optimizer=adam", "lr=1e-3", "epochs=90")),
    Recipe("sixclass_cnn4", "6-class 4-layer CNN (no disgust, no dropout)", "sixclass_cnn4", 0.62, _SIXCLASS,
           "Optimizer not stated: Adam 1e-3, batch 64, 30 epochs; snapshot every 1,000 steps for ensembles."),
    Recipe("sixclass_cnn5", "6-class 5-layer CNN (30 % dropout)", "sixclass_cnn5", 0.636, _SIXCLASS,
           "As the 4-layer CNN."),
    Recipe("khaireddin_vgg", "Khaireddin & Chen 2021 VGG", "khaireddin_vgg", 0.7328,
           ("optimizer=sgd", "lr=0.01", "momentum=0.9", "nesterov=true", "weight_decay=1e-4", "schedule=plateau",
            "plateau_factor=0.75", "plateau_patience=5", "batch_size=64", "epochs=300",
            "augment.crop_scale=[0.8,1.2]", "augment.crop_ratio=[0.75,1.3333]", "augment.rotation=10",
            "augment.translate=0.2", "augment.erasing=0.5", "augment.erasing_scale=[0.02,0.33]", "train_view=crop"),
           "Trains on random 40x40 crops of the augmented 48x48 faces (their code trains on all ten crops of each "
           "face at once; one random crop per face per step here), selects on the centre crop, reports ten-crop "
           "TTA as published. Their augmentation: random resized crop 0.8-1.2 (torchvision's 3:4-4:3 ratios), "
           "shifts 0.2, flips, rotation 10, erasing p 0.5 (scale 0.02-0.33).", tta="tencrop"),
    # ferkit's own recipes toward the state of the art (docs/results.md, "Toward the state of the art"): 'reported'
    # is the target they are measured against, the best honest published single network (Khaireddin & Chen).
    Recipe("ferkit_vgg_s_e120", "ferkit: shipped default's network, 120 cosine epochs, EMA (target: state of the art)",
           "ferkit_vgg_s", 0.733,
           ("optimizer=sgd", "lr=0.03", "momentum=0.9", "nesterov=true", "weight_decay=5e-4", "schedule=cosine",
            "warmup_epochs=1", "label_smoothing=0.1", "batch_size=64", "epochs=120", "average=ema", "ema_decay=0.999"),
           "The shipped default's recipe (80 epochs) over 120 cosine epochs with an exponential moving average of the "
           "weights (decay 0.999) selected on PublicTest; ferkit's default augmentation. Reported: the issue's target "
           "for one network, Khaireddin & Chen's 73.28 % (selected on PrivateTest there), not a published figure of "
           "this recipe."),
    # ImageNet architectures through the timm bridge (the timm extra), trained from scratch: no ImageNet weights
    # can be fetched here. 'reported' is the published number of the project whose recipe they borrow, for scale.
    Recipe("efficientnet_b0", "EfficientNet-B0 (Tan & Le 2019, timm) with F-Riv's recipe, 10 epochs",
           "timm:efficientnet_b0", 0.51, (*_FRIVAS, "epochs=10", "model_kwargs.input_size=64"),
           "From scratch (random init, no ImageNet weights reachable offline; init_weights=FILE takes a user's). "
           "F-Riv's Adam 1e-3 x0.98 per 1,000 steps, batch 128, flips+shifts, for 10 epochs; 48 px faces upsampled "
           "to 64. Reported: F-Riv's EfficientNetB0 comparison, 51 % test, which started from ImageNet weights."),
    Recipe("resnet34", "ResNet-34 (He et al. 2016, timm) with the six-class project's setting", "timm:resnet34",
           0.636, (*_SIXCLASS, "model_kwargs.input_size=64"),
           "From scratch (no ImageNet weights reachable offline). The 6-class CNNs' setting: no disgust, Adam 1e-3, "
           "batch 64, 30 epochs, snapshots every 1,000 steps; ImageNet stem, 48 px faces upsampled to 64. Reported: "
           "the 6-class 5-layer CNN's test accuracy (no published ResNet-34 result under this setting)."),
]}


FERPLUS_SUFFIX = "_ferplus"  # row and run-directory suffix of a system trained on FER+ labels


def recipe_command(name: str, extra: list[str] | None = None) -> str:
    return " ".join(["ferkit reproduce", name, "--data fer2013.csv.gz", *(extra or [])])


def reproduce(name: str, data: str | os.PathLike, *, runs_dir: str | os.PathLike = "runs",
              results_dir: str | os.PathLike = "results", extra: list[str] | None = None,
              progress: bool | None = None) -> dict[str, str]:
    """Train (or resume) recipe `name`, evaluate it on both test splits, and record the results row.

    progress: show progress bars (None: yes for a new run; a resumed one as it last had them, so re-reporting a
    finished run leaves its config.json as it is).

    Started by torchrun, the processes train the recipe together; rank 0 alone prepares the run directory,
    evaluates and records, and the other processes return an empty row."""
    with distributed.processes() as d:
        return _reproduce(name, data, runs_dir, results_dir, extra, progress, d)


def _reproduce(name: str, data: str | os.PathLike, runs_dir: str | os.PathLike, results_dir: str | os.PathLike,
               extra: list[str] | None, progress: bool | None, d: distributed.Dist) -> dict[str, str]:
    if name not in RECIPES:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    extra = list(extra or [])
    # Trained on FER+ labels (labels=fer2013new.csv), a system is another row, run directory and predictions
    # file: its numbers must never replace the FER2013 row's.
    key = f"{name}{FERPLUS_SUFFIX}" if TrainConfig().override(_split_settings(extra)[0]).labels else name
    run_dir = Path(runs_dir) / f"repro-{key}"
    overrides_file = run_dir / "reproduce_overrides.json"
    d.from_rank0(functools.partial(_check_destinations, runs_dir, results_dir))  # before hours of training
    changes, extra = d.from_rank0(functools.partial(_start_run, recipe, data, runs_dir, run_dir, extra, progress))
    with contextlib.ExitStack() as stack:
        d.from_rank0(lambda: stack.enter_context(hold_run(run_dir)))  # no writes into a run another process trains
        # A new run (changes None) that fails before its first checkpoint (bad data, settings that do not fit) is
        # removed, so that the system can be reproduced again with other overrides.
        with removed_on_failure(run_dir, changes is None and d.main, ("config.json", overrides_file.name)):
            d.from_rank0(functools.partial(write_text, overrides_file, json.dumps(extra)))
            result = train(resume=run_dir, changes=(changes or {}) | ({} if progress is None else
                                                                     {"progress": progress}) or None)
    if not d.main:
        return {}

    model, meta = load_model(result.run_dir / "best.safetensors")
    manifest = json.loads((run_dir / "manifest.json").read_text())  # the run's config, data and timings
    trained = manifest["config"]  # the data as the run saw it: bad rows skipped or not, FER+ labels or not
    dataset = load_dataset(str(data), meta["label_set"], skip_bad_rows=bool(trained.get("skip_bad_rows")),
                           labels=trained.get("labels") or None, label_mode=trained.get("label_mode", "majority"))
    trained_on = manifest.get("data", {})
    if trained_on.get("sha256") and trained_on["sha256"] != dataset.sha256:
        raise ValueError(f"{run_dir} was trained on {trained_on.get('path')} (sha256 {trained_on['sha256'][:12]}...), "
                         f"but --data {data} is other data (sha256 {dataset.sha256[:12]}...); evaluate it on the "
                         "data it was trained on")
    scores = {split: evaluate(model, meta, dataset, split, tta=recipe.tta, weights_path=run_dir / "best.safetensors")
              for split in ("PublicTest", "PrivateTest")}

    results = Path(results_dir)
    pub, priv = scores["PublicTest"], scores["PrivateTest"]
    save_prediction_file(results / "predictions" / f"{key}.npz", pub.classes, recipe.model, recipe.tta,
                         (pub.probs, pub.labels, pub.rows), (priv.probs, priv.labels, priv.rows))
    record = results / "runs" / key
    record.mkdir(parents=True, exist_ok=True)
    for f in ("manifest.json", "config.json", "metrics.csv", "curves.png"):
        with replacing(record / f) as tmp:  # atomic, as every result file
            shutil.copy2(run_dir / f, tmp)
    write_text(record / "evaluation.json", json.dumps({s: r.to_json() for s, r in scores.items()}, indent=2) + "\n")
    hw = manifest.get("hardware") or hardware()  # where it trained (a resumed run is re-reported elsewhere)
    row = {"system": recipe.system, "registry_name": recipe.model, "classes": str(len(pub.classes)),
           "reported": f"{recipe.reported:.4f}", "public_test": f"{pub.accuracy:.4f}",
           "private_test": f"{priv.accuracy:.4f}", "epochs": str(manifest["epochs_done"]),
           "planned_epochs": str(manifest["config"]["epochs"]),
           "train_minutes": f"{manifest['train_seconds'] / 60:.1f}",
           "hardware": hw.get("cuda") or f"{hw.get('cpu', 'cpu')} x{hw['torch_threads']} threads",
           "command": recipe_command(name, extra)}
    upsert_row(results / "seeds.csv", key, row)
    return row


def _start_run(recipe: Recipe, data: str | os.PathLike, runs_dir: str | os.PathLike, run_dir: Path,
               extra: list[str], progress: bool | None) -> tuple[dict | None, list[str]]:
    """Make `run_dir` for `recipe`, or check that its saved overrides agree with `extra` to resume it: the run
    settings to change (None for a new run) and the overrides to record."""
    overrides_file = run_dir / "reproduce_overrides.json"
    if (run_dir / "config.json").is_file():
        # Resume (from the first epoch when none was saved). What the run learns with must be what it started
        # with, so those overrides must agree; run settings (threads, time_limit) may change, and the recorded
        # command carries their latest values.
        started_with = _read_overrides(overrides_file) if overrides_file.is_file() else []
        learned, settings = _split_settings(started_with)
        given_learned, given_settings = _split_settings(extra)
        if given_learned and given_learned != learned:
            raise ValueError(f"{run_dir} was started with overrides {started_with}; pass the same ones to resume "
                             f"(only {', '.join(RESUME_SETTINGS)} may change) or delete that directory to start over")
        changes = TrainConfig().resume_changes([f"{k}={v}" for k, v in given_settings.items()])
        extra = [*learned, *(f"{k}={v}" for k, v in (settings | given_settings).items())]
    else:
        changes = None
        cfg = TrainConfig(data=str(data), out_dir=str(runs_dir), run_name=run_dir.name, model=recipe.model,
                          progress=progress is not False).override([*recipe.overrides, *extra])
        create_run(cfg)  # a new directory with its config.json, or an error when run_dir is taken
    return changes, extra


def _read_overrides(path: Path) -> list[str]:
    """The `key=value` overrides a reproduced run was started with (its reproduce_overrides.json)."""
    try:
        overrides = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); it lists the overrides the run was started with: restore it "
                         "(e.g. [] for none) or delete the run directory to start over") from e
    if not (isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides)):
        raise ValueError(f"{path} must hold a JSON list of key=value strings, got {overrides!r}")
    return overrides


def _check_destinations(runs_dir: str | os.PathLike, results_dir: str | os.PathLike) -> None:
    """Fail before training, not after it: folders that are files, and a results table that cannot be updated
    (read_seeds names what is wrong with it), would otherwise stop a finished run half-recorded."""
    for what, folder in (("--runs", Path(runs_dir)), ("--results", Path(results_dir))):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{what} {folder} is a file, not a folder")
    results = Path(results_dir)
    for sub in ("predictions", "runs"):
        if (results / sub).exists() and not (results / sub).is_dir():
            raise ValueError(f"{results / sub} is a file, not a folder")
    read_seeds(results / "seeds.csv")


def read_seeds(path: str | os.PathLike) -> list[dict[str, str]]:
    """results/seeds.csv's rows ([] when it does not exist), checked: a file that is not a table of SEEDS_COLUMNS
    with numeric accuracies is a ValueError naming it and the first bad line, so that nothing is recorded beside a
    table that cannot take the row (and `--list`, `--report` say what is wrong instead of a traceback)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        rows = read_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is not a readable CSV table ({e}); repair or remove it") from e
    if rows and (missing := [c for c in SEEDS_READ_COLUMNS if c not in rows[0]]):
        raise ValueError(f"{path} lacks the columns {', '.join(missing)}; repair or remove it")
    for line, row in enumerate(rows, start=2):
        bad = None in row or any(v is None for v in row.values())  # a line with too many or too few fields
        try:
            bad = bad or not all(0 <= float(row[c]) <= 1 for c in ("reported", "public_test", "private_test"))
        except ValueError:
            bad = True
        if bad:
            raise ValueError(f"{path} line {line} is damaged ({row.get('name')!r}: fields missing, extra or not "
                             "accuracies); repair or remove it")
    return rows


def _split_settings(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """`key=value` overrides split into those that shape what a run learns (in order) and its run settings
    (RESUME_SETTINGS, the last value of each key)."""
    learned = [o for o in overrides if o.partition("=")[0] not in RESUME_SETTINGS]
    settings = {o.partition("=")[0]: o.partition("=")[2] for o in overrides if o.partition("=")[0] in RESUME_SETTINGS}
    return learned, settings


def upsert_row(path: Path, name: str, row: dict[str, str]) -> None:
    """Replace (or add) the row for `name`, keeping the rows in recipe order; safe when runs finish together."""
    with locked(path):
        rows = {r.get("name") or r["registry_name"]: r for r in read_seeds(path)}
        rows[name] = {"name": name, **row}
        order = [n for n in RECIPES if n in rows] + [n for n in rows if n not in RECIPES]
        write_rows(path, ("name", *SEEDS_COLUMNS), (rows[n] for n in order))


TABLE_START, TABLE_END = "<!-- seeds-table:start -->", "<!-- seeds-table:end -->"
ENSEMBLES_START, ENSEMBLES_END = "<!-- ensembles-table:start -->", "<!-- ensembles-table:end -->"
FER_PACKAGE_ACCURACY = 0.66  # the `fer` package's published accuracy (its README), drawn as a reference line


def epochs_label(row: dict[str, str]) -> str:
    """'50', or '40 of 50' for a run that early stopping or a time limit ended before its schedule did."""
    planned = row.get("planned_epochs") or row["epochs"]
    return row["epochs"] if planned == row["epochs"] else f"{row['epochs']} of {planned}"


def render_table(rows: list[dict[str, str]]) -> str:
    """Markdown table of results rows; PrivateTest is the headline, the gap is measured minus reported."""
    lines = ["| system | registry name | classes | reported | PublicTest | PrivateTest | gap (points) | epochs "
             "| train min | hardware |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = (float(r["private_test"]) - float(r["reported"])) * 100
        mark = "" if gap >= -1.5 else " ⚠"
        lines.append(f"| {r['system']} | `{r['registry_name']}` | {r['classes']} | {float(r['reported']):.1%} | "
                     f"{float(r['public_test']):.2%} | **{float(r['private_test']):.2%}** | {gap:+.1f}{mark} | "
                     f"{epochs_label(r)} | {r['train_minutes']} | {r['hardware']} |")
    return "\n".join(lines)


def shipped_model_accuracy() -> tuple[str, float] | None:
    """(model name, PrivateTest accuracy without TTA) of the shipped model, from the manifest beside its weights
    (written by tools/ship_model.py from `ferkit evaluate`); None when no shipped model is installed."""
    from ferkit.models.weights import default_manifest_path

    manifest = default_manifest_path()
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    for e in m.get("evaluations", []):
        if e["result"]["split"] == "PrivateTest" and e["result"]["tta"] == "none":
            return str(m.get("model")), float(e["result"]["accuracy"])
    return None


def write_report(results_dir: str | os.PathLike = "results", doc: str | os.PathLike = "docs/results.md",
                 figure: str | os.PathLike = "docs/results.png", shipped: tuple[str, float] | None = None) -> None:
    """Refresh the tables between the markers in `doc` (notes around them are kept): the seeds table from
    results/seeds.csv and, where `doc` has its markers, the ensembles table from results/ensembles.csv; and
    the comparison figure (with the shipped model's PrivateTest accuracy as a reference line unless `shipped`
    is given)."""
    from ferkit.ensembles.records import read_records
    from ferkit.ensembles.records import render_table as render_ensembles

    shipped = shipped or shipped_model_accuracy()
    doc = Path(doc)
    with locked(doc):  # runs that end together each refresh the page: one at a time, from the latest tables
        rows = read_seeds(Path(results_dir) / "seeds.csv")
        text = doc.read_text() if doc.is_file() else f"# Results\n\n{TABLE_START}\n{TABLE_END}\n"
        text = _replace_between(text, TABLE_START, TABLE_END, render_table(rows), doc)
        if ENSEMBLES_START in text:
            ensembles = read_records(Path(results_dir) / "ensembles.csv")
            text = _replace_between(text, ENSEMBLES_START, ENSEMBLES_END, render_ensembles(ensembles), doc)
        write_text(doc, text)
        if rows:
            plot_comparison(rows, figure, shipped)


def _replace_between(text: str, start: str, end: str, body: str, doc: Path) -> str:
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the markers {start} / {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def plot_comparison(rows: list[dict[str, str]], path: str | os.PathLike,
                    shipped: tuple[str, float] | None = None) -> None:
    """Horizontal bars: reported vs measured PrivateTest accuracy per system, with reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.get("name") or r["registry_name"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    ax.barh(y - 0.2, [float(r["reported"]) for r in rows], height=0.4, label="reported", color="#bbbbbb")
    ax.barh(y + 0.2, [float(r["private_test"]) for r in rows], height=0.4, label="measured (PrivateTest)",
            color="#3b75af")
    ax.axvline(FER_PACKAGE_ACCURACY, color="#c44e52", ls="--", lw=1, label="`fer` package (66 %)")
    if shipped:
        ax.axvline(shipped[1], color="#55a868", ls="-", lw=1.5, label=f"shipped {shipped[0]} ({shipped[1]:.1%})")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy")
    ax.set_xlim(0.2, 1.0)  # room on the right for the legend
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("FER2013: published vs re-measured with ferkit")
    fig.tight_layout()
    with replacing(path) as tmp:  # atomic: a kill mid-write leaves the previous figure
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=110)
    plt.close(fig)
