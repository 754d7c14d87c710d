"""`ferkit predict`, `ferkit demo`, `ferkit explain`: using a trained model on pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ferkit.cli._app import BACKEND_HELP, PRIOR_HELP, THREADS_HELP, TTA_HELP, WEIGHTS_HELP, _fail, app, literal

PREDICT_EPILOG = """
Examples:

  ferkit predict                                   (the bundled sample photo; writes ferkit-demo.jpg)

  ferkit predict photo.jpg group.png               (a table of faces and emotions)

  ferkit predict photos/ --json results.json --csv results.csv --annotate annotated/

  ferkit predict clip.mp4 --every 15               (every 15th frame, with timestamps)

  ferkit predict clip.mp4 --annotate out/          (also out/clip.annotated.mp4 and out/clip.emotions.png)

  ferkit predict crops/ --detector none            (images that are already face crops)

  ferkit predict photo.jpg --weights runs/ferkit_vgg_s-20261123-101500/best.safetensors --tta flip

  ferkit predict photo.jpg --json -                (only JSON, on stdout)

  ferkit predict 'photos/**/*.jpg' --file-list more.txt --csv faces.csv   (quoted glob; one path a line)

  ferkit predict photos/ --ray local --out faces/   (Parquet shards; needs the cluster extra)

  ferkit predict --file-list all.txt --ray auto --out s3://bucket/faces/ --format csv   (on a Ray cluster)

Folders are searched recursively for images (.jpg .png .bmp .gif .tif .webp ...) and videos
(.mp4 .avi .mov .mkv .webm ...). Detectors: retinaface (CNN, default), haar (OpenCV cascade, fast),
none (the whole image is the face). Each face is cropped like FER2013's faces (tight, upright,
grayscale, 48x48) before classification. A picture without a face is a result (no faces; exit code 0).
A file that cannot be read (corrupt, truncated, empty, not an image, over the 50-megapixel guard) becomes
an error entry in the table, JSON and CSV; the other files are still processed, and the exit code is 1,
with the number of such files on stderr. Bad weights (missing, corrupt, inconsistent metadata) stop the
command before any file, with exit code 2, as usage errors do.

Paths that do not exist but hold * ? or [ are glob patterns (quote them; ** spans folders). With --ray,
actors each holding one recognizer process the files on Ray (a local one or a cluster: every node needs
ferkit installed; --out must be storage every node writes to) and write one row per face, the columns
and values of --csv, as Parquet or CSV shards into --out; see docs/scale-out.md.
"""


def weights_file(weights: Path | None) -> Path:
    """The file --weights names (a shipped model's name, a run directory's best.safetensors, a path); a usage
    error if there is none."""
    from ferkit.models.weights import find_weights

    try:
        return find_weights(weights, how="pass --weights PATH")
    except FileNotFoundError as e:
        _fail(str(e))
        raise  # unreachable: _fail exits


def _recognizer(weights: Path | None, detector: str, tta: str, device: str, min_face_score: float = 0.0,
                backend: str = "torch", threads: int | None = None, prior: str = "none"):
    from ferkit.inference import Recognizer
    from ferkit.models.predict import TTA_CHOICES

    if tta not in TTA_CHOICES:
        _fail(f"unknown --tta {tta!r}; choose one of {', '.join(TTA_CHOICES)}")
    check_threads_option(threads)
    path = weights_file(weights)
    try:
        return Recognizer(model=path, detector=detector, device=device, tta=tta, min_face_score=min_face_score,
                          backend=backend, threads=threads, prior=prior)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        _fail(str(e))
    except Exception as e:  # corrupt or foreign weights file: safetensors raises its own error type
        _fail(f"cannot load weights {str(weights)!r}: {e}")


def check_threads_option(threads: int | None) -> None:
    """--threads below 1 is a usage error (more than the CPUs this process may use is lowered to them)."""
    if threads is not None and threads < 1:
        from ferkit.device import available_cpus

        _fail(f"--threads must be at least 1, got {threads} (leave it out for the default: {available_cpus()} here)")


def _run_predict(rec, paths: list[Path], json_out: str | None, csv_out: Path | None, annotate: Path | None,
                 annotate_file: Path | None, every: int, progress: bool) -> None:
    import sys

    from ferkit.inference import batch

    if every < 1:
        _fail(f"--every must be at least 1, got {every}")
    outputs: list[str] = []  # annotated videos and emotion-over-time plots
    try:
        entries, skipped = batch.run(rec, paths, every=every, annotate_dir=annotate, progress=progress,
                                     annotate_file=annotate_file, outputs=outputs)
    except OSError as e:
        _fail(f"cannot write output: {e}")
    info = {"model": rec.meta.get("model"), "weights": str(rec.weights_path),
            "detector": getattr(rec.detector, "name", str(rec.detector)), "tta": rec.tta,
            "classes": rec.classes}
    stats = batch.summary(entries)
    note = (f"{stats['files']} file(s), {stats['faces']} face(s), {stats['without_face']} picture(s) or frame(s) "
            f"without a face, {stats['errors']} error(s)")
    if skipped:
        note += f"; {skipped} non-image file(s) in folders skipped"
    try:
        if json_out == "-":
            batch.write_json(entries, sys.stdout, info)
            typer.echo(note, err=True)
        else:
            if entries:
                typer.echo(batch.format_table(entries))
            typer.echo(note)
            if json_out:
                batch.write_json(entries, json_out, info)
                typer.echo(f"wrote JSON: {json_out}")
        if csv_out is not None:
            batch.write_csv(entries, csv_out, rec.classes)
            if json_out != "-":
                typer.echo(f"wrote CSV: {csv_out}")
    except OSError as e:
        _fail(f"cannot write output: {e}")
    written = [e.annotated for e in entries if e.annotated]
    if written and json_out != "-":
        typer.echo(f"wrote annotated image: {Path(written[0]).resolve()}" if annotate_file is not None
                   else f"wrote {len(written)} annotated image(s) to {annotate}")
    if json_out != "-":
        for path in outputs:
            typer.echo(f"wrote {'emotion-over-time plot' if path.endswith('.png') else 'annotated video'}: {path}")
    if stats["failed_files"]:
        typer.secho(f"error: {stats['failed_files']} of {stats['files']} file(s) could not be read (see their "
                    "error entries)", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@app.command(epilog=PREDICT_EPILOG)
def predict(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="Images, folders (searched recursively) or videos; none: the bundled sample photo.")] = None,
    json_out: Annotated[str | None, typer.Option(
        "--json", help="Write the results as JSON to this file ('-': print only JSON on stdout).")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write one row per face to this CSV file.")] = None,
    annotate: Annotated[Path | None, typer.Option(
        help="Write annotated copies (boxes, dominant emotion, probability bars) into this folder.")] = None,
    every: Annotated[int, typer.Option(help="Videos: analyse every N-th frame.")] = 10,
    detector: Annotated[str, typer.Option(help="Face detector: retinaface | haar | none.")] = "retinaface",
    weights: Annotated[Path | None, typer.Option(
        help=WEIGHTS_HELP)] = None,
    tta: Annotated[str, typer.Option(help=TTA_HELP)] = "auto",
    min_face_score: Annotated[float, typer.Option(help="Ignore faces the detector is less sure of.")] = 0.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, show_default=False)] = None,
    prior: Annotated[str, typer.Option(help=PRIOR_HELP)] = "none",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    file_list: Annotated[Path | None, typer.Option(
        help="Also process the paths in this text file, one a line (any number of files).")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS", help=literal(
            "Run on Ray: local (start one on this machine) | auto (the cluster this machine joined with `ray "
            "start`) | HOST:PORT | ray://HOST:PORT. Needs --out and ferkit[cluster]."),
        show_default=False)] = None,
    out: Annotated[str | None, typer.Option(
        help="With --ray: a new folder (or s3://... URI) for the shards.", show_default=False)] = None,
    shard_format: Annotated[str, typer.Option("--format", help="With --ray: parquet | csv.")] = "parquet",
    actors: Annotated[int | None, typer.Option(
        help="With --ray: recognizers (Ray actors). Default: the cluster's CPUs / --threads.",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="With --ray: files per actor call.")] = 16,
) -> None:
    """Detect faces in images, folders and videos and classify their emotions."""
    from ferkit.inference.image_io import sample_image_path

    paths = list(paths or [])
    if file_list is not None:
        paths += _read_file_list(file_list)
    if ray is not None or out is not None:
        _check_ray_options(ray, out, shard_format, actors, batch_size, paths, json_out, csv_out, annotate)
    rec = _recognizer(weights, detector, tta, device, min_face_score, backend, 1 if ray and not threads else threads,
                      prior)
    if ray is not None:
        options = {"detector": detector, "device": device, "tta": rec.tta, "min_face_score": min_face_score,
                   "backend": backend, "threads": threads or 1, "prior": prior}  # one thread per actor unless told
        _run_on_ray(rec, paths, ray, str(out), shard_format, options, every, actors, batch_size, progress)
        return
    annotate_file = None
    if not paths:
        paths = [sample_image_path()]
        annotate_file = None if annotate is not None else Path("ferkit-demo.jpg")
    _run_predict(rec, paths, json_out, csv_out, annotate, annotate_file, every, progress)


def _read_file_list(file_list: Path) -> list[str]:
    from ferkit.inference import batch

    try:
        return batch.read_file_list(file_list)
    except OSError as e:
        _fail(f"--file-list {str(file_list)!r}: {e.strerror or e}")
    except ValueError as e:
        _fail(f"--file-list: {e}")
    raise AssertionError("unreachable: _fail exits")


def _check_ray_options(ray: str | None, out: str | None, shard_format: str, actors: int | None, batch_size: int,
                       paths: list, json_out: str | None, csv_out: Path | None, annotate: Path | None) -> None:
    """Usage errors of the --ray options, before any model or Ray is loaded."""
    from ferkit.inference import cluster

    if ray is None:
        _fail("--out is the shard folder of --ray; without --ray, write results with --json / --csv")
    if not ray.strip():
        _fail("--ray needs an address: local, auto, HOST:PORT or ray://HOST:PORT")
    if out is None:
        _fail("--ray writes its rows as shards: name a new folder with --out DIR")
    taken = [name for name, value in (("--json", json_out), ("--csv", csv_out), ("--annotate", annotate)) if value]
    if taken:
        _fail(f"{', '.join(taken)} cannot be used with --ray (its rows go to --out, as --format {shard_format} "
              "shards)")
    if shard_format not in cluster.FORMATS:
        _fail(f"unknown --format {shard_format!r}; choose one of {', '.join(cluster.FORMATS)}")
    if actors is not None and actors < 1 or batch_size < 1:
        _fail(f"--actors and --batch-size must be at least 1, got {actors} and {batch_size}")
    if not paths:
        _fail("--ray needs PATHS or --file-list (it has no bundled-sample default)")
    try:
        cluster.check_out_dir(str(out))
        cluster.require_ray()
    except (FileExistsError, ImportError) as e:
        _fail(str(e))


def _run_on_ray(rec, paths: list, address: str, out: str, shard_format: str, options: dict, every: int,
                actors: int | None, batch_size: int, progress: bool) -> None:
    from ferkit.inference import cluster

    if every < 1:
        _fail(f"--every must be at least 1, got {every}")
    try:
        started = cluster.connect(address)
    except cluster.RayStartError as e:  # whatever ray.init raised, with the address and its type
        _fail(str(e))
    try:
        stats, skipped = cluster.predict(paths, out, weights=rec.weights_path, classes=list(rec.classes),
                                         options=options, every=every, fmt=shard_format, actors=actors,
                                         batch_size=batch_size, progress=progress)
    except (OSError, ValueError) as e:
        _fail(str(e))
    except Exception as e:  # an actor that cannot start (e.g. a node without ferkit), a lost node...
        _fail(f"the Ray job failed: {type(e).__name__}: {e}", code=1)
    finally:
        if started:
            import ray

            ray.shutdown()
    note = (f"{stats['files']} file(s), {stats['faces']} face(s), {stats['without_face']} picture(s) or frame(s) "
            f"without a face, {stats['errors']} error(s)")
    if skipped:
        note += f"; {skipped} non-image file(s) in folders skipped"
    typer.echo(f"{note}\nwrote {shard_format} shards: {out}")
    if stats["failed_files"]:
        typer.secho(f"error: {stats['failed_files']} of {stats['files']} file(s) could not be read (see the "
                    "rows with an error)", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@app.command(epilog="""
Examples:

  ferkit demo                                  (writes ferkit-demo.jpg in the current folder)

  ferkit demo --out /tmp/demo.jpg --detector haar

The sample photo is NASA's public-domain portrait of astronaut Eileen Collins (from scikit-image's
sample data); see ferkit/assets/README.md.
""")
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the annotated photo.")] = Path("ferkit-demo.jpg"),
    detector: Annotated[str, typer.Option(help="Face detector: retinaface | haar | none.")] = "retinaface",
    weights: Annotated[Path | None, typer.Option(
        help=WEIGHTS_HELP)] = None,
    tta: Annotated[str, typer.Option(help=TTA_HELP)] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Run the recognizer on the bundled sample photo and write the annotated result."""
    from ferkit.inference.image_io import sample_image_path

    rec = _recognizer(weights, detector, tta, device)
    _run_predict(rec, [sample_image_path()], None, None, None, out, 1, False)


EXPLAIN_EPILOG = """
Examples:

  ferkit explain photo.jpg --out explain/             (one PNG per face found)

  ferkit explain --data fer2013.csv.gz --row 32298    (a FER2013 face, by 0-based data row)

  ferkit explain photo.jpg --target happy --weights runs/x/best.safetensors

Each PNG shows the 48x48 face crop the model saw, its saliency map (|d score / d pixel|, as in
Khaireddin & Chen 2021) and a Grad-CAM overlay on the last convolution layer, for the predicted class
(or --target); the title gives the predicted label and the top-3 probabilities (no TTA). For a saved
ensemble, Grad-CAM is the member-weighted mean of each member's map.
"""


@app.command(epilog=EXPLAIN_EPILOG)
def explain(
    image: Annotated[Path | None, typer.Argument(help="Photo to explain (every detected face).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("explain"),
    weights: Annotated[Path | None, typer.Option(
        help=WEIGHTS_HELP)] = None,
    detector: Annotated[str, typer.Option(help="Face detector: retinaface | haar | none.")] = "retinaface",
    data: Annotated[Path | None, typer.Option(help="FER2013 CSV: explain one of its faces (with --row).")] = None,
    row: Annotated[int | None, typer.Option(help="With --data: the 0-based data row (header excluded).")] = None,
    target: Annotated[str | None, typer.Option(help="Explain this class instead of the predicted one.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Show what a model looks at: face crop, saliency map and Grad-CAM per face, as PNGs."""
    import numpy as np

    from ferkit.explain import explain_faces, plot_explanation
    from ferkit.inference.image_io import ImageError

    if (image is None) == (data is None):
        _fail("give either an IMAGE or --data CSV --row N")
    if data is not None and row is None:
        _fail("--data needs --row N (the 0-based data row of the face to explain)")
    if row is not None and data is None:
        _fail("--row needs --data CSV")
    truths: list[str | None] = []
    titles: list[str] = []
    names: list[str] = []
    if image is not None:
        rec = _recognizer(weights, detector, "none", device)
        try:
            _, dets, faces = rec.detect_faces(image)
        except ImageError as e:
            _fail(str(e))
        if len(faces) == 0:
            typer.secho(f"{image}: no face found (detector: {getattr(rec.detector, 'name', detector)})", err=True,
                        fg=typer.colors.RED)
            raise typer.Exit(1)
        model, meta = rec.model, rec.meta
        for i, det in enumerate(dets, 1):
            titles.append(f"{image.name}, face {i} at x,y,w,h = {','.join(str(int(v)) for v in det.box)}")
            names.append(f"{image.stem}_face{i}.png")
            truths.append(None)
    else:
        from ferkit.data import DataError, load_dataset
        from ferkit.models.weights import load_model

        path = weights_file(weights)
        if not data.exists():
            _fail(f"data file {str(data)!r} not found")
        try:
            from ferkit.device import resolve_device

            model, meta = load_model(path, resolve_device(device))
            dataset = load_dataset(str(data), "fer7", skip_bad_rows=True)
        except (DataError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
        except Exception as e:  # corrupt or foreign weights file
            _fail(f"cannot load weights {str(path)!r}: {e}")
        hits = np.flatnonzero(dataset.rows == row)
        if len(hits) == 0:
            _fail(f"row {row} is not a usable face row of {data} (data rows 0..{int(dataset.rows.max())})")
        k = int(hits[0])
        faces = dataset.images[k:k + 1]
        truths.append(dataset.label_set.classes[int(dataset.labels[k])])
        titles.append(f"{data.name} row {row} ({dataset.usage[k]})")
        names.append(f"{Path(data.name).name.split('.')[0]}_row{row}.png")
    classes = list(meta.get("classes") or [])
    target_index = None
    if target is not None:
        if target not in classes:
            _fail(f"--target {target!r} is not one of the model's classes: {', '.join(classes)}")
        target_index = classes.index(target)
    try:
        explanations = explain_faces(model, meta, faces, target_index)
        for exp, title, name, truth in zip(explanations, titles, names, truths, strict=True):
            written = plot_explanation(exp, classes, out / name, title=title, truth=truth)
            top = ", ".join(f"{c} {p:.2f}" for c, p in exp.top(classes, 3))
            typer.echo(f"wrote {written}  ({top}" + (f"; true: {truth})" if truth else ")"))
    except ValueError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write output: {e}")
