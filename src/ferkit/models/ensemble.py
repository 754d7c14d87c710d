"""A saved ensemble: one .safetensors file that loads and runs like a single model.

Why in the models layer: a runnable ensemble is a model made of models. `ferkit.models.weights.load_model` must load
it (a trainer's teacher=, evaluate, predict, export and serve all take ensemble files), so `EnsembleModel` and the
file format live here, beside single models, and `load_model` dispatches to `load_ensemble` without importing an
upper layer. Fitting an ensemble (which members, which weights) stays in `ferkit.ensembles`, which re-exports these
names from `ferkit.ensembles.artifact`. The per-file helpers (metadata checks, digest, build on the meta device)
are `ferkit.models.weights_file`'s, shared with single models.

File layout: every member's tensors under a prefix (`m0.features.0.weight`, `m1....`), and JSON metadata
(the "ferkit" key, as in ferkit.models.weights) with:
  ensemble: true, format: 1, method, weights (the fitted EnsembleWeights), tta (the TTA the weights were
  fitted with), members (each member's own weights metadata), and the single-model keys every ferkit tool
  reads: model ("ensemble:<method>"), num_classes, classes, label_set, input_size, normalize.

Inputs: all members must share classes, input size and normalization (ValueError otherwise); the ensemble
does not resize internally, so it is fed exactly as each member would be.

`load_ensemble(path)` (and `ferkit.models.weights.load_model(path)`, which delegates here) returns an
`EnsembleModel`: an nn.Module whose forward returns the LOG of the combined probabilities, because ferkit
treats model outputs as logits and applies softmax; softmax(log p) == p, so `predict_proba` and `evaluate`
work unchanged. The weights were fitted on each member's TTA-averaged probabilities, so under a multi-view TTA
the members' views are averaged first and then combined (`EnsembleModel.probs_over_views`, which
`ferkit.models.predict` and the ONNX backend use); `--tta auto` runs the file under the mode it was fitted with
(meta["tta"]), and the numbers match the fitted ensemble's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.models.ensemble_weights import LOG_FLOOR, EnsembleWeights, vote_tie_eps
from ferkit.models.registry import get_spec
from ferkit.models.weights_file import (
    DIGEST_KEY,
    WeightsError,
    build_model,
    check_forward,
    check_metadata,
    load_state,
    read_metadata,
    read_tensors,
    tensor_shapes,
    write_safetensors,
)

ENSEMBLE_FORMAT = 1
SHARED_KEYS = ("classes", "num_classes", "label_set", "input_size", "normalize")

Member = str | os.PathLike | tuple[nn.Module, dict[str, Any]]


class EnsembleModel(nn.Module):
    """Runs every member on the same input and combines their softmax outputs; forward returns log-probabilities.

    softmax(forward(x)) equals `apply_ensemble(weights, member probabilities)` (up to float32 rounding).
    """

    def __init__(self, members: Sequence[nn.Module], weights: EnsembleWeights, input_size: int = 48,
                 tta: str = "none") -> None:
        super().__init__()
        if len(members) != weights.num_members:
            raise ValueError(f"{len(members)} member models for weights fitted on {weights.num_members} members")
        self.members = nn.ModuleList(members)
        self.ensemble_weights = weights
        self.input_size = int(input_size)
        self.tta = tta
        self.ferkit_name = f"ensemble:{weights.method}"
        self.register_buffer("member_weights", torch.as_tensor(weights.member_weights, dtype=torch.float64),
                             persistent=False)
        cw = weights.class_weights if weights.class_weights is not None else weights.member_weights[:, None]
        self.register_buffer("class_weights", torch.as_tensor(cw, dtype=torch.float64), persistent=False)

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C) float64 softmax probabilities of each member."""
        return torch.stack([m(x).double().softmax(-1) for m in self.members])

    def combine(self, probs: torch.Tensor) -> torch.Tensor:
        """The torch twin of ensemble_weights.apply_ensemble on (M, B, C) probabilities -> (B, C)."""
        w = self.member_weights.to(probs.device)
        combiner = self.ensemble_weights.combiner
        if combiner == "log_linear":  # its exponents are not normalized (their sum is an inverse temperature)
            return torch.einsum("m,mbc->bc", w, probs.clamp_min(LOG_FLOOR).log()).softmax(-1)
        wn = w / w.sum()
        mean = torch.einsum("m,mbc->bc", wn, probs)
        if combiner in ("mean", "accuracy_weighted"):
            return mean
        if combiner == "class_weighted":
            scores = torch.einsum("mc,mbc->bc", self.class_weights.to(probs.device), probs)
            total = scores.sum(-1, keepdim=True)
            return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), mean)
        if combiner == "vote":
            eps = vote_tie_eps(self.ensemble_weights.member_weights)
            votes = torch.einsum("m,mbc->bc", wn, F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype))
            return (votes + eps * mean) / (1.0 + eps)
        raise ValueError(f"unknown combiner {combiner!r}")

    def probs_over_views(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """(B, C) float64 combined probabilities of x: `views` TTA views of B faces, view-major (V*B, 1, S, S).

        Each member's probabilities are averaged over the views before they are combined, as in fitting (on
        members' TTA-averaged predictions); combining per view and then averaging differs for every combiner
        but the linear ones (mean, accuracy_weighted).
        """
        probs = self.member_probs(x)
        probs = probs.view(probs.shape[0], views, -1, probs.shape[-1]).mean(1)
        with torch.autocast(device_type=probs.device.type, enabled=False):  # combine in float64, not bf16/fp16
            return self.combine(probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probs_over_views(x).clamp_min(1e-30).log().float()


def _member_state_and_meta(member: Member) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if isinstance(member, tuple):
        model, meta = member
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return state, dict(meta), f"member model {meta.get('model', '?')}"
    path = Path(member)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    meta = read_metadata(path)
    check_metadata(meta, path)
    return read_tensors(path, meta), meta, str(path)


def _complete_meta(meta: dict[str, Any], source: str) -> dict[str, Any]:
    if meta.get("ensemble"):
        raise ValueError(f"{source} is itself an ensemble; nested ensembles are not supported")
    if "model" not in meta or "num_classes" not in meta:
        raise ValueError(f"{source} has no ferkit metadata (model, num_classes); was it written by ferkit?")
    meta = dict(meta)
    meta.pop(DIGEST_KEY, None)  # the member's digest is of its own file's tensors; the ensemble records its own
    meta.setdefault("input_size", get_spec(meta["model"]).input_size)
    meta.setdefault("normalize", "dataset")
    return meta


def save_ensemble(path: str | os.PathLike, members: Sequence[Member], weights: EnsembleWeights, *,
                  tta: str = "none", prune: bool = True, half: bool = False,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write one .safetensors file holding every member and the fitted weights (atomically).

    members: weights files, or (model, meta) pairs, in the order the weights were fitted on.
    prune: leave out members with zero weight (e.g. those greedy selection did not choose).
    half: store float tensors as fp16. extra: more metadata (e.g. the PublicTest/PrivateTest scores).
    """
    if len(members) != weights.num_members:
        raise ValueError(f"{len(members)} members given for weights fitted on {weights.num_members} members")
    if prune:
        keep = weights.used_members()
        if not keep:  # checked before subset(): EnsembleWeights refuses zero members
            raise ValueError("the ensemble has no member with a non-zero weight")
        members = [members[i] for i in keep]
        weights = weights.subset(keep)
    state: dict[str, torch.Tensor] = {}
    metas: list[dict[str, Any]] = []
    sources: list[str] = []
    for i, member in enumerate(members):
        tensors, meta, source = _member_state_and_meta(member)
        meta = _complete_meta(meta, source)
        if metas:
            for key in SHARED_KEYS:
                if meta.get(key) != metas[0].get(key):
                    raise ValueError(f"{source}: {key} {meta.get(key)!r} differs from {sources[0]}'s "
                                     f"{metas[0].get(key)!r}; ensemble members must share classes, input size "
                                     "and normalization")
        for k, v in tensors.items():
            v = v.contiguous()
            state[f"m{i}.{k}"] = v.half() if half and v.is_floating_point() else v
        metas.append(meta)
        sources.append(source)
    first = metas[0]
    meta_out: dict[str, Any] = {
        "ensemble": True, "format": ENSEMBLE_FORMAT, "model": f"ensemble:{weights.method}",
        **{k: first.get(k) for k in SHARED_KEYS}, "method": weights.method, "tta": tta,
        "weights": weights.to_json(), "num_members": len(metas), "members": metas,
    } | (extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, path, meta_out)
    return path


def is_ensemble_file(path: str | os.PathLike) -> bool:
    try:
        return bool(read_metadata(path).get("ensemble"))
    except Exception:  # not a safetensors file
        return False


def load_ensemble(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[EnsembleModel, dict]:
    """Rebuild a `save_ensemble` file as an EnsembleModel in eval mode; returns (model, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ensemble file {path} does not exist")
    meta = read_metadata(path)
    if not meta.get("ensemble"):
        raise ValueError(f"{path} is not a ferkit ensemble (load single models with ferkit.models.weights.load_model)")
    if int(meta.get("format", 0)) > ENSEMBLE_FORMAT:
        raise ValueError(f"{path} uses ensemble format {meta['format']}; this ferkit reads up to {ENSEMBLE_FORMAT}")
    check_metadata(meta, path)
    for key in ("members", "weights", "input_size", "num_classes"):
        if key not in meta:
            raise WeightsError(f"{path}: the ensemble metadata has no {key!r}")
    members = meta["members"]
    if not isinstance(members, list) or not members:
        raise WeightsError(f"{path}: an ensemble file needs a non-empty 'members' list, got {members!r}")
    try:
        weights = EnsembleWeights.from_json(meta["weights"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: bad ensemble 'weights' in the metadata: {e}") from e
    if weights.class_weights is not None and weights.class_weights.shape[1] != meta["num_classes"]:
        raise WeightsError(f"{path}: the ensemble's class weights cover {weights.class_weights.shape[1]} classes, "
                           f"num_classes is {meta['num_classes']}")
    shapes = tensor_shapes(path)
    models = []
    for i, mmeta in enumerate(members):
        source = f"{path} (member {i})"
        if not isinstance(mmeta, dict):
            raise WeightsError(f"{source}: member metadata is not an object")
        check_metadata(mmeta, source)
        for key in SHARED_KEYS:
            if mmeta.get(key) != meta.get(key):
                raise WeightsError(f"{source}: {key} {mmeta.get(key)!r} differs from the ensemble's {meta.get(key)!r}")
        prefix = f"m{i}."
        models.append(build_model(mmeta, {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)},
                                  source))
    # Every tensor must belong to a member: a file is verified whole (NaN, digest), nothing in it goes unused.
    stray = [k for k in shapes if not any(k.startswith(f"m{i}.") for i in range(len(members)))]
    if stray:
        raise WeightsError(f"{path}: tensor {stray[0]} belongs to no member")
    state = read_tensors(path, meta)
    for i, model in enumerate(models):
        prefix = f"m{i}."
        load_state(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    try:
        ensemble = EnsembleModel(models, weights, input_size=int(meta["input_size"]), tta=str(meta.get("tta", "none")))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from e
    ensemble = ensemble.to(device).eval()
    check_forward(ensemble, meta, path)
    return ensemble, meta
