"""Decision-level ensembles: combine member class probabilities P of shape (M, N, C), in numpy (and scipy's
L-BFGS-B to fit log_linear).

M members, N faces, C classes; P[m] is member m's (N, C) probability matrix (rows sum to 1).

Fitting and applying are separate steps, and fitting only ever sees PublicTest:

    weights = fit_ensemble("accuracy_weighted", public_probs, public_labels)   # PublicTest only
    combined = apply_ensemble(weights, private_probs)                           # (N, C), report on PrivateTest

This module fits. Applying (EnsembleWeights, apply_ensemble and the rules it applies: weighted_mean, class_weighted,
majority_vote, log_linear) is defined in the models layer, `ferkit.models.ensemble_weights`, because a saved
ensemble runs as a model there; those names are re-exported here.

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
    With max_members = K below the number of networks (log_linear_selection): forward selection by likelihood.
    Start empty; at each step add the network whose members, joined to those chosen, give the lowest PublicTest
    negative log-likelihood of the refitted log_linear weights (ties to the lower index); stop after K networks.
    A network is a group of members (by default each member alone; `groups` puts a model and its TTA copy, e.g.
    `vgg_s_seed1` and `vgg_s_seed1_flip`, in one, since both cost one network's compute per face).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# Re-exported (see __all__): they were defined here before moving to the models layer (see the module docstring).
from ferkit.models.ensemble_weights import (
    ALIASES,
    LOG_FLOOR,
    METHODS,
    VOTE_TIE_EPS,
    EnsembleWeights,
    apply_ensemble,
    canonical_method,
    check_probs,
    check_weights,
    class_weighted,
    finite_nonnegative,
    log_linear,
    majority_vote,
    member_log_probs,
    vote_tie_eps,
    weighted_mean,
)

__all__ = ["ALIASES", "COMBINERS", "LOG_FLOOR", "METHODS", "VOTE_TIE_EPS", "EnsembleWeights", "accuracy",
           "accuracy_weighted", "accuracy_weights", "apply_ensemble", "canonical_method", "check_probs",
           "check_weights", "class_weighted", "fit_ensemble", "greedy_selection", "log_linear", "log_linear_selection",
           "log_linear_weights", "majority_vote", "mean", "member_accuracies", "member_log_probs", "network_groups",
           "per_class_precision", "vote_tie_eps", "weighted_mean"]

COMBINERS: tuple[str, ...] = ("mean", "accuracy_weighted", "class_weighted", "vote")  # what greedy can select with


# ---- validation and per-member statistics ---------------------------------------------------------------


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


def mean(probs: npt.ArrayLike) -> np.ndarray:
    """Simple averaging: (1/M) sum_m P[m]."""
    p = check_probs(probs)
    return p.mean(axis=0)


def accuracy_weights(accuracies: npt.ArrayLike) -> np.ndarray:
    """w_m = a_m / sum_j a_j (uniform if every accuracy is 0)."""
    a = np.asarray(accuracies, dtype=np.float64)
    if not finite_nonnegative(a):
        raise ValueError(f"accuracies must be finite and non-negative, got {a}")
    return a / a.sum() if a.sum() > 0 else np.full(a.shape, 1.0 / max(len(a), 1))


def accuracy_weighted(probs: npt.ArrayLike, accuracies: npt.ArrayLike) -> np.ndarray:
    """Accuracy-weighted averaging: sum_m (a_m / sum_j a_j) P[m], a_m = member m's (PublicTest) accuracy."""
    return weighted_mean(probs, accuracy_weights(accuracies))


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


def network_groups(groups: Sequence[str] | None, num_members: int) -> list[list[int]]:
    """Member indices per network, in order of first appearance (None: every member is its own network)."""
    if groups is None:
        return [[i] for i in range(num_members)]
    if len(groups) != num_members:
        raise ValueError(f"groups name {len(groups)} networks' members for {num_members} members")
    out: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(str(g), []).append(i)
    return list(out.values())


def log_linear_selection(fit_probs: npt.ArrayLike, fit_labels: npt.ArrayLike, max_members: int,
                         groups: Sequence[str] | None = None) -> EnsembleWeights:
    """log_linear over at most `max_members` networks, chosen forward by PublicTest likelihood (see module doc).

    groups: each member's network name (members sharing one are chosen together); default one network each.
    The result's `selected` lists the chosen members, network by network in selection order.
    """
    p = check_probs(fit_probs, "fit_probs")
    y = _check_labels(fit_labels, p)
    if int(max_members) < 1:
        raise ValueError(f"max_members must be positive, got {max_members}")
    networks = network_groups(groups, p.shape[0])
    chosen: list[int] = []
    chosen_w = np.zeros(0)
    for _ in range(min(int(max_members), len(networks))):
        step_best: tuple[float, list[int], np.ndarray] | None = None
        for net in networks:
            if net[0] in chosen:
                continue
            trial = chosen + net
            w = log_linear_weights(p[trial], y)
            nll = _nll(log_linear(p[trial], w), y)
            if step_best is None or nll < step_best[0]:
                step_best = (nll, trial, w)
        assert step_best is not None
        _, chosen, chosen_w = step_best
    weights = np.zeros(p.shape[0])
    weights[chosen] = chosen_w
    return EnsembleWeights("log_linear", "log_linear", weights, selected=tuple(chosen))


def fit_ensemble(method: str, public_probs: npt.ArrayLike, public_labels: npt.ArrayLike, *,
                 max_members: int | None = None, combiner: str = "mean",
                 replacement: bool = True, groups: Sequence[str] | None = None) -> EnsembleWeights:
    """Fit ensemble `method` on PublicTest ONLY: the members' (M, N, C) PublicTest probabilities and labels.

    This is the only function that sees labels; it takes a single split by design, so the evaluation split
    (PrivateTest) cannot leak into the weights. combiner, max_members, replacement: greedy's options.
    log_linear with max_members below the number of networks (`groups`, default one per member) chooses that
    many networks forward by likelihood (log_linear_selection); other methods ignore groups.
    """
    method = canonical_method(method)
    p = check_probs(public_probs, "public_probs")
    y = _check_labels(public_labels, p)
    if method == "greedy":
        return greedy_selection(p, y, combiner, max_members=max_members, replacement=replacement)
    if method == "log_linear" and max_members is not None and max_members < len(network_groups(groups, p.shape[0])):
        fitted = log_linear_selection(p, y, max_members, groups)
    elif method == "log_linear":
        fitted = EnsembleWeights(method, method, log_linear_weights(p, y))
    else:
        fitted = _fit_combiner(method, p, y, np.ones(p.shape[0]))
    fitted.public_accuracy = accuracy(apply_ensemble(fitted, p), y)
    return fitted
