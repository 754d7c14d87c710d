"""Ensemble members from weights files: any set of trained models, or the snapshots of one training run.

    paths = snapshot_members("runs/sixclass_cnn4-20261123-101500", last_k=9)   # runs/<run>/snapshots/step*.safetensors
    members = predict_members(paths, "fer2013.csv.gz", tta="flip")              # PublicTest + PrivateTest probabilities
    report = evaluate_methods(members)                                         # fit on PublicTest, report PrivateTest

Snapshot ensembles: `TrainConfig(save_every=N)` (`ferkit train --save-every N`) keeps the weights every N
optimizer steps; the last k snapshots of one run are combined like independently trained models.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ferkit.data import FaceData, load_dataset
from ferkit.ensembles.predictions import MemberPredictions, MemberSet, build_member_set, member_names
from ferkit.evaluation import check_label_set, evaluate
from ferkit.models.predict import TTA_CHOICES
from ferkit.models.weights import load_model, read_metadata

_SNAPSHOT = re.compile(r"^step(\d+)\.safetensors$")


def snapshot_members(run_dir: str | os.PathLike, last_k: int = 9) -> list[Path]:
    """The last `last_k` snapshot files of a run (runs/<run>/snapshots/stepNNNNNNN.safetensors), oldest first."""
    if last_k < 1:
        raise ValueError(f"last_k must be positive, got {last_k}")
    run = Path(run_dir)
    snap_dir = run / "snapshots" if (run / "snapshots").is_dir() else run
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    found = sorted((int(m.group(1)), p) for p in snap_dir.iterdir() if (m := _SNAPSHOT.match(p.name)))
    if not found:
        raise FileNotFoundError(f"no snapshots (step*.safetensors) in {snap_dir}; train with save_every=N "
                                "(`ferkit train --save-every N`) to keep them")
    return [p for _, p in found[-last_k:]]


def member_classes(path: str | os.PathLike) -> list[str]:
    """The classes a member file predicts: a predictions .npz's `classes`, or a weights file's metadata."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return [str(c) for c in np.atleast_1d(z["classes"])] if "classes" in z.files else []
    return [str(c) for c in read_metadata(path).get("classes", [])]


def predict_members(weights: Sequence[str | os.PathLike], data: str | os.PathLike | FaceData, *, tta: str = "auto",
                    batch_size: int = 256, device: str | torch.device = "auto", precision: str = "fp32",
                    names: Sequence[str] | None = None) -> MemberSet:
    """Run every weights file on PublicTest and PrivateTest of `data` (via `ferkit.evaluation.evaluate`).

    data: a dataset path (loaded with the first member's label set) or a loaded FaceData.
    Every member must predict the data's label set (ValueError naming the file otherwise).
    tta: one mode for every member, or "auto": each member's own selection view (models.predict.model_tta).
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose one of {', '.join(TTA_CHOICES)}")
    paths = [Path(p) for p in weights]
    if not paths:
        raise ValueError("no weights files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"weights file {p} does not exist")
    if isinstance(data, FaceData):
        dataset = data
    else:
        label_set = read_metadata(paths[0]).get("label_set") or "fer7"
        dataset = load_dataset(str(data), label_set)
    out = []
    for path, name in zip(paths, names or member_names(paths), strict=True):
        model, meta = load_model(path)
        try:
            check_label_set(meta, dataset.label_set)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        splits = {}
        for split in ("PublicTest", "PrivateTest"):
            r = evaluate(model, meta, dataset, split, tta=tta, batch_size=batch_size, device=device,
                         precision=precision)
            splits[split] = (r.probs, r.labels, r.rows)
        out.append(MemberPredictions(name=name, source=str(path), model=str(meta.get("model", "")), tta=r.tta,
                           classes=list(dataset.label_set.classes), splits=splits))
        del model
    return build_member_set(out)
