"""Start training from weights a user brings: a timm or torchvision state dict (`init_weights=FILE`).

The file is a state dict saved as safetensors, or as a PyTorch `.pth`/`.pt`/`.bin` read with
`torch.load(weights_only=True)` (plain tensors only: a pickle that would build Python objects is refused, as it
could run code). A checkpoint that wraps its state dict (`{"state_dict": ...}`, `{"model": ...}`) is unwrapped,
and a DistributedDataParallel `module.` prefix is dropped. The tensors are matched to the model by name:

- same name and shape: loaded;
- an RGB convolution kernel (out, 3, k, k) where the model takes grayscale (out, 1, k, k): summed over the colour
  axis (a gray face x gives the RGB stem (x, x, x), whose response is the summed kernel's): reshaped;
- the classifier head (timm's `pretrained_cfg["classifier"]`, else the model's last linear layer): always left at
  its fresh initialization, as the file's classes are not the faces' emotions: replaced;
- tensors of the file that the model lacks (another head, auxiliary layers): skipped.

Anything else is an error naming the tensor: a tensor of the model's backbone missing from the file, or one whose
shape differs (weights for another architecture or size), NaN or infinite values, an empty or unreadable file.
`LoadReport` lists what went where; training prints its summary and the manifest records it.

Weights written by ferkit itself (`ferkit train`) are not foreign: they load as before (same model, classes).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")


class PretrainedError(ValueError):
    """A user's weights file that cannot start this model; the message names the file and the tensor."""


@dataclass
class LoadReport:
    """What `load_pretrained` did with each tensor."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)  # RGB kernels summed to grayscale
    replaced: list[str] = field(default_factory=list)  # the model's head, freshly initialized
    skipped: list[str] = field(default_factory=list)  # the file's tensors the model has no place for
    kept: list[str] = field(default_factory=list)  # model buffers the file lacks (e.g. num_batches_tracked)

    def summary(self) -> str:
        def some(names: list[str]) -> str:
            return (": " + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")) if names else ""

        return (f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.reshaped)} reshaped (RGB -> gray)"
                f"{some(self.reshaped)}; head replaced{some(self.replaced)}; {len(self.skipped)} skipped"
                f"{some(self.skipped)}" + (f"; {len(self.kept)} kept at init{some(self.kept)}" if self.kept else ""))

    def to_json(self) -> dict[str, Any]:
        return {"loaded": len(self.loaded), "reshaped": self.reshaped, "replaced": self.replaced,
                "skipped": self.skipped, "kept": self.kept}


def is_ferkit_weights(path: str | os.PathLike) -> bool:
    """Whether `path` is a weights file written by ferkit (safetensors with ferkit metadata naming a model)."""
    from ferkit.models.weights import read_metadata

    if Path(path).suffix != ".safetensors":
        return False
    try:
        return isinstance(read_metadata(path).get("model"), str)
    except Exception:  # not readable as safetensors: read_state_dict says why
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a user's state dict file (PretrainedError naming the file when it cannot be one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights {path}: no such file")
    if path.stat().st_size == 0:
        raise PretrainedError(f"init_weights {path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise PretrainedError(f"init_weights {path}: not a readable safetensors file ({e})") from e
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses a pickled Python object by naming its class ("Unsupported global: GLOBAL ...");
            # other unpickling errors are files that are not torch.save output at all.
            refused = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
            if not refused:
                raise PretrainedError(f"init_weights {path}: not a readable PyTorch weights file ("
                                      f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]})") from e
            raise PretrainedError(
                f"init_weights {path}: refused, torch.load(weights_only=True) will not unpickle it: it stores Python "
                f"objects, which could run code ({refused[0]}). Save only the state dict "
                "(torch.save(model.state_dict(), FILE)) or convert it to .safetensors") from e
        except Exception as e:  # truncated zip, not a torch file at all, ...
            raise PretrainedError(f"init_weights {path}: not a readable PyTorch weights file "
                                  f"({type(e).__name__}: {e})") from e
    state = _unwrap(raw, path)
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PretrainedError(f"init_weights {path}: tensor {name} holds NaN or infinite values")
    return state


def _unwrap(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what torch.load returned: itself, or under a usual checkpoint key."""
    if isinstance(raw, Mapping) and raw and not all(isinstance(v, torch.Tensor) for v in raw.values()):
        for key in WRAPPER_KEYS:
            inner = raw.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                raw = inner
                break
    if not isinstance(raw, Mapping) or not raw:
        raise PretrainedError(f"init_weights {path}: holds no state dict (a mapping of tensor names to tensors), "
                              f"but {'an empty one' if isinstance(raw, Mapping) else type(raw).__name__}")
    if bad := [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]:
        raise PretrainedError(f"init_weights {path}: entry {bad[0]!r} is a {type(raw[bad[0]]).__name__}, not a "
                              f"tensor (keys: {', '.join(list(map(str, raw))[:6])})")
    state = {str(k): v for k, v in raw.items()}
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def head_tensor_names(model: nn.Module) -> list[str]:
    """The state-dict names of the model's classifier: timm's pretrained_cfg 'classifier' module(s), else the
    last nn.Linear (the last nn.Conv2d for an all-convolutional model)."""
    model = getattr(model, "module", model)
    names = list(model.state_dict())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if classifier:
        prefixes = [classifier] if isinstance(classifier, str) else list(classifier)
        found = [n for n in names if any(n.startswith(p + ".") for p in prefixes)]
        if found:
            return found
    for kind in (nn.Linear, nn.Conv2d):
        last = [m for m, mod in model.named_modules() if isinstance(mod, kind)]
        if last:
            return [n for n in names if n.rpartition(".")[0] == last[-1]]
    return []


def map_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                   source: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors of `state` to load into `model` (cast to its dtypes) and the report; PretrainedError when the
    file does not fit the model's backbone. Works on a model on the meta device (a check before training)."""
    target = model.state_dict()
    head = set(head_tensor_names(model))
    report = LoadReport(source)
    out: dict[str, torch.Tensor] = {}
    wrong, missing = [], []
    for name, t in target.items():
        if name in head:
            report.replaced.append(name)
            continue
        if name not in state:
            (report.kept if name.endswith("num_batches_tracked") else missing).append(name)
            continue
        src = state[name]
        if list(src.shape) == list(t.shape):
            report.loaded.append(name)
        elif (src.ndim == 4 and t.ndim == 4 and src.shape[1] == 3 and t.shape[1] == 1
              and src.shape[0] == t.shape[0] and src.shape[2:] == t.shape[2:]):
            src = src.sum(dim=1, keepdim=True)
            report.reshaped.append(name)
        else:
            wrong.append(f"{name} is {list(src.shape)} in the file, {list(t.shape)} in the model")
            continue
        out[name] = src.to(t.dtype) if t.is_floating_point() else src
    report.skipped = [k for k in state if k not in target]
    if not out:
        raise PretrainedError(f"init_weights {source}: none of its {len(state)} tensors fits this model "
                              f"(file: {', '.join(list(state)[:3])} ...; model: {', '.join(list(target)[:3])} ...): "
                              "weights for another architecture?")
    if wrong:
        raise PretrainedError(f"init_weights {source}: {len(wrong)} tensors do not fit this model's shapes "
                              f"(another architecture, width or input channels?): {'; '.join(wrong[:4])}")
    if missing:
        raise PretrainedError(f"init_weights {source}: the file lacks {len(missing)} of the model's tensors "
                              f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): weights for "
                              "another architecture or depth?")
    return out, report


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Copy a user's state dict into `model` (see the module's docstring); the head keeps its initialization."""
    mapped, report = map_state_dict(model, read_state_dict(path), str(path))
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)
    return report


def check_pretrained(model_factory: Any, path: str | os.PathLike) -> LoadReport:
    """Everything `load_pretrained` checks, on a model built by `model_factory()` on the meta device (no memory
    for the model): for checking a run's init_weights before it starts."""
    state = read_state_dict(path)
    with torch.device("meta"):
        model = model_factory()
    return map_state_dict(model, state, str(path))[1]
