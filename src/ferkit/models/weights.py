"""Save and load trained weights safely: safetensors (no pickle, no code execution) + JSON metadata.

A weights file carries what is needed to use it: the registry name, number of classes, label set,
input size and normalization, so `load_model(path)` rebuilds the exact model with no other input.

Nothing read from a file is trusted: `load_model` checks the metadata (every size within bounds, class names
unique and as many as the head's outputs), builds the model on the meta device first so a forged size cannot
allocate more than the file's own tensors, refuses NaN/infinite tensors, and verifies `tensors_sha256` (a digest
of the tensors, recorded by `save_weights`; files written before it existed have none and load unverified).

Module layout: the per-file helpers those checks use (read_metadata, check_metadata, build_model, read_tensors,
WeightsError, ...) live in `ferkit.models.weights_file`, shared with saved ensembles (`ferkit.models.ensemble`),
and are re-exported here, where callers have always imported them. `load_model` dispatches on the metadata: a
file that says `ensemble: true` is loaded by `ferkit.models.ensemble.load_ensemble`, so every tool that takes a
weights file (evaluate, predict, export, serve, a trainer's teacher=) takes a saved ensemble too.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferkit.models.ensemble import load_ensemble
from ferkit.models.weights_file import (
    DIGEST_KEY,
    INPUT_SIZE_RANGE,
    MAX_CLASSES,
    MAX_KWARG_INT,
    MAX_KWARG_LIST,
    WeightsError,
    build_model,
    check_forward,
    check_metadata,
    load_state,
    read_metadata,
    read_tensors,
    tensor_shapes,
    tensors_sha256,
    write_safetensors,
)

__all__ = ["DEFAULT_WEIGHTS_NAME", "DIGEST_KEY", "INPUT_SIZE_RANGE", "MAX_CLASSES", "MAX_KWARG_INT", "MAX_KWARG_LIST",
           "SHIPPED_MODELS", "WeightsError", "build_model", "check_forward", "check_metadata", "default_manifest_path",
           "default_weights_path", "find_weights", "load_model", "load_state", "read_metadata", "read_tensors",
           "resolve_weights", "save_weights", "shipped_manifest_path", "shipped_weights_path", "tensor_shapes",
           "tensors_sha256", "write_safetensors"]

# Models shipped inside the package, by the name users pass (`Recognizer(model="fast")`, `--weights fast`):
# "default" is the most accurate; "fast" is a compact mini-Xception distilled from it (with F-Riv 5), for throughput
# (see the README's "The shipped models"). tools/ship_model.py --as NAME makes a training run one of them.
# default: the most accurate FER2013 model; fast: the compact one; ferplus: trained on FER+'s crowd votes, 8 classes.
SHIPPED_MODELS = {"default": "ferkit_default", "fast": "ferkit_fast", "ferplus": "ferkit_ferplus"}
DEFAULT_WEIGHTS_NAME = "ferkit_default.safetensors"


def shipped_weights_path(name: str = "default") -> Path:
    """The shipped model called `name` (one of SHIPPED_MODELS), inside the installed package."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model called {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    return Path(str(resources.files("ferkit") / "weights" / f"{SHIPPED_MODELS[name]}.safetensors"))


def shipped_manifest_path(name: str = "default") -> Path:
    """A shipped model's manifest (training manifest + `ferkit evaluate` results; see tools/ship_model.py)."""
    return shipped_weights_path(name).with_suffix(".manifest.json")


def default_weights_path() -> Path:
    """The model shipped inside the package (used when no --weights is given)."""
    return shipped_weights_path("default")


def default_manifest_path() -> Path:
    return shipped_manifest_path("default")


def resolve_weights(spec: str | os.PathLike | None) -> Path:
    """A weights argument as given by a user: None -> the default shipped model; a shipped model's name
    (a key of SHIPPED_MODELS) -> its file, unless a file of that name exists here; a directory (a training
    run) -> its best.safetensors, whether or not it exists (callers report a missing file); anything else ->
    that path."""
    if spec is None:
        return default_weights_path()
    if str(spec) in SHIPPED_MODELS and not Path(spec).exists():
        return shipped_weights_path(str(spec))
    if Path(spec).is_dir():
        return Path(spec) / "best.safetensors"
    return Path(spec)


def find_weights(spec: str | os.PathLike | None, how: str = "pass a weights file") -> Path:
    """resolve_weights(spec), or FileNotFoundError saying what is missing (the shipped default, a run
    directory's best.safetensors, or the file given) and `how` to give weights (a CLI says which option)."""
    path = resolve_weights(spec)
    if path.is_file():
        return path
    if spec is None:
        raise FileNotFoundError(f"no weights given and the shipped default weights {path} do not exist; {how} "
                                "(e.g. runs/<name>/best.safetensors from `ferkit train`)")
    if Path(spec).is_dir():
        raise FileNotFoundError(f"run directory {spec} has no best.safetensors (training writes it at the end of "
                                f"the first epoch); {how}")
    raise FileNotFoundError(f"weights file {spec} not found")


def save_weights(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any], half: bool = False) -> None:
    """Write `model`'s state dict and `meta` atomically. `half=True` stores float tensors as fp16."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    write_safetensors(state, path, meta)


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path` (default: the shipped one) in eval mode; returns (model, meta).

    The model comes back in channels_last memory format: oneDNN (CPU) and cuDNN run convolutions faster on it
    (ferkit_vgg_s inference on a 2-core AVX-512 CPU: 1.5x fp32, 2.4x with bf16 autocast); the function and the
    state dict are unchanged.
    """
    path = find_weights(path or None)
    meta = read_metadata(path)
    if meta.get("ensemble"):  # a saved ensemble (ferkit.models.ensemble) loads as one model
        return load_ensemble(path, device)
    if "model" not in meta:
        raise WeightsError(f"{path} has no ferkit metadata (was it written by ferkit?)")
    check_metadata(meta, path)
    model = build_model(meta, tensor_shapes(path), path)
    load_state(model, read_tensors(path, meta))
    model = model.to(device, memory_format=torch.channels_last).eval()
    check_forward(model, meta, path)
    return model, meta
