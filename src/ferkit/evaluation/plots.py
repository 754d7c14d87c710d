"""Evaluation figures: confusion matrices (counts and row-normalized) and a gallery of misclassified faces.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot global state), so plotting works
headless, from threads, and never opens a window.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ferkit.shared_files import replacing


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` to `path` atomically (a kill mid-write leaves the previous file), in the format its suffix names."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=110)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def row_normalize(cm: npt.ArrayLike) -> np.ndarray:
    """Each row divided by its sum (the recall view); all-zero rows stay zero."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    out = np.zeros_like(cm)
    np.divide(cm, sums, out=out, where=sums != 0)
    return out


def plot_confusion_matrix(cm: npt.ArrayLike, class_names: Sequence[str], path: str | os.PathLike,
                          normalize: bool = False, title: str | None = None) -> None:
    """Write the confusion matrix as an annotated heat map PNG (rows: true class, columns: predicted).

    normalize=True divides each row by its support, so the diagonal reads as per-class recall.
    """
    counts = np.asarray(cm)
    c = len(class_names)
    if counts.shape != (c, c):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {c} class names")
    values = row_normalize(counts) if normalize else counts.astype(np.float64)
    side = max(4.0, 0.75 * c + 2.5)
    fig = _new_figure((side + 1.0, side))
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalized)" if normalize else "confusion matrix (counts)"),
                 fontsize=9)
    fontsize = 9 if c <= 10 else 7
    for i in range(c):
        for j in range(c):
            v = values[i, j]
            text = f"{v:.2f}" if normalize else f"{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if v > 0.5 * vmax else "black")
    fig.tight_layout()
    _save(fig, path)


def plot_error_gallery(images: npt.ArrayLike, y_true: npt.ArrayLike, y_pred: npt.ArrayLike,
                       probs: npt.ArrayLike, class_names: Sequence[str], path: str | os.PathLike,
                       max_images: int = 36) -> int:
    """Grid of misclassified faces captioned 'true → pred (p)', most confident mistakes first.

    images: (N, H, W) uint8 faces; probs: (N, C) class probabilities (p is that of the predicted class).
    Returns the number of faces drawn; with no mistakes the PNG says so.
    """
    imgs = np.asarray(images)
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    pr = np.asarray(probs)
    if not (len(imgs) == len(t) == len(p) == len(pr)):
        raise ValueError(f"images, y_true, y_pred and probs differ in length: "
                         f"{len(imgs)}, {len(t)}, {len(p)}, {len(pr)}")
    wrong = np.flatnonzero(t != p)
    conf = pr[wrong, p[wrong]] if len(wrong) else np.zeros(0)
    chosen = wrong[np.argsort(-conf, kind="stable")][:max(0, max_images)]
    n = len(chosen)
    if n == 0:
        fig = _new_figure((4.0, 2.0))
        fig.text(0.5, 0.5, "no misclassified faces", ha="center", va="center")
        _save(fig, path)
        return 0
    cols = min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    # One mosaic image in one axes (36 separate subplots take seconds to lay out); captions sit in the
    # white band above each face.
    faces = [_as_uint8(imgs[i]) for i in chosen]
    h, w = faces[0].shape
    cap, gap = max(6, round(0.25 * h)), max(2, round(0.08 * w))
    mosaic = np.full((rows * (h + cap), cols * (w + gap) - gap), 255, dtype=np.uint8)
    # Size the figure to the mosaic's aspect ratio, plus a band for the title.
    width = max(1.6 * cols, 3.6)
    image_height = 0.98 * width * mosaic.shape[0] / mosaic.shape[1]
    height = image_height + 0.4
    fig = _new_figure((width, height))
    ax = fig.add_axes((0.01, 0.02 / height, 0.98, image_height / height))
    for k, (idx, face) in enumerate(zip(chosen, faces, strict=True)):
        r, c = divmod(k, cols)
        y0, x0 = r * (h + cap) + cap, c * (w + gap)
        mosaic[y0:y0 + h, x0:x0 + w] = face
        caption = f"{class_names[t[idx]]} → {class_names[p[idx]]} ({pr[idx, p[idx]]:.2f})"
        ax.text(x0 + w / 2, y0 - 1.5, caption, ha="center", va="bottom", fontsize=6.5)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(f"{n} of {len(wrong)} misclassified, most confident first\n(true → predicted (p))",
                 fontsize=8, y=0.995, va="top")
    _save(fig, path)
    return n


def _as_uint8(face: np.ndarray) -> np.ndarray:
    """A (H, W) or (1, H, W) face as uint8; float faces are scaled from their own min..max."""
    face = np.asarray(face)
    if face.ndim == 3 and face.shape[0] == 1:
        face = face[0]
    if face.dtype == np.uint8:
        return face
    f = face.astype(np.float64)
    lo, hi = float(f.min()), float(f.max())
    return np.zeros(f.shape, np.uint8) if hi <= lo else ((f - lo) / (hi - lo) * 255).round().astype(np.uint8)
