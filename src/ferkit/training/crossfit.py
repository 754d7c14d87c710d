"""Cross-fitted distillation targets: every training face scored by networks that never saw it.

Offline distillation from networks trained on the very faces they score gives targets close to the labels (the
3-network teacher is 84 % right on its own training faces, 70 % on faces it has not seen; docs/results.md). Cross-
fitting (stacking's out-of-fold predictions) removes that: N runs with `holdout=K/N` (K = 1..N) each train on the
Training faces outside fold K, and `crossfit_targets` scores each fold with the runs that held it out, giving one
probability row per Training face. `teacher=FILE.npz` distils from that file (offline: the faces as they are).

The file is NumPy's .npz, read without pickles: probabilities (N, C) float32, rows (N,) the faces' row indices in
the source CSV (how a student's faces are joined to them, checked against the labels), labels (N,), classes (C,),
and meta, a JSON string (format, data_sha256, folds, the TTA view, and per run its holdout, weights and held-out
accuracy).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile

from ferkit.data import FaceData, file_sha256, load_dataset
from ferkit.models.predict import model_tta, predict_proba
from ferkit.models.weights import load_model
from ferkit.shared_files import replacing
from ferkit.training.config import TrainConfig, parse_holdout
from ferkit.training.report import read_json

FORMAT = "ferkit-crossfit-targets/1"
# The settings that decide which faces a run's Training split holds, and with which labels: every run of one
# cross-fit must share them, or the folds of one run are not the folds of another. (The data and FER+ label files
# are compared by content: each run's manifest records their digest.)
SHARED_SETTINGS = ("label_set", "label_mode", "skip_bad_rows", "limit_train")
SUM_TOLERANCE = 1e-3  # float32 probabilities of one face sum to 1 within rounding


class TargetsError(ValueError):
    """A cross-fit targets file that cannot be used as it is; the message names the file and what is wrong."""


def training_faces(data: FaceData, cfg: TrainConfig) -> FaceData:
    """The Training faces a run with config `cfg` trains on: its limit_train, then without its holdout fold."""
    faces = data.split("Training")
    if cfg.limit_train:
        faces = faces.subset(np.arange(min(cfg.limit_train, len(faces))))
    if (held := parse_holdout(cfg.holdout)) is not None:
        k, n = held
        faces = faces.subset(faces.folds(n) != k - 1)
    return faces


def offline_view(meta: dict[str, Any]) -> str:
    """The view a teacher scores plain training faces under: its own (a saved ensemble's fitted mode, the centre
    crop for crop-trained weights), or flip TTA where that is the plain whole face."""
    view = model_tta("auto", meta)
    return "flip" if view == "none" else view


@dataclass
class CrossfitTargets:
    probabilities: np.ndarray  # (N, C) float32, each row a distribution
    rows: np.ndarray  # (N,) int64, the faces' 0-based data-row indices in the source file
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    data_sha256: str
    folds: int
    runs: list[dict[str, Any]] = field(default_factory=list)

    def accuracy(self) -> float:
        return float((self.probabilities.argmax(1) == self.labels).mean())

    def save(self, path: str | os.PathLike) -> None:
        """Write the file atomically (a kill mid-write leaves any previous file as it was)."""
        meta = {"format": FORMAT, "data_sha256": self.data_sha256, "folds": self.folds, "runs": self.runs,
                "held_out_accuracy": round(self.accuracy(), 6)}
        with replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, probabilities=self.probabilities.astype(np.float32), rows=self.rows.astype(np.int64),
                     labels=self.labels.astype(np.int64), classes=np.array(self.classes, dtype=str),
                     meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CrossfitTargets:
        """Read and check a targets file: TargetsError naming the file on anything malformed (not an .npz, arrays
        missing or of the wrong shape, probabilities negative, non-finite or not summing to 1, repeated rows)."""
        def bad(why: str) -> TargetsError:
            return TargetsError(f"teacher targets {path}: {why} (write them with `ferkit crossfit`)")

        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, NpzFile):  # a .npy array saved under this name
                raise bad("a single array (.npy), not an .npz file of named arrays")
            with loaded as f:
                arrays = {k: f[k] for k in ("probabilities", "rows", "labels", "classes", "meta") if k in f}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a zip, cut short, pickles needed
            raise e if isinstance(e, TargetsError) else bad(f"not a readable .npz file ({e})") from e
        if missing := [k for k in ("probabilities", "rows", "labels", "classes", "meta") if k not in arrays]:
            raise bad(f"missing {', '.join(missing)}")
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as e:
            raise bad(f"meta is not JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} file")
        probs, rows, labels, classes = (arrays[k] for k in ("probabilities", "rows", "labels", "classes"))
        if probs.ndim != 2 or probs.dtype.kind != "f" or probs.shape[0] == 0:
            raise bad(f"probabilities must be a non-empty (faces, classes) float array, got {probs.dtype} "
                      f"{probs.shape}")
        n, c = probs.shape
        if rows.shape != (n,) or labels.shape != (n,) or rows.dtype.kind not in "iu" or labels.dtype.kind not in "iu":
            raise bad(f"rows and labels must be {n} integers each, like the probabilities' rows")
        if classes.shape != (c,) or classes.dtype.kind != "U":
            raise bad(f"classes must be {c} names, one per probability column")
        if not np.isfinite(probs).all() or (probs < 0).any():
            raise bad("probabilities must be finite and >= 0")
        if (worst := float(np.abs(probs.sum(1) - 1).max())) > SUM_TOLERANCE:
            raise bad(f"each face's probabilities must sum to 1 (one is off by {worst:.3g})")
        if len(np.unique(rows)) != n:
            raise bad("a face (row) appears more than once")
        if labels.min() < 0 or labels.max() >= c:
            raise bad(f"labels must be class indices in 0..{c - 1}")
        sha, folds, runs = meta.get("data_sha256"), meta.get("folds"), meta.get("runs", [])
        if not (isinstance(sha, str) and type(folds) is int and folds >= 2 and isinstance(runs, list)):
            raise bad("meta needs data_sha256 (text), folds (a whole number >= 2) and runs (a list)")
        return cls(probs.astype(np.float32), rows.astype(np.int64), labels.astype(np.int64),
                   [str(x) for x in classes], sha, folds, runs)

    def for_faces(self, faces: FaceData, source: str = "") -> np.ndarray:
        """(len(faces), C) probabilities of these faces (joined by source-file row), after checking that they
        come from the same data file, and that the labels agree on every face (the join is right)."""
        where = f"teacher targets (data {self.data_sha256[:12]})"
        # FaceData.sha256 is the data file's, or under FER+ labels a digest of the file, the labels, mode and label set.
        if faces.sha256 != self.data_sha256:
            raise TargetsError(f"{where} were computed on other data than this run's {source or faces.source} "
                               f"(data {faces.sha256[:12] or 'unknown'}): another data file, or other labels=, "
                               "label_mode or label_set; train the cross-fit runs on the data and labels the "
                               "student uses")
        if list(faces.label_set.classes) != self.classes:
            raise TargetsError(f"{where} predict {self.classes}, but this run trains {list(faces.label_set.classes)}")
        order = np.argsort(self.rows)
        pos = np.searchsorted(self.rows, faces.rows, sorter=order)
        pos = order[np.clip(pos, 0, len(order) - 1)]
        if (absent := int((self.rows[pos] != faces.rows).sum())) > 0:
            raise TargetsError(f"{where} have no prediction for {absent} of this run's {len(faces)} training faces "
                               f"(they cover {len(self.rows)} faces)")
        if (differ := int((self.labels[pos] != faces.labels).sum())) > 0:
            raise TargetsError(f"{where}: {differ} of {len(faces)} faces carry another label there than in this run "
                               "(other labels, e.g. FER+'s): joined by row, they are not the same faces")
        return self.probabilities[pos]


def crossfit_targets(runs: Sequence[str | os.PathLike], data: str | os.PathLike | None = None,
                     weights: str = "best.safetensors") -> CrossfitTargets:
    """Score each run's held-out fold with its `weights` (under `offline_view`) and assemble one row per Training
    face. `runs`: run directories trained with holdout=K/N, one N, every K at least once (runs holding out one
    fold are averaged, probability by probability), sharing SHARED_SETTINGS and the data file. `data`: the data
    file (default: the runs' own); its checksum must be the one their manifests recorded."""
    if not runs:
        raise ValueError("crossfit: name the run directories (trained with holdout=K/N)")
    configs = []
    for run in map(Path, runs):
        config_file = run / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"crossfit: {run} is not a training run (no config.json)")
        if not (run / weights).is_file():
            raise FileNotFoundError(f"crossfit: {run} has no {weights} (has its training ended?)")
        try:
            cfg = TrainConfig.from_dict(read_json(config_file))
            held = parse_holdout(cfg.holdout)
        except (ValueError, TypeError) as e:  # from_dict: TypeError on a key TrainConfig does not have
            raise ValueError(f"crossfit: {config_file}: not a training config ({e})") from e
        if held is None:
            raise ValueError(f"crossfit: {run} trained on all the Training faces (no holdout=K/N): its predictions "
                             "on them are not held out")
        configs.append((run, cfg, held))
    first_run, first, (_, n) = configs[0]
    for run, cfg, (_, folds) in configs[1:]:
        if folds != n:
            raise ValueError(f"crossfit: {run} holds out a fold of {folds}, {first_run} one of {n}: one N for all")
        if differ := [s for s in SHARED_SETTINGS if getattr(cfg, s) != getattr(first, s)]:
            raise ValueError(f"crossfit: {run} and {first_run} differ in {', '.join(differ)}: their folds are not "
                             "the same faces")
    if missing := sorted(set(range(1, n + 1)) - {k for _, _, (k, _) in configs}):
        raise ValueError(f"crossfit: no run holds out fold {', '.join(map(str, missing))} of {n}")

    data_path = Path(data if data is not None else first.data)
    if not data_path.exists():  # a CSV, or an image folder's root
        raise FileNotFoundError(f"crossfit: data file {data_path} not found (pass --data)")
    dataset = load_dataset(str(data_path), first.label_set, skip_bad_rows=first.skip_bad_rows,
                           labels=first.labels or None, label_mode=first.label_mode)
    for run, _, _ in configs:
        try:  # FaceData.sha256: the data file's, or under FER+ labels a digest of file, labels, mode and label set
            recorded = read_json(run / "manifest.json").get("data")
        except (OSError, ValueError) as e:
            raise ValueError(f"crossfit: {run / 'manifest.json'}: cannot tell what the run trained on ({e})") from e
        trained_on = recorded.get("sha256") if isinstance(recorded, dict) else None
        if trained_on != dataset.sha256:
            raise ValueError(f"crossfit: {run} trained on data {str(trained_on)[:12]}, {data_path} (with the runs' "
                             f"labels settings) is {dataset.sha256[:12]}: score a run on the data it was trained on")
    faces = training_faces(dataset, replace(first, holdout=""))
    fold_of = faces.folds(n)
    total = np.zeros((len(faces), dataset.label_set.num_classes), dtype=np.float64)
    scored = np.zeros(len(faces), dtype=np.int64)
    records = []
    for run, _, (k, _) in configs:
        model, meta = load_model(run / weights)
        if list(meta.get("classes", [])) != list(dataset.label_set.classes):
            raise ValueError(f"crossfit: {run / weights} predicts {meta.get('classes')}, the data "
                             f"{list(dataset.label_set.classes)}")
        mine = np.flatnonzero(fold_of == k - 1)
        view = offline_view(meta)
        probs = predict_proba(model, faces.images[mine], input_size=meta["input_size"],
                              norm=meta.get("normalize", "dataset"), tta=view)
        total[mine] += probs
        scored[mine] += 1
        accuracy = float((probs.argmax(1) == faces.labels[mine]).mean())
        records.append({"run": str(run), "holdout": f"{k}/{n}", "weights_sha256": file_sha256(run / weights),
                        "view": view, "faces": len(mine), "held_out_accuracy": round(accuracy, 6)})
        print(f"fold {k}/{n}: {run} ({view} view) on its {len(mine)} held-out faces: {accuracy:.4f}", flush=True)
    probabilities = (total / scored[:, None]).astype(np.float32)
    return CrossfitTargets(probabilities, faces.rows.astype(np.int64), faces.labels.astype(np.int64),
                           list(dataset.label_set.classes), dataset.sha256, n, records)

