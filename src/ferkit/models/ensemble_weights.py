"""A fitted ensemble's weights and what they compute: combine M members' class probabilities (M, N, C) -> (N, C),
in numpy. `EnsembleModel` (`ferkit.models.ensemble`) is the torch twin of `apply_ensemble`.

Why here, in the models layer: a saved ensemble is a model made of models, which `ferkit.models.weights.load_model`
loads and every upper layer runs, so what it needs to run (EnsembleWeights, apply_ensemble and the combination
rules it uses) sits below them. Fitting weights (greedy selection, log-linear weights, fit_ensemble) needs
labels and is the ensembles layer's job: `ferkit.ensembles.combine`, which documents every method's formulas
and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

METHODS: tuple[str, ...] = ("mean", "accuracy_weighted", "class_weighted", "vote", "greedy", "log_linear")
ALIASES = {"average": "mean", "majority_vote": "vote", "majority": "vote", "forward_selection": "greedy",
           "geometric": "log_linear"}
VOTE_TIE_EPS = 1e-3  # the largest tie-break weight; see vote_tie_eps()
LOG_FLOOR = 1e-6  # log_linear: probabilities below this count as this (an exact 0 would be log 0 = -inf)


def canonical_method(name: str) -> str:
    """One of METHODS (aliases: average, majority_vote, forward_selection, geometric)."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown ensemble method {name!r}; choose one of {', '.join(METHODS)}")
    return key


# ---- validation -----------------------------------------------------------------------------------------


def check_probs(probs: npt.ArrayLike, name: str = "probs") -> np.ndarray:
    """(M, N, C) float64 member probabilities; raises ValueError on a wrong shape or non-finite values."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (members, faces, classes), got {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{name} needs at least one member and one class, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def finite_nonnegative(w: np.ndarray) -> bool:
    """Whether every value of `w` is finite and >= 0."""
    return bool(np.all(np.isfinite(w) & (w >= 0)))  # NaN compares False both ways: test for it explicitly


def check_weights(weights: npt.ArrayLike, name: str, ndim: int) -> np.ndarray:
    """Ensemble weights as a float64 array of `ndim` dimensions, none empty, every value finite and >= 0."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers, got {weights!r}") from e
    if w.ndim != ndim or w.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-d array, got shape {w.shape}")
    if not finite_nonnegative(w):
        raise ValueError(f"{name} must be finite and non-negative, got {w.tolist()}")
    return w


# ---- the combination rules ------------------------------------------------------------------------------


def weighted_mean(probs: npt.ArrayLike, weights: npt.ArrayLike) -> np.ndarray:
    """sum_m w_m P[m] / sum_m w_m."""
    p = check_probs(probs)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (p.shape[0],) or not finite_nonnegative(w) or w.sum() <= 0:
        raise ValueError(f"member weights must be {p.shape[0]} non-negative numbers with a positive sum, got {w}")
    return np.tensordot(w / w.sum(), p, axes=1)


def class_weighted(probs: npt.ArrayLike, class_weights: npt.ArrayLike,
                   fallback_weights: npt.ArrayLike | None = None) -> np.ndarray:
    """S[n, c] = sum_m W[m, c] P[m, n, c], renormalized per face.

    A face whose S row is all zero gets the (fallback_weights-weighted, default plain) mean instead.
    """
    p = check_probs(probs)
    w = np.asarray(class_weights, dtype=np.float64)
    if w.shape != (p.shape[0], p.shape[2]) or not finite_nonnegative(w):
        raise ValueError(f"class weights must be non-negative with shape {(p.shape[0], p.shape[2])}, got {w.shape}")
    scores = np.einsum("mc,mnc->nc", w, p)
    total = scores.sum(axis=1, keepdims=True)
    fallback = p.mean(axis=0) if fallback_weights is None else weighted_mean(p, fallback_weights)
    out = np.where(total > 0, scores / np.where(total > 0, total, 1.0), fallback)
    return out


def vote_tie_eps(votes: npt.ArrayLike) -> float:
    """Weight of the summed-probability tie-break: min(1e-3, 0.5 / total votes), below the smallest vote gap."""
    return float(min(VOTE_TIE_EPS, 0.5 / max(float(np.sum(votes)), 1.0)))


def majority_vote(probs: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> np.ndarray:
    """Vote fractions of the members' argmax classes, ties broken by summed probability (see module doc).

    weights: optional votes per member (integers, e.g. greedy multiplicities); default one vote each.
    """
    p = check_probs(probs)
    m, _, c = p.shape
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not finite_nonnegative(w) or w.sum() <= 0:
        raise ValueError(f"vote weights must be {m} non-negative numbers with a positive sum, got {w}")
    eps = vote_tie_eps(w)
    w = w / w.sum()
    onehot = np.eye(c)[p.argmax(axis=2)]  # (M, N, C)
    votes = np.tensordot(w, onehot, axes=1)
    summed = np.tensordot(w, p, axes=1)
    return (votes + eps * summed) / (1.0 + eps)


def member_log_probs(probs: npt.ArrayLike) -> np.ndarray:
    """(M, N, C) log of the members' probabilities, floored at LOG_FLOOR (the log_linear features)."""
    return np.log(np.maximum(check_probs(probs), LOG_FLOOR))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def log_linear(probs: npt.ArrayLike, weights: npt.ArrayLike) -> np.ndarray:
    """Log-linear pooling: softmax_c(sum_m w_m log P[m, n, c]) (all-zero weights give the uniform distribution)."""
    log_p = member_log_probs(probs)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (log_p.shape[0],) or not finite_nonnegative(w):
        raise ValueError(f"log-linear weights must be {log_p.shape[0]} non-negative numbers, got {w}")
    return _softmax(np.tensordot(w, log_p, axes=1))


# ---- fitted ensembles -----------------------------------------------------------------------------------


@dataclass
class EnsembleWeights:
    """A fitted ensemble: how to combine M members' probabilities.

    method: what was fitted (one of METHODS).
    combiner: the rule apply_ensemble uses: method itself, or for greedy the rule its selection used.
    member_weights: (M,) weights (mean/accuracy_weighted: sum to 1; vote: votes per member; class_weighted:
        multiplicity / total, used only for faces whose class-weighted scores are all zero; log_linear: the
        exponents w_m, not normalized: their sum is an inverse temperature). A member with weight 0 does not
        influence the output.
    class_weights: (M, C) per-member per-class weights for the class_weighted combiner, else None.
    selected: greedy: the chosen member indices in selection order (a repeat = chosen again); log_linear capped
        to K networks: the members of the chosen networks, network by network (some may end with weight 0).
    public_accuracy: the combined PublicTest accuracy at fit time (what greedy maximized).
    """

    method: str
    combiner: str
    member_weights: np.ndarray
    class_weights: np.ndarray | None = None
    selected: tuple[int, ...] = ()
    public_accuracy: float | None = None

    def __post_init__(self) -> None:
        # Weights come from fitting, from saved files and from users: NaN or negative weights would combine
        # into NaN or negative "probabilities" (printed as a dominant class), so they are refused here.
        self.member_weights = check_weights(self.member_weights, "member weights", ndim=1)
        if self.class_weights is not None:
            self.class_weights = check_weights(self.class_weights, "class weights", ndim=2)
            if self.class_weights.shape[0] != self.num_members:
                raise ValueError(f"class weights have {self.class_weights.shape[0]} rows for "
                                 f"{self.num_members} members")
        if any(not 0 <= i < self.num_members for i in self.selected):
            raise ValueError(f"selected member indices {list(self.selected)} are outside 0..{self.num_members - 1}")

    @property
    def num_members(self) -> int:
        return int(len(self.member_weights))

    def used_members(self) -> list[int]:
        """Indices of members that influence the output (non-zero weight)."""
        return [int(i) for i in np.flatnonzero(self.member_weights > 0)]

    def subset(self, keep: Sequence[int]) -> EnsembleWeights:
        """The same ensemble restricted to members `keep` (e.g. drop the zero-weight ones before saving)."""
        keep = [int(i) for i in keep]
        remap = {old: new for new, old in enumerate(keep)}
        w = self.member_weights[keep]
        if self.combiner in ("mean", "accuracy_weighted") and w.sum() > 0:
            w = w / w.sum()
        return EnsembleWeights(self.method, self.combiner, w,
                               None if self.class_weights is None else self.class_weights[keep],
                               tuple(remap[i] for i in self.selected if i in remap), self.public_accuracy)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "combiner": self.combiner,
                "member_weights": [float(x) for x in self.member_weights],
                "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
                "selected": list(self.selected), "public_accuracy": self.public_accuracy}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EnsembleWeights:
        cw = d.get("class_weights")
        return cls(method=canonical_method(d["method"]), combiner=canonical_method(d.get("combiner") or d["method"]),
                   member_weights=np.asarray(d["member_weights"], dtype=np.float64),
                   class_weights=None if cw is None else np.asarray(cw, dtype=np.float64),
                   selected=tuple(int(i) for i in d.get("selected") or ()), public_accuracy=d.get("public_accuracy"))


def apply_ensemble(weights: EnsembleWeights, probs: npt.ArrayLike) -> np.ndarray:
    """(N, C) combined probabilities of members' (M, N, C) probabilities under fitted `weights`."""
    p = check_probs(probs)
    if p.shape[0] != weights.num_members:
        raise ValueError(f"the ensemble was fitted for {weights.num_members} members, got {p.shape[0]}")
    if weights.class_weights is not None and weights.class_weights.shape[1] != p.shape[2]:
        raise ValueError(f"the ensemble was fitted for {weights.class_weights.shape[1]} classes, got {p.shape[2]}")
    if weights.combiner in ("mean", "accuracy_weighted"):
        return weighted_mean(p, weights.member_weights)
    if weights.combiner == "class_weighted":
        return class_weighted(p, weights.class_weights, weights.member_weights)
    if weights.combiner == "vote":
        return majority_vote(p, weights.member_weights)
    if weights.combiner == "log_linear":
        return log_linear(p, weights.member_weights)
    raise ValueError(f"unknown combiner {weights.combiner!r}")
