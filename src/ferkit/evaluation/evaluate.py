"""Evaluate a trained model on one split: accuracy, per-class report, confusion matrix, saved probabilities.

    model, meta = load_model("runs/x/best.safetensors")
    data = load_dataset("fer2013.csv.gz", meta["label_set"])
    result = evaluate(model, meta, data, "PrivateTest", tta="flip")
    print(result.accuracy); write_artifacts(result, data.split("PrivateTest").images, "eval/")
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ferkit.data import FaceData, canonical_split, file_sha256
from ferkit.data.labels import LabelSet
from ferkit.device import resolve_device, resolve_precision
from ferkit.evaluation.metrics import confusion_matrix, format_report, report_from_confusion
from ferkit.evaluation.plots import plot_confusion_matrix, plot_error_gallery
from ferkit.models.predict import TTA_MODES, TTA_VIEW_COUNTS, model_tta, predict_proba
from ferkit.models.prior import adjust_prior, check_prior
from ferkit.shared_files import replacing, write_text

ARTIFACTS = (
    "confusion_matrix.png", "confusion_matrix_normalized.png", "errors.png", "report.txt", "metrics.json",
)


@dataclass
class EvaluationResult:
    """Everything one evaluation produced; `to_json()` is the machine-readable summary.

    probs: (N, C) float32 class probabilities; labels: (N,) true class; rows: (N,) source row index.
    """

    accuracy: float
    report: dict[str, Any]
    confusion_matrix: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    split: str
    tta: str
    classes: list[str]
    model_name: str = ""
    label_set: str = ""
    weights_sha256: str = ""
    data_sha256: str = ""
    data_source: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    seconds: float = 0.0
    prior: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(len(self.labels))

    @property
    def predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: accuracy, per_class, confusion_matrix, macro/weighted averages and provenance."""
        out: dict[str, Any] = {
            "model": self.model_name,
            "label_set": self.label_set,
            "classes": list(self.classes),
            "split": self.split,
            "tta": self.tta,
            "prior": self.prior,
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.report["macro_avg"]["recall"],  # mean per-class recall
            "macro_f1": self.report["macro_avg"]["f1"],
            "macro_avg": self.report["macro_avg"],
            "weighted_avg": self.report["weighted_avg"],
            "per_class": self.report["per_class"],
            "confusion_matrix": self.confusion_matrix.astype(int).tolist(),
            "weights_sha256": self.weights_sha256 or None,
            "data": self.data_source or None,
            "data_sha256": self.data_sha256 or None,
            "device": self.device,
            "precision": self.precision,
            "seconds": round(self.seconds, 3),
        }
        return out | self.extra


def check_label_set(meta: dict[str, Any], label_set: LabelSet) -> None:
    """Raise ValueError unless the model (its weights metadata) predicts exactly the data's classes."""
    want_name = meta.get("label_set")
    want_classes = meta.get("classes")
    want_n = meta.get("num_classes")
    mismatch = ((want_name and want_name != label_set.name)
                or (want_classes is not None and tuple(want_classes) != tuple(label_set.classes))
                or (want_n is not None and int(want_n) != label_set.num_classes))
    if mismatch:
        raise ValueError(
            f"label-set mismatch: the model predicts {want_name or '?'} {list(want_classes or [])} "
            f"but the data was loaded as {label_set.name} {list(label_set.classes)}; "
            f"load the data with the model's label set (load_dataset(path, {want_name!r}))")


def evaluate(model: nn.Module, meta: dict[str, Any], data: FaceData, split: str = "PrivateTest",
             tta: str = "auto", batch_size: int = 256, device: str | torch.device = "auto",
             precision: str = "fp32", weights_path: str | os.PathLike | None = None,
             prior: str = "none") -> EvaluationResult:
    """Run `model` on one split of `data` and score it.

    meta: the weights metadata from `load_model` (classes, label_set, input_size, normalize, model).
    split: 'Training', 'PublicTest', 'PrivateTest' or an alias ('train', 'val', 'test').
    tta: 'auto' (the view the weights were selected on, see models.predict.model_tta), 'none', 'flip' (average
    with the mirror image), 'tencrop', 'center' or 'shift' (see models.predict.TTA_MODES); the result records the
    mode run.
    device: 'auto' | 'cpu' | 'cuda[:N]'; the model is moved there. precision: 'fp32' (the default: the same
    accuracy on every machine) | 'auto' (CPU: bf16 autocast where the CPU has native bf16, else fp32; CUDA:
    bf16/fp16; faster, but the score then depends on the CPU it ran on) | 'bf16' | 'fp16'.
    weights_path: the weights file, only to record its sha256.
    prior: 'none', or 'uniform' to divide the probabilities by the training class prior (models.prior).
    """
    tta = model_tta(tta, meta)
    check_prior(prior, meta)
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    check_label_set(meta, data.label_set)
    split = canonical_split(split)
    part = data.split(split)
    if len(part) == 0:
        raise ValueError(f"{data.source or 'data'}: no {split} rows to evaluate ({data.summary()})")
    dev = resolve_device(str(device))
    dtype = resolve_precision(precision, dev)
    input_size = int(meta.get("input_size") or getattr(model, "input_size", 48))
    norm = str(meta.get("normalize", "dataset"))
    classes = list(data.label_set.classes)

    model = model.to(dev)
    t0 = time.perf_counter()
    probs = predict_proba(model, part.images, input_size=input_size, norm=norm, tta=tta,
                          batch_size=batch_size, dtype=dtype)
    probs = adjust_prior(probs, prior, meta)
    seconds = time.perf_counter() - t0
    if probs.shape != (len(part), len(classes)):
        raise ValueError(f"model output has shape {probs.shape}, expected ({len(part)}, {len(classes)})")
    labels = part.labels.astype(np.int64)
    cm = confusion_matrix(labels, probs.argmax(axis=1), len(classes))
    report = report_from_confusion(cm, classes)
    return EvaluationResult(
        accuracy=report["accuracy"], report=report, confusion_matrix=cm, probs=probs, labels=labels,
        rows=part.rows.astype(np.int64), split=split, tta=tta, classes=classes,
        model_name=str(meta.get("model") or getattr(model, "ferkit_name", "")), label_set=data.label_set.name,
        weights_sha256=file_sha256(weights_path) if weights_path else "", data_sha256=data.sha256,
        data_source=data.source, device=str(dev),
        precision="fp32" if dtype is None else str(dtype).removeprefix("torch."), seconds=seconds, prior=prior,
    )


SELECTION_SPLIT = "PublicTest"  # the protocol's validation split: what every choice is made on


@dataclass
class TTASelection:
    """The TTA mode chosen on PublicTest (`chosen`) and every candidate's PublicTest evaluation (`results`)."""

    chosen: str
    results: dict[str, EvaluationResult]

    @property
    def accuracies(self) -> dict[str, float]:
        return {mode: r.accuracy for mode, r in self.results.items()}

    def to_json(self) -> dict[str, Any]:
        return {"selected_on": SELECTION_SPLIT, "chosen": self.chosen, "accuracy": self.accuracies,
                "views": {mode: TTA_VIEW_COUNTS[mode] for mode in self.results}}


def select_tta(model: nn.Module, meta: dict[str, Any], data: FaceData, modes: tuple[str, ...] = TTA_MODES,
               **evaluate_kwargs: Any) -> TTASelection:
    """Evaluate `model` on PublicTest under each TTA mode of `modes` and choose the most accurate; a tie goes to
    the mode with fewer views (less compute), then to the earlier in `modes`. The protocol's way to report a
    model "with its best TTA": the choice is made on PublicTest, never on the split reported.
    evaluate_kwargs: evaluate's batch_size, device, precision, weights_path and prior."""
    unknown = [m for m in modes if m not in TTA_MODES]
    if unknown or not modes:
        raise ValueError(f"TTA modes to select among must be some of {', '.join(TTA_MODES)}; got {list(modes)}")
    if len(data.split(SELECTION_SPLIT)) == 0:
        raise ValueError(f"{data.source or 'data'}: the TTA is selected on {SELECTION_SPLIT}, and the data has no "
                         f"{SELECTION_SPLIT} rows ({data.summary()}); an image folder needs a val/ (PublicTest) "
                         "folder beside train/ and test/")
    weights_path = evaluate_kwargs.pop("weights_path", None)  # hashed once below, not once per mode
    results = {mode: evaluate(model, meta, data, SELECTION_SPLIT, tta=mode, **evaluate_kwargs)
               for mode in dict.fromkeys(modes)}
    if weights_path:
        sha256 = file_sha256(weights_path)
        for r in results.values():
            r.weights_sha256 = sha256
    order = list(results)
    chosen = max(order, key=lambda m: (results[m].accuracy, -TTA_VIEW_COUNTS[m], -order.index(m)))
    return TTASelection(chosen, results)


def save_probs(result: EvaluationResult, path: str | os.PathLike) -> Path:
    """Write probs (N, C) float32, labels, rows (source row indices), classes, split and tta to an .npz.

    The file is written at exactly `path` (no '.npz' is appended) and atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, probs=result.probs.astype(np.float32), labels=result.labels.astype(np.int64),
                 rows=result.rows.astype(np.int64), classes=np.asarray(result.classes, dtype=str),
                 split=np.asarray(result.split), tta=np.asarray(result.tta),
                 model=np.asarray(result.model_name))
    return path


def load_probs(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `save_probs` file.

    Returns {'probs', 'labels', 'rows'} as arrays, 'classes' as a list and 'split', 'tta', 'model' as strings.
    """
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {"probs": z["probs"], "labels": z["labels"], "rows": z["rows"],
                               "classes": [str(c) for c in z["classes"]], "split": str(z["split"])}
        for key in ("tta", "model"):
            out[key] = str(z[key]) if key in z.files else ""
    return out


def format_summary(result: EvaluationResult) -> str:
    """A few human-readable lines: what was evaluated and the headline numbers."""
    speed = f", {result.num_samples / result.seconds:.0f} faces/s" if result.seconds > 0 else ""
    lines = [
        f"model      {result.model_name or '?'} ({result.label_set}: {', '.join(result.classes)})",
        f"data       {result.data_source or '?'} — split {result.split}, {result.num_samples} faces",
        f"inference  tta={result.tta}, prior={result.prior}, {result.device} {result.precision}, "
        f"{result.seconds:.1f}s{speed}",
        *([_format_selection(result.extra["tta_selection"])] if "tta_selection" in result.extra else []),
        f"accuracy   {result.accuracy:.4f}   balanced accuracy {result.report['macro_avg']['recall']:.4f}   "
        f"macro F1 {result.report['macro_avg']['f1']:.4f}   weighted F1 {result.report['weighted_avg']['f1']:.4f}",
    ]
    return "\n".join(lines) + "\n"


def _format_selection(selection: dict[str, Any]) -> str:
    scores = ", ".join(f"{mode} {acc:.4f}" for mode, acc in selection["accuracy"].items())
    return f"tta chosen {selection['chosen']} on {selection['selected_on']} ({scores})"


def format_confusion(result: EvaluationResult) -> str:
    """The confusion matrix as a text table (rows: true, columns: predicted)."""
    names = result.classes
    corner = "true \\ predicted"
    label_w = max(len(corner), *(len(n) for n in names)) + 1
    w = max(max(len(n) for n in names), len(str(int(result.confusion_matrix.max(initial=0))))) + 2
    lines = [corner.ljust(label_w) + "".join(n.rjust(w) for n in names)]
    for name, row in zip(names, result.confusion_matrix, strict=True):
        lines.append(name.ljust(label_w) + "".join(str(int(v)).rjust(w) for v in row))
    return "\n".join(lines) + "\n"


def write_artifacts(result: EvaluationResult, images: np.ndarray,
                    out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write confusion_matrix.png, confusion_matrix_normalized.png, errors.png, report.txt and metrics.json.

    images: the evaluated split's uint8 faces, in the same order as `result.labels`.
    Returns artifact name -> path.
    """
    if len(images) != result.num_samples:
        raise ValueError(f"got {len(images)} images for {result.num_samples} evaluated faces")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ARTIFACTS}
    title = f"{result.model_name or 'model'} — {result.split} (tta={result.tta}, acc {result.accuracy:.4f})"
    cm, names = result.confusion_matrix, result.classes
    plot_confusion_matrix(cm, names, paths["confusion_matrix.png"], normalize=False, title=f"counts: {title}")
    plot_confusion_matrix(cm, names, paths["confusion_matrix_normalized.png"], normalize=True,
                          title=f"row-normalized: {title}")
    plot_error_gallery(images, result.labels, result.predictions, result.probs, names, paths["errors.png"])
    write_text(paths["report.txt"], format_summary(result) + "\n" + format_report(result.report) + "\n"
               + format_confusion(result))
    write_text(paths["metrics.json"], json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    return paths
