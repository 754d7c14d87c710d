"""Decision-level ensembles: combine member class probabilities P of shape (M, N, C), in numpy (and scipy's
L-BFGS-B to fit log_linear).

M members, N faces, C classes; P[m] is member m's (N, C) probability matrix (rows sum to 1).

Fitting and applying are separate steps, and fitting only ever sees PublicTest:

    weights = fit_ensemble("accuracy_weighted", public_probs, public_labels)   # PublicTest only
    combined = apply_ensemble(weights, private_probs)                           # (N, C), report on PrivateTest

Methods (the formulas; a_m, prec_m(c) are measured on PublicTest):

mean
    P_out = (1/M) * sum_m P[m].
accuracy_weighted  (the accuracy-weighted averaging of Bokányi & Mészégető)
    w_m = a_m / sum_j a_j with a_m = member m's PublicTest accuracy; P_out = sum_m w_m * P[m].
    (If every member has accuracy 0 the weights fall back to uniform.)
class_weighted  (class-confidence weighting)
    W[m, c] = prec_m(c), member m's PublicTest precision for class c = #{m predicts c and the truth is c}
    / #{m predicts c} (0 when m never predicts c). Each member's class-c column is scaled by W[m, c],
    summed over members and renormalized per face:
    S[n, c] = sum_m W[m, c] * P[m, n, c];  P_out[n, c] = S[n, c] / sum_c' S[n, c'].
    The raw precisions are used (not normalized across members), so a class that every member predicts
    precisely keeps more mass. A face whose S row is all zero falls back to the plain mean (for greedy:
    of the selected members).
vote  (majority vote)
    Each member votes for its argmax class: V[n, c] = sum_m w_m [argmax P[m, n] == c] / sum_m w_m (w_m = 1).
    Ties are broken by the summed probability T = sum_m w_m P[m] / sum_m w_m: the output is
    P_out = (V + eps * T) / (1 + eps) with eps = min(1e-3, 0.5 / K) for K = sum_m w_m votes (integers), a
    distribution whose argmax is the vote winner (vote fractions differ by at least 1/K > eps) and, among
    tied classes, the one with the highest summed probability.
greedy  (forward selection, Caruana et al. 2004)
    Start empty; at each step add the member whose addition gives the best PublicTest accuracy of the
    combined ensemble (the `combiner` rule above, default mean); ties go to the lower PublicTest negative
    log-likelihood, then the lower member index. Selection is WITH replacement by default (a member may be
    chosen again, which acts as an integer weight: its multiplicity), as Caruana et al. recommend; pass
    replacement=False for plain subset selection. It runs `max_members` steps (default M) and keeps the
    shortest prefix with the best PublicTest accuracy. The fitted weights are the combiner's weights on the
    selected multiset: mean -> w_m = k_m / sum k, accuracy_weighted -> w_m ∝ k_m * a_m,
    class_weighted -> W[m, c] = k_m * prec_m(c), vote -> k_m votes (k_m = times member m was chosen;
    unselected members get weight 0).
log_linear  (log-linear pooling: a weighted geometric mean, i.e. stacking with one weight per member)
    P_out[n, c] = exp(sum_m w_m log P[m, n, c]) / sum_c' exp(sum_m w_m log P[m, n, c'])  with w_m >= 0
    fitted to minimize the PublicTest negative log-likelihood of P_out (convex in w; L-BFGS-B from w = 0).
    Unlike accuracy weighting it learns what each member adds beyond the others: near-duplicate members
    share one weight, a member no better than chance gets 0, and sum_m w_m acts as an inverse temperature
    (an over-confident member is tempered, w < 1). Probabilities are floored at LOG_FLOOR before the log so
    one member's exact 0 cannot veto a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

METHODS: tuple[str, ...] = ("mean", "accuracy_weighted", "class_weighted", "vote", "greedy", "log_linear")
COMBINERS: tuple[str, ...] = ("mean", "accuracy_weighted", "class_weighted", "vote")  # what greedy can select with
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


# ---- validation and per-member statistics ---------------------------------------------------------------


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


def _finite_nonnegative(w: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(w) & (w >= 0)))  # NaN compares False both ways: test for it explicitly


def check_weights(weights: npt.ArrayLike, name: str, ndim: int) -> np.ndarray:
    """Ensemble weights as a float64 array of `ndim` dimensions, none empty, every value finite and >= 0."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers, got {weights!r}") from e
    if w.ndim != ndim or w.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-d array, got shape {w.shape}")
    if not _finite_nonnegative(w):
        raise ValueError(f"{name} must be finite and non-negative, got {w.tolist()}")
    return w


def _check_labels(labels: npt.ArrayLike, probs: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (probs.shape[1],):
        raise ValueError(f"labels have shape {y.shape}, expected ({probs.shape[1]},) to match the probabilities")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= probs.shape[2]):
        raise ValueError(f"labels hold class indices outside 0..{probs.shape[2] - 1}")
    return y


def accuracy(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Top-1 accuracy of an (N, C) probability matrix (0.0 for no faces)."""
    p = np.asarray(probs)
    y = np.asarray(labels)
    return float((p.argmax(axis=1) == y).mean()) if len(y) else 0.0


def member_accuracies(probs: npt.ArrayLike, labels: npt.ArrayLike) -> np.ndarray:
    """(M,) top-1 accuracy of each member."""
    p = check_probs(probs)
    y = _check_labels(labels, p)
    if not len(y):
        return np.zeros(p.shape[0])
    return (p.argmax(axis=2) == y[None, :]).mean(axis=1)


def per_class_precision(probs: npt.ArrayLike, labels: npt.ArrayLike) -> np.ndarray:
    """(M, C) precision of each member for each class (0 where the member never predicts that class)."""
    p = check_probs(probs)
    y = _check_labels(labels, p)
    m, _, c = p.shape
    pred = p.argmax(axis=2)  # (M, N)
    predicted = np.zeros((m, c))
    correct = np.zeros((m, c))
    for i in range(m):
        predicted[i] = np.bincount(pred[i], minlength=c)
        correct[i] = np.bincount(pred[i][pred[i] == y], minlength=c)
    out = np.zeros((m, c))
    np.divide(correct, predicted, out=out, where=predicted > 0)
    return out


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    if not len(labels):
        return 0.0
    return float(-np.log(probs[np.arange(len(labels)), labels].clip(1e-12)).mean())


# ---- the combiners --------------------------------------------------------------------------------------


def weighted_mean(probs: npt.ArrayLike, weights: npt.ArrayLike) -> np.ndarray:
    """sum_m w_m P[m] / sum_m w_m."""
    p = check_probs(probs)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (p.shape[0],) or not _finite_nonnegative(w) or w.sum() <= 0:
        raise ValueError(f"member weights must be {p.shape[0]} non-negative numbers with a positive sum, got {w}")
    return np.tensordot(w / w.sum(), p, axes=1)


def mean(probs: npt.ArrayLike) -> np.ndarray:
    """Simple averaging: (1/M) sum_m P[m]."""
    p = check_probs(probs)
    return p.mean(axis=0)


def accuracy_weights(accuracies: npt.ArrayLike) -> np.ndarray:
    """w_m = a_m / sum_j a_j (uniform if every accuracy is 0)."""
    a = np.asarray(accuracies, dtype=np.float64)
    if not _finite_nonnegative(a):
        raise ValueError(f"accuracies must be finite and non-negative, got {a}")
    return a / a.sum() if a.sum() > 0 else np.full(a.shape, 1.0 / max(len(a), 1))


def accuracy_weighted(probs: npt.ArrayLike, accuracies: npt.ArrayLike) -> np.ndarray:
    """Accuracy-weighted averaging: sum_m (a_m / sum_j a_j) P[m], a_m = member m's (PublicTest) accuracy."""
    return weighted_mean(probs, accuracy_weights(accuracies))


def class_weighted(probs: npt.ArrayLike, class_weights: npt.ArrayLike,
                   fallback_weights: npt.ArrayLike | None = None) -> np.ndarray:
    """S[n, c] = sum_m W[m, c] P[m, n, c], renormalized per face.

    A face whose S row is all zero gets the (fallback_weights-weighted, default plain) mean instead.
    """
    p = check_probs(probs)
    w = np.asarray(class_weights, dtype=np.float64)
    if w.shape != (p.shape[0], p.shape[2]) or not _finite_nonnegative(w):
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
    if w.shape != (m,) or not _finite_nonnegative(w) or w.sum() <= 0:
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
    if w.shape != (log_p.shape[0],) or not _finite_nonnegative(w):
        raise ValueError(f"log-linear weights must be {log_p.shape[0]} non-negative numbers, got {w}")
    return _softmax(np.tensordot(w, log_p, axes=1))


def log_linear_weights(probs: npt.ArrayLike, labels: npt.ArrayLike) -> np.ndarray:
    """(M,) w >= 0 minimizing the negative log-likelihood of log_linear(probs, w) on (probs, labels).

    The objective is convex in w (a multinomial logistic regression whose features are the members' log
    probabilities, without intercept), so the bounded L-BFGS-B optimum from w = 0 is the global one up to
    ties between identical members (which then split their weight evenly, by symmetry).
    """
    # Only fitting this method needs scipy; importing it here keeps `import ferkit` and apply_ensemble cheap.
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    log_p = member_log_probs(probs)
    y = _check_labels(labels, log_p)
    if not len(y):
        return np.zeros(log_p.shape[0])
    true_log_p = log_p[:, np.arange(len(y)), y]  # (M, N)

    def nll_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        logits = np.tensordot(w, log_p, axes=1)  # (N, C)
        log_norm = logsumexp(logits, axis=1)
        p_out = np.exp(logits - log_norm[:, None])
        nll = float(np.mean(log_norm - logits[np.arange(len(y)), y]))
        expected = np.einsum("nc,mnc->mn", p_out, log_p)  # E_{c ~ P_out}[log P[m, n, c]]
        return nll, (expected - true_log_p).mean(axis=1)

    result = minimize(nll_and_grad, np.zeros(log_p.shape[0]), jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None)] * log_p.shape[0], options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
    return np.maximum(result.x, 0.0)


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
    selected: greedy only: the chosen member indices in selection order (a repeat = chosen again).
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


def _fit_combiner(combiner: str, probs: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> EnsembleWeights:
    """Weights of `combiner` for the multiset of members given by `counts` (k_m copies of member m)."""
    if combiner == "mean":
        return EnsembleWeights(combiner, combiner, counts / counts.sum())
    if combiner == "accuracy_weighted":
        return EnsembleWeights(combiner, combiner, accuracy_weights(counts * member_accuracies(probs, labels)))
    if combiner == "class_weighted":
        cw = counts[:, None] * per_class_precision(probs, labels)
        return EnsembleWeights(combiner, combiner, counts / counts.sum(), class_weights=cw)
    if combiner == "vote":
        return EnsembleWeights(combiner, combiner, counts.astype(np.float64))
    raise ValueError(f"unknown combiner {combiner!r}; choose one of {', '.join(COMBINERS)}")


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


def greedy_selection(fit_probs: npt.ArrayLike, fit_labels: npt.ArrayLike, method: str = "mean",
                     max_members: int | None = None, replacement: bool = True) -> EnsembleWeights:
    """Forward selection of members by the combined accuracy on the fitting split (PublicTest).

    method: the combiner of the selected members ('mean', 'accuracy_weighted', 'class_weighted', 'vote').
    max_members: selection steps (ensemble size cap, counting repeats); default M.
    replacement: allow choosing a member again (default, Caruana et al.); False selects a subset.
    """
    p = check_probs(fit_probs, "fit_probs")
    y = _check_labels(fit_labels, p)
    combiner = canonical_method(method)
    if combiner not in COMBINERS:
        raise ValueError(f"greedy selection combines members with one of {', '.join(COMBINERS)}, not {method!r}")
    m = p.shape[0]
    steps = m if max_members is None else int(max_members)
    if steps < 1:
        raise ValueError(f"max_members must be positive, got {max_members}")
    if not replacement:
        steps = min(steps, m)
    counts = np.zeros(m)
    order: list[int] = []
    best: tuple[float, int, np.ndarray, list[int]] | None = None  # (accuracy, size, counts, order)
    for _ in range(steps):
        step_best: tuple[float, float, int] | None = None  # (accuracy, -nll, -index)
        for cand in range(m):
            if not replacement and counts[cand]:
                continue
            trial = counts.copy()
            trial[cand] += 1
            combined = apply_ensemble(_fit_combiner(combiner, p, y, trial), p)
            key = (accuracy(combined, y), -_nll(combined, y), -cand)
            if step_best is None or key > step_best:
                step_best = key
        assert step_best is not None
        pick = -step_best[2]
        counts[pick] += 1
        order.append(pick)
        if best is None or step_best[0] > best[0]:
            best = (step_best[0], len(order), counts.copy(), list(order))
    assert best is not None
    fitted = _fit_combiner(combiner, p, y, best[2])
    return EnsembleWeights("greedy", combiner, fitted.member_weights, fitted.class_weights, tuple(best[3]),
                           public_accuracy=best[0])


def fit_ensemble(method: str, public_probs: npt.ArrayLike, public_labels: npt.ArrayLike, *,
                 max_members: int | None = None, combiner: str = "mean",
                 replacement: bool = True) -> EnsembleWeights:
    """Fit ensemble `method` on PublicTest ONLY: the members' (M, N, C) PublicTest probabilities and labels.

    This is the only function that sees labels; it takes a single split by design, so the evaluation split
    (PrivateTest) cannot leak into the weights. combiner, max_members, replacement: greedy's options.
    """
    method = canonical_method(method)
    p = check_probs(public_probs, "public_probs")
    y = _check_labels(public_labels, p)
    if method == "greedy":
        return greedy_selection(p, y, combiner, max_members=max_members, replacement=replacement)
    fitted = (EnsembleWeights(method, method, log_linear_weights(p, y)) if method == "log_linear"
              else _fit_combiner(method, p, y, np.ones(p.shape[0])))
    fitted.public_accuracy = accuracy(apply_ensemble(fitted, p), y)
    return fitted
