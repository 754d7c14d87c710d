"""Ensembles of saved predictions: load members' test-split probabilities, fit on PublicTest, report PrivateTest.

    members = load_prediction_files(sorted(Path("results/predictions").glob("*.npz")))
    report = evaluate_methods(members)            # every method: fit on PublicTest, score both splits
    print(format_table(report))

A predictions file is what `ferkit reproduce` writes to results/predictions/<name>.npz: classes, model, tta,
public_probs (N, C), public_labels, public_rows, private_probs, private_labels, private_rows. All members must
share the classes and the exact same faces (rows, in the same order) and labels on both splits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.ensembles.combine import (
    METHODS,
    EnsembleWeights,
    accuracy,
    apply_ensemble,
    canonical_method,
    fit_ensemble,
)
from ferkit.shared_files import replacing

PREDICTION_KEYS = ("classes", "public_probs", "public_labels", "public_rows", "private_probs", "private_labels",
                   "private_rows")


@dataclass
class SplitProbs:
    """One test split for all members: probs (M, N, C) float64, labels (N,) and source rows (N,)."""

    probs: np.ndarray
    labels: np.ndarray
    rows: np.ndarray


@dataclass
class MemberSet:
    """The members of an ensemble and their probabilities on PublicTest (fitting) and PrivateTest (reporting)."""

    names: list[str]
    classes: list[str]
    public: SplitProbs
    private: SplitProbs
    sources: list[str] = field(default_factory=list)  # the file each member came from
    models: list[str] = field(default_factory=list)  # registry names
    ttas: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class MemberPredictions:
    """One member's probabilities, labels and source rows on each test split (before stacking)."""

    name: str
    source: str
    model: str
    tta: str
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # split -> (probs, labels, rows)


def member_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short unique display names: file stems, else parent/stem, else the full paths."""
    ps = [Path(p) for p in paths]
    for names in ([p.stem for p in ps], [f"{p.parent.name}/{p.stem}" for p in ps], [str(p) for p in ps]):
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{p}" for i, p in enumerate(ps)]


def build_member_set(members: Sequence[MemberPredictions]) -> MemberSet:
    """Check that every member covers the same classes and faces, and stack their probabilities."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    first = members[0]
    for m in members:
        if m.classes != first.classes:
            raise ValueError(f"{m.source}: classes {m.classes} differ from {first.source}'s {first.classes}; "
                             "members of an ensemble must predict the same label set")
        for split in ("PublicTest", "PrivateTest"):
            probs, labels, rows = m.splits[split]
            _, ref_labels, ref_rows = first.splits[split]
            if probs.ndim != 2 or probs.shape[1] != len(m.classes) or len(labels) != len(probs) \
                    or len(rows) != len(probs):
                raise ValueError(f"{m.source}: {split} probabilities have shape {probs.shape} with {len(labels)} "
                                 f"labels and {len(rows)} rows; expected (N, {len(m.classes)}) and N of each")
            if len(rows) != len(ref_rows):
                raise ValueError(f"{m.source}: has {len(rows)} {split} faces but {first.source} has {len(ref_rows)}; "
                                 "members must be evaluated on the same data file")
            if not np.array_equal(rows, ref_rows):
                i = int(np.flatnonzero(rows != ref_rows)[0])
                raise ValueError(f"{m.source}: its {split} faces differ from {first.source}'s (position {i}: source "
                                 f"row {rows[i]} vs {ref_rows[i]}); members must be evaluated on the same data file "
                                 "in the same order")
            if not np.array_equal(labels, ref_labels):
                raise ValueError(f"{m.source}: its {split} labels differ from {first.source}'s for the same rows; "
                                 "were the members evaluated on different data files?")
            _check_probabilities(m.source, split, probs, labels, rows, len(m.classes))

    def stack(split: str) -> SplitProbs:
        _, labels, rows = first.splits[split]
        return SplitProbs(np.stack([m.splits[split][0].astype(np.float64) for m in members]),
                          labels.astype(np.int64), rows.astype(np.int64))

    return MemberSet(names=[m.name for m in members], classes=list(first.classes), public=stack("PublicTest"),
                     private=stack("PrivateTest"), sources=[m.source for m in members],
                     models=[m.model for m in members], ttas=[m.tta for m in members])


PROB_ROW_TOLERANCE = 1e-2  # float16 probabilities of a few classes sum to 1 within ~2e-3, float32 ones within 1e-6


def _check_probabilities(source: str, split: str, probs: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                         num_classes: int) -> None:
    """One member's split is class probabilities of some faces: real numbers in [0, 1] summing to 1 per face,
    integer labels of its classes and integer rows. Anything else would combine into a silently wrong ensemble (a
    member whose rows sum to 20 outweighs the others in every average)."""
    if not len(probs):
        raise ValueError(f"{source}: no {split} faces; an ensemble is fitted on PublicTest and scored on PrivateTest")
    if probs.dtype.kind != "f":
        raise ValueError(f"{source}: {split} probabilities are {probs.dtype}, not floating-point numbers")
    for what, values in (("labels", labels), ("rows", rows)):
        if values.dtype.kind not in "iu":
            raise ValueError(f"{source}: {split} {what} are {values.dtype}, not whole numbers")
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"{source}: {split} probabilities hold NaN or infinite values")
    sums = probs.astype(np.float64).sum(axis=1)
    if probs.min() < 0 or probs.max() > 1 + PROB_ROW_TOLERANCE or np.abs(sums - 1).max() > PROB_ROW_TOLERANCE:
        i = int(np.argmax(np.abs(sums - 1) + (probs.min(axis=1) < 0)))
        raise ValueError(f"{source}: {split} rows are not probabilities (face {i}: values "
                         f"{np.array2string(probs[i], precision=3)}, sum {sums[i]:.4g}); expected values in [0, 1] "
                         "summing to 1, as `ferkit ensemble --save-predictions` and `ferkit reproduce` write")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{source}: {split} labels hold class indices outside 0..{num_classes - 1}")


def _read_prediction_file(path: Path, name: str) -> MemberPredictions:
    if not path.is_file():
        raise FileNotFoundError(f"prediction file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip, truncated, pickled objects, ...: numpy raises several types
        raise ValueError(f"{path}: cannot read as .npz ({e})") from e
    missing = [k for k in PREDICTION_KEYS if k not in data]
    if missing:
        hint = (" (it holds one split, as `ferkit evaluate --save-probs` writes; an ensemble needs both test "
                "splits, as `ferkit reproduce` writes to results/predictions/<name>.npz)"
                if "probs" in data else " (expected results/predictions/<name>.npz from `ferkit reproduce`)")
        raise ValueError(f"{path}: not a ferkit predictions file, missing {', '.join(missing)}{hint}")
    splits = {split: (np.asarray(data[f"{key}_probs"]), np.asarray(data[f"{key}_labels"]),
                      np.asarray(data[f"{key}_rows"]))
              for split, key in (("PublicTest", "public"), ("PrivateTest", "private"))}
    return MemberPredictions(name=name, source=str(path), model=str(data.get("model", "")),
                             tta=str(data.get("tta", "")), classes=[str(c) for c in np.atleast_1d(data["classes"])],
                             splits=splits)


def save_prediction_file(path: str | os.PathLike, classes: Sequence[str], model: str, tta: str,
                         public: tuple[np.ndarray, np.ndarray, np.ndarray],
                         private: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Path:
    """Write one member's (probs, labels, rows) on PublicTest and PrivateTest as a predictions file.

    Probabilities are stored float32: the files are committed (results/predictions/) and float32 keeps every
    argmax and every ensemble accuracy to the 4th decimal.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"classes": np.array(list(classes)), "model": np.array(model), "tta": np.array(tta)}
    for key, (probs, labels, rows) in (("public", public), ("private", private)):
        arrays |= {f"{key}_probs": np.asarray(probs, dtype=np.float32),
                   f"{key}_labels": np.asarray(labels, dtype=np.int64), f"{key}_rows": np.asarray(rows, np.int64)}
    with replacing(path) as tmp, open(tmp, "wb") as f:  # atomic: a kill mid-write leaves the previous file
        np.savez_compressed(f, **arrays)
    return path


def save_member_predictions(members: MemberSet, directory: str | os.PathLike) -> list[Path]:
    """Write every member of a MemberSet to DIRECTORY/<member name>.npz (the format --from-predictions reads)."""
    pub, priv = members.public, members.private
    return [save_prediction_file(Path(directory) / f"{name.replace('/', '_').replace(os.sep, '_')}.npz",
                                 members.classes, members.models[i] if members.models else "",
                                 members.ttas[i] if members.ttas else "", (pub.probs[i], pub.labels, pub.rows),
                                 (priv.probs[i], priv.labels, priv.rows))
            for i, name in enumerate(members.names)]


def load_prediction_files(paths: Sequence[str | os.PathLike]) -> MemberSet:
    """Read results/predictions/*.npz files into a MemberSet; ValueError/FileNotFoundError name the bad file."""
    if not paths:
        raise ValueError("no prediction files given")
    names = member_names(paths)
    return build_member_set([_read_prediction_file(Path(p), n) for p, n in zip(paths, names, strict=True)])


# ---- fit on PublicTest, report on PrivateTest ------------------------------------------------------------


@dataclass
class EnsembleReport:
    """Members' and ensembles' accuracy on both test splits; `weights` maps method -> fitted EnsembleWeights."""

    classes: list[str]
    members: list[dict[str, Any]]
    ensembles: list[dict[str, Any]]
    weights: dict[str, EnsembleWeights]
    num_public: int
    num_private: int

    @property
    def best_member(self) -> dict[str, Any]:
        """The member with the best PublicTest accuracy (chosen on PublicTest, like the ensembles' weights)."""
        return max(self.members, key=lambda r: r["public_accuracy"])

    def rows(self) -> list[dict[str, Any]]:
        """Members then ensembles, each with 'kind' ('member' | 'ensemble'), 'name' and both accuracies."""
        return [{"kind": "member", **r} for r in self.members] + [{"kind": "ensemble", **r} for r in self.ensembles]

    def to_json(self) -> dict[str, Any]:
        return {"classes": self.classes, "num_public": self.num_public, "num_private": self.num_private,
                "fitted_on": "PublicTest", "reported_on": "PrivateTest", "members": self.members,
                "best_member": self.best_member, "ensembles": self.ensembles}


def member_networks(members: MemberSet) -> list[str]:
    """The network behind each member: its name less a `_<tta>` suffix naming its TTA (`vgg_s_seed1_flip` with
    tta flip -> `vgg_s_seed1`), so a model and its TTA copy count as one network's compute."""
    ttas = members.ttas or [""] * len(members)
    return [name[:-len(tta) - 1] if tta not in ("", "none") and name.endswith(f"_{tta}") else name
            for name, tta in zip(members.names, ttas, strict=True)]


def evaluate_methods(members: MemberSet, methods: Sequence[str] = METHODS, *, max_members: int | None = None,
                     combiner: str = "mean", replacement: bool = True) -> EnsembleReport:
    """Fit each method on PublicTest and score it on PublicTest and PrivateTest.

    Only `members.public` reaches `fit_ensemble`; PrivateTest is used only through `apply_ensemble`.
    max_members, combiner, replacement: greedy selection's options (see ferkit.ensembles.combine); max_members
    also caps log_linear's networks (a member and its TTA copy are one, see member_networks).
    """
    pub, priv = members.public, members.private
    member_rows = []
    for i, name in enumerate(members.names):
        member_rows.append({"name": name, "model": members.models[i] if members.models else "",
                            "tta": members.ttas[i] if members.ttas else "",
                            "source": members.sources[i] if members.sources else "",
                            "public_accuracy": accuracy(pub.probs[i], pub.labels),
                            "private_accuracy": accuracy(priv.probs[i], priv.labels)})
    best = max(member_rows, key=lambda r: r["public_accuracy"])
    rows, fitted = [], {}
    networks = member_networks(members)
    for method in dict.fromkeys(canonical_method(m) for m in methods):
        weights = fit_ensemble(method, pub.probs, pub.labels, max_members=max_members, combiner=combiner,
                               replacement=replacement, groups=networks)
        fitted[method] = weights
        private_acc = accuracy(apply_ensemble(weights, priv.probs), priv.labels)
        name = f"greedy({weights.combiner})" if method == "greedy" else method
        if method == "log_linear" and weights.selected:  # capped: name the networks it uses (non-zero weights)
            chosen = len({networks[i] for i in weights.used_members()})
            name = f"log_linear({chosen} network{'s' if chosen > 1 else ''})"
        row: dict[str, Any] = {
            "name": name,
            "method": method, "combiner": weights.combiner,
            "public_accuracy": accuracy(apply_ensemble(weights, pub.probs), pub.labels),
            "private_accuracy": private_acc,
            "private_gain_vs_best_member": private_acc - best["private_accuracy"],
            "member_weights": {n: float(w) for n, w in zip(members.names, weights.member_weights, strict=True)},
        }
        if weights.class_weights is not None:
            row["class_weights"] = {n: [float(x) for x in cw]
                                    for n, cw in zip(members.names, weights.class_weights, strict=True)}
        if weights.selected:  # greedy's picks in order (repeats too), or the members a capped log_linear uses
            row["selected"] = [members.names[i] for i in weights.selected if weights.member_weights[i] > 0]
        rows.append(row)
    return EnsembleReport(classes=list(members.classes), members=member_rows, ensembles=rows, weights=fitted,
                          num_public=int(len(pub.labels)), num_private=int(len(priv.labels)))


def format_table(report: EnsembleReport) -> str:
    """A readable table: every member, the best member (by PublicTest), then every ensemble."""
    width = max(12, *(len(r["name"]) for r in report.rows())) + 2
    head = f"{'':<10}{'name':<{width}}{'PublicTest':>11}{'PrivateTest':>13}"
    lines = [f"{len(report.members)} members; {report.num_public} PublicTest / {report.num_private} PrivateTest "
             f"faces; classes: {', '.join(report.classes)}",
             "ensemble weights are fitted on PublicTest only; PrivateTest is the held-out score", "",
             head, "-" * (len(head) + 24)]
    for r in report.members:
        tta = f"  tta={r['tta']}" if r.get("tta") and r["tta"] != "none" else ""
        lines.append(f"{'member':<10}{r['name']:<{width}}{r['public_accuracy']:>11.4f}{r['private_accuracy']:>13.4f}"
                     f"{tta}")
    b = report.best_member
    lines.append(f"{'best':<10}{b['name']:<{width}}{b['public_accuracy']:>11.4f}{b['private_accuracy']:>13.4f}"
                 "  (best member by PublicTest)")
    lines.append("-" * (len(head) + 24))
    for r in report.ensembles:
        gain = r["private_gain_vs_best_member"] * 100
        note = f"  {gain:+.2f} pts vs best member"
        if "selected" in r:
            counts = dict.fromkeys(r["selected"], 0)
            for n in r["selected"]:
                counts[n] += 1
            note += "; chose " + ", ".join(f"{n}x{k}" if k > 1 else n for n, k in counts.items())
        lines.append(f"{'ensemble':<10}{r['name']:<{width}}{r['public_accuracy']:>11.4f}"
                     f"{r['private_accuracy']:>13.4f}{note}")
    return "\n".join(lines) + "\n"
