"""Save and load trained weights safely: safetensors (no pickle, no code execution) + JSON metadata.

A weights file carries what is needed to use it: the registry name, number of classes, label set,
input size and normalization, so `load_model(path)` rebuilds the exact model with no other input.

Nothing read from a file is trusted: `load_model` checks the metadata (every size within bounds, class names
unique and as many as the head's outputs), builds the model on the meta device first so a forged size cannot
allocate more than the file's own tensors, refuses NaN/infinite tensors, and verifies `tensors_sha256` (a digest
of the tensors, recorded by `save_weights`; files written before it existed have none and load unverified).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ferkit.models.registry import create_model
from ferkit.shared_files import replacing

# Bounds on sizes read from a file's metadata: far above any FER model, far below what could exhaust memory
# (predict allocates batch x input_size^2 floats per view).
MAX_CLASSES = 1000
INPUT_SIZE_RANGE = (8, 256)
MAX_KWARG_INT = 1 << 16
MAX_KWARG_LIST = 64
DIGEST_KEY = "tensors_sha256"

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


class WeightsError(ValueError):
    """A weights file that must not be used: inconsistent or out-of-bounds metadata, bad or tampered tensors.
    The message names the file and the field or tensor."""


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict: every tensor's name, dtype, shape and bytes, in name order (so the same
    tensors give the same digest whatever order they were saved in)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any], half: bool = False) -> None:
    """Write `model`'s state dict and `meta` atomically. `half=True` stores float tensors as fp16."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    write_safetensors(state, path, meta)


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write tensors and ferkit metadata atomically, recording the tensors' digest (replacing any in `meta`,
    which may come from another file). allow_nan=False: JSON with NaN in it is not JSON."""
    meta = {**meta, DIGEST_KEY: tensors_sha256(state)}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata={"ferkit": json.dumps(meta, allow_nan=False)})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("ferkit", "{}"))
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: the ferkit metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def tensor_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Each tensor's shape from the file's header, without reading the tensors."""
    with safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _bad(source: Any, field: str, value: Any, expected: str) -> WeightsError:
    return WeightsError(f"{source}: metadata field {field!r} is {value!r}; expected {expected}")


def _bounded_int(meta: Mapping[str, Any], field: str, lo: int, hi: int, source: Any) -> int:
    value = meta[field]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(source, field, value, f"an integer in {lo}..{hi}")
    return value


def _check_kwarg(value: Any, field: str, source: Any, depth: int = 0) -> None:
    """model_kwargs hold flags, sizes, rates and names (and lists of them); every number is bounded."""
    if value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 100):
        return
    if isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= MAX_KWARG_INT:
        return
    if isinstance(value, list) and depth == 0 and len(value) <= MAX_KWARG_LIST:
        for v in value:
            _check_kwarg(v, field, source, depth + 1)
        return
    raise _bad(source, field, value, f"a flag, a finite number within +-{MAX_KWARG_INT}, a short name, or a list "
                                     f"of at most {MAX_KWARG_LIST} of those")


def check_metadata(meta: Mapping[str, Any], source: Any) -> None:
    """Refuse metadata that is inconsistent or would drive oversized allocations (WeightsError naming `source`
    and the field). Checks what is present: num_classes, classes, input_size, normalize, tta, class_prior,
    model_kwargs."""
    from ferkit.data.augment import NORMALIZATIONS
    from ferkit.models.predict import TTA_MODES

    if "num_classes" in meta:
        _bounded_int(meta, "num_classes", 2, MAX_CLASSES, source)
    if "classes" in meta:
        classes = meta["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes):
            raise _bad(source, "classes", classes, "a list of class names")
        duplicates = sorted({c for c in classes if classes.count(c) > 1})
        if duplicates:
            raise WeightsError(f"{source}: metadata field 'classes' names {', '.join(map(repr, duplicates))} "
                               "more than once")
        if "num_classes" in meta and len(classes) != meta["num_classes"]:
            raise WeightsError(f"{source}: metadata lists {len(classes)} class names for num_classes "
                               f"{meta['num_classes']}")
    if "input_size" in meta:
        _bounded_int(meta, "input_size", *INPUT_SIZE_RANGE, source)
    if "normalize" in meta and meta["normalize"] not in NORMALIZATIONS:
        raise _bad(source, "normalize", meta["normalize"], f"one of {', '.join(NORMALIZATIONS)}")
    if meta.get("tta") is not None and meta["tta"] not in TTA_MODES:
        raise _bad(source, "tta", meta["tta"], f"one of {', '.join(TTA_MODES)}")
    if meta.get("class_prior") is not None:
        prior = meta["class_prior"]
        n = len(meta.get("classes") or []) or meta.get("num_classes")
        if not (isinstance(prior, list) and len(prior) == n and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in prior)):
            raise _bad(source, "class_prior", prior, f"{n} positive finite class frequencies")
    kwargs = meta.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise _bad(source, "model_kwargs", kwargs, "an object")
    for key, value in kwargs.items():
        _check_kwarg(value, f"model_kwargs.{key}", source)


def build_model(meta: Mapping[str, Any], shapes: Mapping[str, list[int]], source: Any) -> nn.Module:
    """The (freshly initialized) model `meta` describes, built only after checking on the meta device (no
    memory) that its tensors have exactly the file's names and shapes (`shapes`): so the head has num_classes
    outputs, and no size in the metadata can make this allocate more than the file itself holds."""
    if not isinstance(meta.get("model"), str):
        raise WeightsError(f"{source} has no ferkit metadata (was it written by ferkit?)")
    kwargs = dict(meta.get("model_kwargs") or {})

    def create() -> nn.Module:
        try:
            return create_model(meta["model"], num_classes=meta.get("num_classes"), **kwargs)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{source}: cannot build {meta['model']!r} from its metadata: {e}") from e

    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in create().state_dict().items()}
    if expected != dict(shapes):
        raise WeightsError(f"{source}: the tensors do not fit the {meta['model']!r} model its metadata describes "
                           f"(num_classes {meta.get('num_classes')}, model_kwargs {kwargs}): "
                           f"{_first_difference(expected, shapes)}")
    return create()


def _first_difference(expected: Mapping[str, list[int]], found: Mapping[str, list[int]]) -> str:
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            return f"tensor {name} is missing"
        if name not in expected:
            return f"tensor {name} is not part of that model"
        if expected[name] != found[name]:
            return f"tensor {name} has shape {found[name]}, the model needs {expected[name]}"
    return "no difference"


def check_forward(model: nn.Module, meta: Mapping[str, Any], source: Any) -> None:
    """Run one blank face through `model` at the metadata's input_size: a size the architecture cannot take,
    or a head that does not output num_classes scores, fails here, at load, not on every file of a batch."""
    size = int(meta.get("input_size") or getattr(model, "input_size", 48))
    device = next(iter(model.parameters())).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 1, size, size, device=device))
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"{source}: the model cannot run on input_size {size} faces: {e}") from e
    if out.shape != (1, meta.get("num_classes", out.shape[-1])):
        raise WeightsError(f"{source}: the model outputs {tuple(out.shape)} scores per face, the metadata says "
                           f"num_classes {meta.get('num_classes')}")


def read_tensors(path: str | os.PathLike, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The file's tensors, refusing NaN/infinite values and, when the metadata records `tensors_sha256`, any
    tensor that differs from what was saved."""
    state = load_file(str(path))
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise WeightsError(f"{path}: tensor {name} holds NaN or infinite values")
    recorded = meta.get(DIGEST_KEY)
    if recorded is not None and recorded != tensors_sha256(state):
        raise WeightsError(f"{path}: the tensors do not match the {DIGEST_KEY} its metadata records (the file "
                           "was modified or corrupted after it was saved)")
    return state


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy `state` into `model`, cast to the model's dtypes (shipped files store fp16)."""
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtypes.get(k, v.dtype)) for k, v in state.items()})
    return model


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored at `path` (default: the shipped one) in eval mode; returns (model, meta).

    The model comes back in channels_last memory format: oneDNN (CPU) and cuDNN run convolutions faster on it
    (ferkit_vgg_s inference on a 2-core AVX-512 CPU: 1.5x fp32, 2.4x with bf16 autocast); the function and the
    state dict are unchanged.
    """
    path = find_weights(path or None)
    meta = read_metadata(path)
    if meta.get("ensemble"):  # a saved ensemble (ferkit.ensembles.artifact) loads as one model
        from ferkit.ensembles.artifact import load_ensemble

        return load_ensemble(path, device)
    if "model" not in meta:
        raise WeightsError(f"{path} has no ferkit metadata (was it written by ferkit?)")
    check_metadata(meta, path)
    model = build_model(meta, tensor_shapes(path), path)
    load_state(model, read_tensors(path, meta))
    model = model.to(device, memory_format=torch.channels_last).eval()
    check_forward(model, meta, path)
    return model, meta
