"""Classification metrics in plain numpy: confusion matrix and a scikit-learn-style report.

Conventions follow scikit-learn: confusion-matrix rows are the true class and columns the predicted
class; a ratio whose denominator is zero (precision of a class never predicted, recall of a class
absent from the data) is 0.0; the macro average weights every class equally and the weighted
average weights each class by its support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

METRICS = ("precision", "recall", "f1", "support")


def _as_labels(y: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{name} must hold integer class indices")
    return arr.astype(np.int64)


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: entry [i, j] is the number of samples of true class i predicted as j."""
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has class indices outside 0..{num_classes - 1}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def report_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The `classification_report` dictionary computed from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {c} class names")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    total = int(support.sum())
    per_class = {
        str(name): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    weights = support / total if total else np.zeros(c)

    def average(w: np.ndarray) -> dict[str, float | int]:
        return {"precision": float(np.dot(precision, w)), "recall": float(np.dot(recall, w)),
                "f1": float(np.dot(f1, w)), "support": total}

    return {
        "per_class": per_class,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_avg": average(np.full(c, 1.0 / c)),
        "weighted_avg": average(weights),
        "num_samples": total,
    }


def classification_report(y_true: npt.ArrayLike, y_pred: npt.ArrayLike,
                          class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, accuracy, and macro and weighted averages.

    Returns {"per_class": {name: {"precision", "recall", "f1", "support"}}, "accuracy": float,
    "macro_avg": {...}, "weighted_avg": {...}, "num_samples": int}. Zero division gives 0.0.
    """
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    return report_from_confusion(cm, class_names)


def format_report(report: dict[str, Any], digits: int = 4) -> str:
    """A text table like scikit-learn's `classification_report`."""
    names = list(report["per_class"])
    rows = ["macro avg", "weighted avg"]
    width = max([len(n) for n in names] + [len(r) for r in rows] + [len("accuracy")])
    col = max(len("precision"), digits + 2) + 1
    header = " " * width + "".join(h.rjust(col) for h in ("precision", "recall", "f1-score", "support"))
    lines = [header, ""]

    def line(name: str, m: dict[str, Any]) -> str:
        vals = "".join(f"{m[k]:.{digits}f}".rjust(col) for k in ("precision", "recall", "f1"))
        return name.rjust(width) + vals + str(int(m["support"])).rjust(col)

    lines += [line(n, report["per_class"][n]) for n in names]
    lines.append("")
    n_total = report.get("num_samples", report["macro_avg"]["support"])
    lines.append("accuracy".rjust(width) + " " * (2 * col) + f"{report['accuracy']:.{digits}f}".rjust(col)
                 + str(int(n_total)).rjust(col))
    lines.append(line("macro avg", report["macro_avg"]))
    lines.append(line("weighted avg", report["weighted_avg"]))
    return "\n".join(lines) + "\n"
