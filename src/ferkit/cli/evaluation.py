"""`ferkit evaluate`, `ferkit ensemble`: scoring models and combining them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ferkit.cli._app import (
    LABEL_MODE_HELP,
    LABELS_HELP,
    PRECISION_HELP,
    PRIOR_HELP,
    THREADS_HELP,
    TTA_HELP,
    WEIGHTS_HELP,
    _fail,
    app,
    check_labels_options,
    check_output_file,
)

TTA_SELECT = "select"  # evaluate's extra --tta: choose the mode on PublicTest (evaluation.select_tta)

EVALUATE_EPILOG = """
Examples:

  ferkit evaluate --data fer2013.csv.gz          (shipped model, PrivateTest)

  ferkit evaluate --weights runs/ferkit_vgg_s-20261123-101500/best.safetensors \\
      --data fer2013.csv.gz --split test --tta tencrop --out eval/vgg_s

  ferkit evaluate --weights best.safetensors --data fer2013.csv.gz \\
      --split val --json > val.json

  ferkit evaluate --weights best.safetensors --data fer2013.csv.gz \\
      --save-probs test_probs.npz

  ferkit evaluate --weights best.safetensors --data fer2013.csv.gz \\
      --tta select          (TTA chosen on PublicTest, reported on PrivateTest)

The data is loaded with the label set stored in the weights (fer7 or fer6).
--json prints only one JSON object on stdout (accuracy, per_class,
confusion_matrix, macro_avg, weighted_avg, ...). --out writes
confusion_matrix.png, confusion_matrix_normalized.png, errors.png, report.txt
and metrics.json. --save-probs writes an .npz with probs (N, C), labels, rows
(source row indices), classes and split, for ensembling and calibration.
"""


@app.command(epilog=EVALUATE_EPILOG)
def evaluate(
    data: Annotated[str, typer.Option(help="FER2013 CSV (.csv or .csv.gz) or image-folder root.")],
    weights: Annotated[Path | None, typer.Option(
        help=WEIGHTS_HELP)] = None,
    split: Annotated[str, typer.Option(
        help="Training | PublicTest | PrivateTest (or train / val / test).")] = "PrivateTest",
    tta: Annotated[str, typer.Option(help=TTA_HELP.removesuffix(".") + " | select: evaluate every mode on "
                                     "PublicTest and score --split with the most accurate (ties: fewer views), the "
                                     "protocol's way to report a model with its best TTA (a saved ensemble was "
                                     "fitted on PublicTest under its own mode, which select then favours).")
                 ] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON object on stdout.")] = False,
    save_probs: Annotated[Path | None, typer.Option(
        help="Write class probabilities, labels and row indices to this .npz file.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Directory for the confusion-matrix and error PNGs, report.txt and metrics.json.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(
        help=PRECISION_HELP + " Default fp32, in which the recorded accuracies were measured.")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Faces per forward pass.")] = 256,
    skip_bad_rows: Annotated[bool, typer.Option(
        help="Leave out malformed CSV rows instead of failing.")] = False,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, show_default=False)] = None,
    labels: Annotated[Path | None, typer.Option(help=LABELS_HELP, show_default=False)] = None,
    label_mode: Annotated[str, typer.Option(help=LABEL_MODE_HELP)] = "majority",
    prior: Annotated[str, typer.Option(help=PRIOR_HELP)] = "none",
) -> None:
    """Score a trained model on one split: accuracy, per-class precision/recall/F1, confusion matrix."""
    import json

    from ferkit.cli.inference import check_threads_option, weights_file
    from ferkit.data import DataError, canonical_split, load_dataset
    from ferkit.device import set_threads
    from ferkit.evaluation import (
        SELECTION_SPLIT,
        format_confusion,
        format_report,
        format_summary,
        select_tta,
        write_artifacts,
    )
    from ferkit.evaluation import evaluate as run_evaluation
    from ferkit.evaluation import save_probs as write_probs
    from ferkit.models.predict import TTA_CHOICES
    from ferkit.models.weights import load_model

    if tta not in (choices := (*TTA_CHOICES, TTA_SELECT)):
        _fail(f"unknown --tta {tta!r}; choose one of {', '.join(choices)}")
    if batch_size < 1:
        _fail(f"--batch-size must be positive, got {batch_size}")
    try:
        split = canonical_split(split)
    except ValueError as e:
        _fail(str(e))
    if not Path(data).exists():
        _fail(f"data file {data!r} not found "
              "(pass --data PATH to fer2013.csv, fer2013.csv.gz or an image folder)")
    check_labels_options(labels, label_mode)
    weights_path = weights_file(weights)
    check_threads_option(threads)
    set_threads(threads)
    try:
        model, meta = load_model(weights_path)
    except ValueError as e:  # ferkit's own checks (WeightsError) name the file and the problem
        _fail(str(e))
    except Exception as e:  # corrupt or foreign file: safetensors raises its own error type
        _fail(f"cannot load weights {str(weights_path)!r}: {e}")
    try:
        dataset = load_dataset(data, meta.get("label_set") or "fer7", skip_bad_rows=skip_bad_rows,
                               labels=str(labels) if labels else None, label_mode=label_mode)
        settings = dict(batch_size=batch_size, device=device, precision=precision, weights_path=weights_path,
                        prior=prior)
        selection = select_tta(model, meta, dataset, **settings) if tta == TTA_SELECT else None
        if selection is not None and split == SELECTION_SPLIT:
            result = selection.results[selection.chosen]  # already scored while choosing
        else:
            result = run_evaluation(model, meta, dataset, split, tta=selection.chosen if selection else tta,
                                    **settings)
        if selection is not None:
            result.extra["tta_selection"] = selection.to_json()
        result.extra["weights"] = str(weights_path)
        artifacts = {}
        if save_probs is not None:
            artifacts["probs"] = str(write_probs(result, save_probs))
        if out is not None:
            images = dataset.split(split).images
            artifacts.update({k: str(v) for k, v in write_artifacts(result, images, out).items()})
    except (DataError, ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    if artifacts:
        result.extra["artifacts"] = artifacts
    if json_output:
        typer.echo(json.dumps(result.to_json(), indent=2, allow_nan=False))
        return
    typer.echo(format_summary(result))
    typer.echo(format_report(result.report))
    typer.echo(format_confusion(result))
    if dataset.skipped:
        typer.echo("skipped while loading: " + ", ".join(f"{n} {why}" for why, n in dataset.skipped.items()))
    if dataset.dropped_per_split:
        typer.echo("dropped by the FER+ labels: " + ", ".join(f"{n} {split}" for split, n in
                                                             dataset.dropped_per_split.items()))
    for name, path in artifacts.items():
        typer.echo(f"wrote {name}: {path}")



ENSEMBLE_EPILOG = """
Examples:

  ferkit ensemble --from-predictions results/predictions/*.npz --label-set fer7

  ferkit ensemble --from-predictions results/predictions/*.npz --label-set fer7 \\
      --method accuracy_weighted --json

  ferkit ensemble --weights runs/a/best.safetensors runs/b/best.safetensors \\
      --data fer2013.csv.gz --method greedy --tta flip \\
      --save ensemble.safetensors

  ferkit ensemble --snapshots runs/sixclass_cnn4-20261123-101500 \\
      --last 9 --data fer2013.csv.gz --method mean --plot snapshots.png

  ferkit evaluate --weights ensemble.safetensors --data fer2013.csv.gz

--label-set fer7 keeps the 7-class members of a glob that also holds
6-class ones (the 6-class systems drop disgust) and names those it left out.

Methods: mean (average of the members' probabilities); accuracy_weighted
(weights = each member's PublicTest accuracy / their sum); class_weighted
(member m's class-c column scaled by its PublicTest precision for class c,
then renormalized); vote (majority of argmax votes, ties broken by summed
probability); greedy (forward selection, with replacement, of the members
whose average is most accurate on PublicTest); log_linear (a weighted
geometric mean: one non-negative exponent per member, fitted to the
PublicTest likelihood, so near-duplicates share weight and over-confident
members are tempered); all (a table of every method, the default).
Weights are always fitted on PublicTest; PrivateTest is the held-out score.

--from-predictions reads results/predictions/*.npz (from `ferkit
reproduce`) and runs no model. --weights / --snapshots run every member on
both test splits of --data (--snapshots: a run trained with --save-every
N). Files after the options join the --from-predictions or --weights list,
so shell globs work. --save-predictions DIR keeps each run member's
probabilities (DIR/<member>.npz) for --from-predictions. --save writes one
.safetensors file holding the members and the fitted weights; `ferkit
evaluate --weights` accepts it.
"""


@app.command(epilog=ENSEMBLE_EPILOG)
def ensemble(
    files: Annotated[list[Path] | None, typer.Argument(
        help="More member files (.npz predictions or .safetensors weights).")] = None,
    from_predictions: Annotated[list[Path] | None, typer.Option(
        "--from-predictions", help="Prediction files results/predictions/<name>.npz (no model runs).")] = None,
    weights: Annotated[list[Path] | None, typer.Option(help="Members' weights files (.safetensors).")] = None,
    snapshots: Annotated[Path | None, typer.Option(
        help="Run directory whose snapshots (train with --save-every N) are the members.")] = None,
    last: Annotated[int, typer.Option(help="With --snapshots: use the last N snapshots.")] = 9,
    data: Annotated[str | None, typer.Option(
        help="FER2013 CSV (.csv or .csv.gz) to run the members on (--weights / --snapshots).")] = None,
    method: Annotated[str, typer.Option(
        help="mean | accuracy_weighted | class_weighted | vote | greedy | log_linear | all.")] = "all",
    tta: Annotated[str, typer.Option(
        help=TTA_HELP.replace("Test-time augmentation", "Test-time augmentation when running models"))] = "auto",
    label_set: Annotated[str | None, typer.Option(
        help="Keep only the members that predict this label set (fer7 | fer6) and say which were left out; "
             "lets one glob over results/predictions/ hold both.")] = None,
    max_members: Annotated[int | None, typer.Option(
        help="greedy: selection steps, repeats included (default: the number of members). log_linear: use at "
             "most N networks, chosen one at a time by PublicTest likelihood (with --from-predictions, a file "
             "NAME_<tta>.npz that records that TTA counts with NAME.npz as one network).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON object on stdout.")] = False,
    save: Annotated[Path | None, typer.Option(
        help="Write the fitted ensemble (members + weights) to this .safetensors file; needs one --method.")] = None,
    half: Annotated[bool, typer.Option(
        "--half", help="With --save: store the members' float tensors in fp16, half the size (computed in fp32 "
                       "after loading, as the shipped weights are).")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a members-vs-ensembles bar chart (PNG).")] = None,
    save_predictions: Annotated[Path | None, typer.Option(
        help="With --weights / --snapshots: write each member's probabilities on both test splits to "
             "DIR/<member>.npz, so later ensembles run from them with --from-predictions.")] = None,
    record: Annotated[str | None, typer.Option(
        help="Record every method's result as rows NAME/<method> in --records (with this command).")] = None,
    records: Annotated[Path, typer.Option(help="The results table --record writes.")] = Path(
        "results/ensembles.csv"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(
        help=PRECISION_HELP + " Default fp32, as `ferkit evaluate`: the same scores on every machine.")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Faces per forward pass.")] = 256,
    labels: Annotated[Path | None, typer.Option(
        help=LABELS_HELP + " With --weights / --snapshots.", show_default=False)] = None,
    label_mode: Annotated[str, typer.Option(help=LABEL_MODE_HELP)] = "majority",
) -> None:
    """Combine models or saved predictions: fit ensemble weights on PublicTest, report PrivateTest."""
    import json

    from ferkit.data import DataError
    from ferkit.ensembles import (
        METHODS,
        canonical_method,
        evaluate_methods,
        format_table,
        load_prediction_files,
        member_classes,
        plot_members_vs_ensemble,
        predict_members,
        save_ensemble,
        save_member_predictions,
        snapshot_members,
    )
    from ferkit.models.predict import TTA_CHOICES, model_tta
    from ferkit.models.weights import read_metadata, resolve_weights

    methods: list[str] = []
    try:
        methods = list(METHODS) if method.strip().lower() == "all" else [canonical_method(method)]
    except ValueError as e:
        _fail(f"{e} (or all)")
    if tta not in TTA_CHOICES:
        _fail(f"unknown --tta {tta!r}; choose one of {', '.join(TTA_CHOICES)}")
    if batch_size < 1:
        _fail(f"--batch-size must be positive, got {batch_size}")
    if save is not None:
        check_output_file(save, "--save")
    if max_members is not None and max_members < 1:
        _fail(f"--max-members must be positive, got {max_members}")
    extra = list(files or [])
    modes = [flag for flag, given in (("--from-predictions", from_predictions), ("--weights", weights),
                                      ("--snapshots", snapshots)) if given]
    if len(modes) > 1:
        _fail(f"give only one of {', '.join(modes)}")
    if not modes:
        if not extra:
            _fail("no members: pass --from-predictions FILES..., --weights FILES... or --snapshots RUN_DIR")
        kinds = {p.suffix == ".npz" for p in extra}
        if len(kinds) > 1:
            _fail("members are either all prediction files (.npz) or all weights files (.safetensors), not a mix: "
                  "write the weights' predictions first (`ferkit ensemble --weights W... --data CSV --save-predictions "
                  "results/predictions`), or pass the others' weights")
        modes = ["--from-predictions" if kinds == {True} else "--weights"]
    mode = modes[0]
    check_labels_options(labels, label_mode)
    if labels is not None and mode == "--from-predictions":
        _fail("--labels applies when ensembles run models (--weights / --snapshots); prediction files carry the "
              "labels they were made with")
    paths: list[Path] = []
    if mode == "--snapshots":
        if extra:
            _fail(f"unexpected files with --snapshots: {', '.join(map(str, extra))}")
        if last < 1:
            _fail(f"--last must be positive, got {last}")
        try:
            paths = snapshot_members(snapshots, last)
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
    else:
        paths = list(from_predictions or weights or []) + extra
        if mode == "--weights":  # a training run's directory stands for its best.safetensors
            paths = [resolve_weights(p) for p in paths]
    for p in paths:
        if not p.is_file():
            _fail(f"member file {str(p)!r} not found")
    if label_set is not None:
        from ferkit.data.labels import get_label_set

        try:
            wanted = list(get_label_set(label_set).classes)
        except ValueError as e:
            _fail(str(e))
        try:
            keep = [member_classes(p) == wanted for p in paths]
        except Exception as e:  # corrupt .npz or weights file: numpy and safetensors raise their own types
            _fail(f"cannot read a member's classes: {e}")
        left_out = [str(p) for p, k in zip(paths, keep, strict=True) if not k]
        if left_out:
            typer.echo(f"--label-set {label_set}: left out {len(left_out)} member(s) with other classes: "
                       + ", ".join(left_out), err=True)
        paths = [p for p, k in zip(paths, keep, strict=True) if k]
    # One weights file with --save-predictions (and nothing that needs an ensemble) only writes its predictions.
    export_only = (len(paths) == 1 and save_predictions is not None and mode != "--from-predictions"
                   and save is None and plot is None and record is None)
    if len(paths) < 2 and not export_only:
        _fail(f"an ensemble needs at least two members, got {len(paths)} (one weights file with "
              "--save-predictions DIR only writes its predictions)")
    if half and save is None:
        _fail("--half applies to --save (the ensemble file it writes); give --save FILE")
    if save is not None and len(methods) != 1:
        _fail("--save needs a single --method (not all)")

    if mode == "--from-predictions":
        if save is not None:
            _fail("--save needs the members' weights (--weights or --snapshots); prediction files hold no model")
        if tta not in ("auto", "none"):
            _fail("--tta applies when running models; each prediction file already records the TTA it used")
        if data is not None:
            _fail("--data is not used with --from-predictions (the files already hold both test splits)")
        if save_predictions is not None:
            _fail("--save-predictions writes the predictions of models run with --weights / --snapshots; "
                  "--from-predictions members already are prediction files")
        try:
            members = load_prediction_files(paths)
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e) + (" (--label-set fer7 or fer6 keeps only the members of one label set)"
                            if "same label set" in str(e) else ""))
    else:
        if data is None:
            _fail(f"{mode} runs the members: pass --data PATH to fer2013.csv or fer2013.csv.gz")
        if not Path(data).exists():
            _fail(f"data file {data!r} not found (pass --data PATH to fer2013.csv or fer2013.csv.gz)")
        member_ttas = set()
        for p in paths:
            try:
                member_ttas.add(model_tta(tta, read_metadata(p)))
            except Exception as e:  # corrupt or foreign file: safetensors raises its own error type
                _fail(f"cannot load weights {str(p)!r}: {e}")
        if save is not None and len(member_ttas) > 1:
            # A saved ensemble runs every member under one TTA mode; its weights must be fitted under that mode.
            _fail(f"--tta auto runs these members under different views ({', '.join(sorted(member_ttas))}); "
                  "pass one --tta for all of them to --save the ensemble")
        tta = member_ttas.pop() if len(member_ttas) == 1 else tta
        try:
            faces = data
            if labels is not None:  # FER+ labels: the members' label set, its rows and labels from the votes
                from ferkit.data import load_dataset

                faces = load_dataset(data, read_metadata(paths[0]).get("label_set") or "fer7", labels=str(labels),
                                     label_mode=label_mode)
            members = predict_members(paths, faces, tta=tta, batch_size=batch_size, device=device,
                                      precision=precision)
        except (DataError, ValueError, FileNotFoundError, OSError) as e:
            _fail(str(e))
    if export_only:
        try:
            written = save_member_predictions(members, save_predictions)
        except (ValueError, OSError) as e:
            _fail(str(e))
        if json_output:
            typer.echo(json.dumps({"artifacts": {"predictions": str(written[0])}}, indent=2))
        else:
            typer.echo(f"wrote predictions: {written[0]} (one member, nothing to combine)")
        return
    try:
        report = evaluate_methods(members, methods, max_members=max_members)
    except ValueError as e:
        _fail(str(e))
    artifacts: dict[str, str] = {}
    try:
        if save is not None:
            row = report.ensembles[0]
            save_ensemble(save, paths, report.weights[methods[0]], tta=tta, half=half,
                          extra={"fitted_on": "PublicTest", "public_accuracy": row["public_accuracy"],
                                 "private_accuracy": row["private_accuracy"], "data": str(data),
                                 "member_files": [str(p) for p in paths]})
            artifacts["ensemble"] = str(save)
        if save_predictions is not None:
            written = save_member_predictions(members, save_predictions)
            artifacts["predictions"] = ", ".join(map(str, written))
        if plot is not None:
            plot_members_vs_ensemble(report.rows(), plot)
            artifacts["plot"] = str(plot)
        if record is not None:
            from ferkit.ensembles.records import record_report
            from ferkit.training.report import command_line

            record_report(report, record, command_line(), records)
            artifacts["records"] = f"{records} ({record}/*)"
    except (ValueError, OSError) as e:
        _fail(str(e))
    if json_output:
        doc = report.to_json() | ({"artifacts": artifacts} if artifacts else {})
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    typer.echo(format_table(report))
    for name, path in artifacts.items():
        typer.echo(f"wrote {name}: {path}")
