"""Test-time class-prior correction ("logit adjustment", Menon et al. 2021, arXiv:2007.07314).

A network trained on FER2013 learns its class frequencies (happy 25 % of the training faces, disgust 1.5 %) and
carries them into every prediction. For photos not distributed like FER2013, dividing the probabilities by the
training prior (p_adj ∝ p / prior, i.e. logits - log prior) gives the prediction a balanced-class classifier would
make: accuracy on FER2013's own skewed test split drops, balanced accuracy and macro F1 usually rise.

Weights trained by ferkit record their training prior (`class_prior` in the metadata: the mean training target,
one-hot or FER+ vote distribution). Older weights fall back to their label set's known Training frequencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

PRIORS = ("none", "uniform")

# Training-split class counts of the published files, in each label set's class order, for weights that do not
# record their prior. FER2013: the CSV's own labels; ferplus8: FER+ majority votes (the counts in the data's
# README).
TRAINING_COUNTS: dict[str, tuple[int, ...]] = {
    "fer7": (3995, 436, 4097, 7215, 4830, 3171, 4965),
    "fer6": (3995, 4097, 7215, 4830, 3171, 4965),
    "ferplus8": (10309, 7528, 3562, 3515, 2467, 191, 652, 165),
}


def training_prior(meta: Mapping[str, Any]) -> np.ndarray:
    """The class frequencies the weights were trained on: `class_prior` from their metadata, else their label
    set's FER2013/FER+ Training frequencies; ValueError when neither is known or they do not fit the classes."""
    classes = list(meta.get("classes") or [])
    recorded = meta.get("class_prior")
    if recorded is not None:
        prior = np.asarray(recorded, dtype=np.float64)
    elif meta.get("label_set") in TRAINING_COUNTS:
        prior = np.asarray(TRAINING_COUNTS[str(meta["label_set"])], dtype=np.float64)
    else:
        raise ValueError(f"these weights ({meta.get('model', '?')}, label set {meta.get('label_set')!r}) record no "
                         "training class prior (class_prior); --prior uniform cannot be applied")
    if prior.shape != (len(classes),) or not np.all(np.isfinite(prior)) or np.any(prior <= 0):
        raise ValueError(f"class prior {prior.tolist()} does not fit the {len(classes)} classes {classes} "
                         "(one positive, finite value per class)")
    return prior / prior.sum()


def check_prior(prior: str, meta: Mapping[str, Any]) -> None:
    """Fail before any work when `prior` is unknown, or 'uniform' for weights whose training prior is not known."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if prior == "uniform":
        training_prior(meta)


def adjust_prior(probs: np.ndarray, prior: str, meta: Mapping[str, Any]) -> np.ndarray:
    """`probs` (N, C) under `prior`: 'none' as they are; 'uniform' divided by the training prior, renormalized."""
    check_prior(prior, meta)
    if prior == "none":
        return probs
    adjusted = np.asarray(probs, dtype=np.float64) / training_prior(meta)
    return (adjusted / adjusted.sum(axis=1, keepdims=True)).astype(np.float32)
