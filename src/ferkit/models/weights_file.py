"""One ferkit .safetensors file, read, checked and written: the helpers that single models (`ferkit.models.weights`)
and saved ensembles (`ferkit.models.ensemble`) share.

They live in their own module so that both of those can import them and `weights.load_model` can still hand an
ensemble file to `ensemble.load_ensemble` without a circle between the two modules (the public names stay
importable from `ferkit.models.weights` too).

A file holds tensors plus JSON metadata under the "ferkit" key. Nothing read from a file is trusted:
`check_metadata` bounds every size and checks the class names, `build_model` builds the model on the meta device
first so a forged size cannot allocate more than the file's own tensors, `read_tensors` refuses NaN/infinite
tensors and verifies `tensors_sha256` (a digest of the tensors, recorded by `write_safetensors`; files written
before it existed have none and load unverified), and `check_forward` runs one blank face through the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write tensors and ferkit metadata atomically, recording the tensors' digest (replacing any in `meta`,
    which may come from another file). allow_nan=False: JSON with NaN in it is not JSON."""
    meta = {**meta, DIGEST_KEY: tensors_sha256(state)}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata={"ferkit": json.dumps(meta, allow_nan=False)})


def _unreadable(path: str | os.PathLike, error: Exception) -> WeightsError:
    """A file safetensors cannot parse (truncated, empty, not safetensors at all): its own error type, which
    callers catching ValueError would miss, becomes a WeightsError naming the file."""
    return WeightsError(f"{path}: not a readable .safetensors weights file ({error})")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ferkit", "{}"))
    except SafetensorError as e:
        raise _unreadable(path, e) from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: the ferkit metadata is not JSON ({e})") from e
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
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise _unreadable(path, e) from e
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
