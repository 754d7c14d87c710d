"""Save and load trained weights safely: safetensors (no pickle, no code execution) + JSON metadata.

A weights file carries what is needed to use it: the registry name, number of classes, label set,
input size and normalization, so `load_model(path)` rebuilds the exact model with no other input.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ferkit.models.registry import create_model

# Models shipped inside the package, by the name users pass (`Recognizer(model="fast")`, `--weights fast`):
# "default" is the most accurate; "fast" is a compact mini-Xception distilled from it (with F-Riv 5), for throughput
# (see the README's "The shipped models"). tools/ship_model.py --as NAME makes a training run one of them.
SHIPPED_MODELS = {"default": "ferkit_default", "fast": "ferkit_fast"}
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
    (a key of SHIPPED_MODELS) -> its file, unless a file of that name exists here; anything else -> that path."""
    if spec is None:
        return default_weights_path()
    if str(spec) in SHIPPED_MODELS and not Path(spec).exists():
        return shipped_weights_path(str(spec))
    return Path(spec)


def save_weights(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any], half: bool = False) -> None:
    """Write `model`'s state dict and `meta` atomically. `half=True` stores float tensors as fp16."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"ferkit": json.dumps(meta)})
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("ferkit", "{}"))


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path` (default: the shipped one) in eval mode; returns (model, meta).

    The model comes back in channels_last memory format: oneDNN (CPU) and cuDNN run convolutions faster on it
    (ferkit_vgg_s inference on a 2-core AVX-512 CPU: 1.5x fp32, 2.4x with bf16 autocast); the function and the
    state dict are unchanged.
    """
    path = resolve_weights(path or None)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    meta = read_metadata(path)
    if meta.get("ensemble"):  # a saved ensemble (ferkit.ensembles.artifact) loads as one model
        from ferkit.ensembles.artifact import load_ensemble

        return load_ensemble(path, device)
    if "model" not in meta:
        raise ValueError(f"{path} has no ferkit metadata (was it written by ferkit?)")
    model = create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("model_kwargs", {}))
    state = load_file(str(path))
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtypes.get(k, v.dtype)) for k, v in state.items()})
    return model.to(device, memory_format=torch.channels_last).eval(), meta
