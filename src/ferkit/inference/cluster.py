"""`ferkit predict --ray`: the per-file work of `ferkit predict`, spread over a Ray cluster (or a local Ray).

The driver lists the inputs exactly as single-process predict does (`batch.gather_inputs`: folders, glob
patterns, file lists; a missing path or a pattern that matches nothing becomes an error row). Ray Data splits
the list into blocks and a pool of actors, each holding one Recognizer built once, runs `batch.process_input`
on every file and turns its entries into rows with `batch.entry_rows`: the same code, so the same rows, as
`ferkit predict --csv`. The workers write the rows as Parquet (or CSV) shards into one folder. A file that
fails is a row with its error; the job goes on.

Ray, Ray Data and pyarrow come with the `cluster` extra (`pip install 'ferkit[cluster]'`) and are imported
only here, only when `--ray` is used.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ferkit.inference import batch
from ferkit.ray_support import RayStartError, connect  # noqa: F401  joining Ray: shared with `ferkit sweep`

INSTALL_HINT = "Ray inference needs the cluster extra: pip install 'ferkit[cluster]'"
FORMATS = ("parquet", "csv")
# Ray Data's CSV writer quotes strings and leaves nulls unquoted and empty: reading back, "" stays "" and an
# empty field is None, so a row's values survive the round trip.
INT_COLUMNS = ("frame", "face", "x", "y", "w", "h")


def require_ray() -> Any:
    """The `ray` module, or ImportError naming the extra to install."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return ray


def row_schema(classes: list[str]) -> Any:
    """The pyarrow schema of the rows (`batch.csv_header` columns). Fixed, not inferred: a shard whose rows all
    lack faces would otherwise get null-typed face columns that no longer merge with the other shards."""
    import pyarrow as pa

    def kind(column: str) -> Any:
        if column in INT_COLUMNS:
            return pa.int64()
        if column in ("file", "dominant", "error"):
            return pa.string()
        return pa.float64()  # time, face_score, class probabilities

    return pa.schema([(c, kind(c)) for c in batch.csv_header(classes)])


def _printable(text: str) -> str:
    # A file name that is not UTF-8 reaches Python with surrogate escapes, which Arrow strings cannot hold:
    # show its undecodable bytes as U+FFFD instead of failing the whole shard.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class RecognizerActor:
    """The `map_batches` callable: one Recognizer per actor, built once and used for every batch it gets.

    `weights` are the bytes of the weights file, so a cluster's nodes need no copy of it (only ferkit).
    """

    def __init__(self, weights: bytes, weights_name: str, options: dict[str, Any], every: int) -> None:
        from ferkit.inference import Recognizer

        self._dir = tempfile.TemporaryDirectory(prefix="ferkit-ray-")  # lives as long as the actor
        path = Path(self._dir.name) / weights_name  # same name: the ONNX export cache is keyed by name + hash
        path.write_bytes(weights)
        self.rec = Recognizer(model=path, **options)
        self.every = every
        self.classes = list(self.rec.classes)
        self.schema = row_schema(self.classes)

    def __call__(self, inputs: Any) -> Any:
        import pyarrow as pa

        rows: list[dict[str, Any]] = []
        for path, display, error in zip(inputs.column("path").to_pylist(), inputs.column("display").to_pylist(),
                                        inputs.column("error").to_pylist(), strict=True):
            for entry in self._entries(path, display, error):
                rows.extend(batch.entry_rows(entry, self.classes))
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _entries(self, path: bytes, display: str, error: str | None) -> list[batch.Entry]:
        if error is not None:  # found by the driver: a missing path, a pattern without a match...
            return [batch.Entry(display, error=error)]
        file = Path(os.fsdecode(path))
        try:
            return batch.process_input(self.rec, batch.Input(file, display, Path(file.name)), self.every)
        except Exception as e:  # noqa: BLE001  anything process_input lets through must not kill a long job
            return [batch.Entry(display, error=f"failed: {type(e).__name__}: {e}")]


def input_table(inputs: list[batch.Input], errors: list[batch.Entry]) -> Any:
    """One row per file to process (path as OS bytes, how it is named) and per path the driver found bad."""
    import pyarrow as pa

    return pa.table({
        "path": pa.array([os.fsencode(i.path) for i in inputs] + [b""] * len(errors), pa.binary()),
        "display": pa.array([_printable(i.display) for i in inputs] + [_printable(e.file) for e in errors],
                            pa.string()),
        "error": pa.array([None] * len(inputs) + [e.error for e in errors], pa.string()),
    })


def check_out_dir(out: str) -> None:
    """A local output folder must be new or empty: shards of an earlier run would mix with this run's."""
    if "://" in out:  # s3://, gs://, ...: the user's bucket, not checked here
        return
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output folder {out!r} exists and is not empty (shards of another run would mix "
                              "with this one's); name a new folder")


def predict(paths: Iterable[str | os.PathLike], out: str, *, weights: str | os.PathLike, classes: list[str],
            options: dict[str, Any], every: int = 10, fmt: str = "parquet", actors: int | None = None,
            batch_size: int = 16, progress: bool = True) -> tuple[dict[str, int], int]:
    """Run the Recognizer made from `weights` + `options` (Recognizer keyword arguments) over `paths` on the
    Ray this process joined (see `connect`), writing `fmt` shards into `out`. Returns (summary counts as
    `batch.summary` gives them, non-media files skipped in folders).

    actors: how many Recognizers (default: one per CPU of the cluster, divided by `options["threads"]`).
    batch_size: files per call of an actor.
    """
    ray = require_ray()
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if every < 1 or batch_size < 1 or (actors is not None and actors < 1):
        raise ValueError("every, batch_size and actors must be at least 1")
    check_out_dir(out)
    inputs, errors, skipped = batch.gather_inputs(paths)
    table = input_table(inputs, errors)
    if table.num_rows == 0:
        raise ValueError("no paths to process")
    del inputs, errors  # the table holds them compactly (millions of paths)
    threads = options.get("threads") or 1
    gpus = 1 if str(options.get("device", "")).startswith("cuda") else 0
    if gpus:  # Ray shows each actor only its own GPU, as cuda:0: "cuda:3" would name a GPU it cannot see
        options = {**options, "device": "cuda"}
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) // (1 if gpus else threads)))
    # Blocks of a few batches each, at least ~4 per actor, so every actor gets work and a slow block (a long
    # video) does not hold the end of the run; a block is only paths, so even 4096 rows are small.
    rows = max(batch_size, min(4096, math.ceil(table.num_rows / (actors * 4))))
    blocks = [table.slice(i, rows) for i in range(0, table.num_rows, rows)]

    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = progress
    weights = Path(weights)
    ds = ray.data.from_arrow(blocks).map_batches(
        RecognizerActor, batch_size=batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"weights": weights.read_bytes(), "weights_name": weights.name,
                               "options": {**options, "threads": threads}, "every": every},
        compute=ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=threads, num_gpus=gpus)
    if fmt == "parquet":
        ds.write_parquet(out)
    else:
        ds.write_csv(out)
    return summarize(out, fmt, classes), skipped


def read_rows(out: str, fmt: str, classes: list[str], columns: list[str] | None = None) -> Any:
    """The shards in `out` as one pyarrow Table (typed by `row_schema`, for CSV shards too)."""
    import pyarrow.csv as pcsv
    import pyarrow.dataset as pds

    schema = row_schema(classes)
    if fmt == "csv":
        fmt = pds.CsvFileFormat(convert_options=pcsv.ConvertOptions(
            column_types=schema, strings_can_be_null=True, quoted_strings_can_be_null=False))
    return pds.dataset(out, format=fmt, schema=schema).to_table(columns=columns)


def summarize(out: str, fmt: str, classes: list[str]) -> dict[str, int]:
    """`batch.summary`'s counts from the written shards (read back: the workers, not the driver, hold the rows)."""
    t = read_rows(out, fmt, classes, ["file", "face", "error"]).to_pydict()
    files, faces, errors = t["file"], t["face"], t["error"]
    first = [f is None or f == 1 for f in faces]  # one row per entry is its no-face row or its first face
    return {"entries": sum(first), "faces": sum(f is not None for f in faces),
            "without_face": sum(f is None and e is None for f, e in zip(faces, errors, strict=True)),
            "errors": sum(k and e is not None for k, e in zip(first, errors, strict=True)),
            "files": len(set(files)),
            "failed_files": len({f for f, e in zip(files, errors, strict=True) if e is not None})}
