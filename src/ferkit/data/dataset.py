"""The in-memory dataset every loader returns: uint8 faces, class labels and the split of each row."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ferkit.data.labels import LabelSet

SPLITS: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
# Friendly aliases accepted wherever a split is named.
SPLIT_ALIASES: dict[str, str] = {
    "train": "Training", "training": "Training",
    "val": "PublicTest", "valid": "PublicTest", "validation": "PublicTest", "public": "PublicTest",
    "publictest": "PublicTest",
    "test": "PrivateTest", "private": "PrivateTest", "privatetest": "PrivateTest",
}


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the line."""


def canonical_split(name: str) -> str:
    """'val' -> 'PublicTest', 'test' -> 'PrivateTest', 'Training' -> 'Training'."""
    if name in SPLITS:
        return name
    try:
        return SPLIT_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; choose one of {list(SPLITS)} (or train/val/test)") from None


@dataclass
class FaceData:
    """Faces and labels of one dataset (or one split of it).

    images:      (N, H, W) uint8 grayscale faces.
    labels:      (N,) int64 class index in `label_set` (hard label; the FER+ majority when soft labels exist).
    usage:       (N,) str split name of each row ('Training', 'PublicTest', 'PrivateTest').
    rows:        (N,) int64 0-based data-row index in the source file (joins FER+ labels, names errors).
    soft_labels: optional (N, C) float32 label distribution (FER+ vote fractions).
    skipped:     reason -> number of rows left out while loading (bad rows, classes outside the label set).
    dropped_per_split: split -> rows FER+ labels dropped from it (not a face, majority unknown, ...).
    """

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    rows: np.ndarray
    label_set: LabelSet
    source: str = ""
    sha256: str = ""
    soft_labels: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_per_split: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> FaceData:
        """Rows of one split ('Training', 'PublicTest', 'PrivateTest' or an alias such as 'val')."""
        name = canonical_split(name)
        return self.subset(self.usage == name)

    def subset(self, index: np.ndarray) -> FaceData:
        """Rows selected by a boolean mask or an integer index array."""
        soft = None if self.soft_labels is None else self.soft_labels[index]
        return replace(self, images=self.images[index], labels=self.labels[index], usage=self.usage[index],
                       rows=self.rows[index], soft_labels=soft)

    def folds(self, n: int, seed: int = 0) -> np.ndarray:
        """(N,) fold index in 0..n-1 of each row, stratified: the rows of each class, in the order of a hash of
        their source row and `seed`, class after class, dealt out to the folds in turn, so every fold holds 1/n of
        each class (give or take one face) and the folds' sizes differ by one at most. Integer arithmetic on the
        rows and labels alone, no random generator: the same faces give the same folds on any machine and NumPy
        build (cross-fitting trains without a fold and scores it in separate runs, maybe on other machines)."""
        if not (isinstance(n, int) and 2 <= n <= len(self)):
            raise ValueError(f"folds: need 2 <= n <= {len(self)} (the number of faces), got {n!r}")
        key = _splitmix64(self.rows.astype(np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64))
        order = np.lexsort((self.rows, key, self.labels))  # by class, then by hash (rows break ties)
        fold = np.empty(len(self), dtype=np.int64)
        fold[order] = np.arange(len(order)) % n
        return fold

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.label_set.num_classes)

    def summary(self) -> str:
        parts = [f"{len(self)} faces {self.images.shape[1]}x{self.images.shape[2]} from {self.source or '?'}"]
        for split in SPLITS:
            n = int((self.usage == split).sum())
            if n:
                parts.append(f"{split}={n}")
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items()))
        if self.dropped_per_split:
            parts.append("FER+ dropped per split: " + ", ".join(f"{split} {n}" for split, n in
                                                                self.dropped_per_split.items()))
        return "; ".join(parts)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on uint64s: a fixed, well-mixed hash (wraps modulo 2^64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
