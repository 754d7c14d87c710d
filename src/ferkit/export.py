"""Export a ferkit model (or a saved ensemble) to ONNX, with ferkit's metadata inside the file.

    >>> from ferkit.export import export_onnx, read_onnx_metadata
    >>> export_onnx("runs/x/best.safetensors", "model.onnx")
    >>> read_onnx_metadata("model.onnx")["classes"]
    ['angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral']

The exported graph is the classifier only (no face detection, no preprocessing):

* input ``input``: float32 (B, 1, S, S) faces, already preprocessed exactly as ferkit does it
  (`ferkit.models.predict.preprocess`: uint8 / 255, resized to S = ``input_size``, then normalized as
  ``normalize`` says: "dataset" = (x - 0.5077) / 0.2550, "per_image" = zero mean and unit std per face,
  "none" = as is). The batch axis B is dynamic.
* output ``probabilities``: float32 (B, C) class probabilities (softmax applied inside the graph; for an
  ensemble, its combined probabilities). An ensemble has a second output, ``member_probabilities``: float32
  (M, B, C), each member's probabilities, so a multi-view TTA can average every member over the views before
  combining them, as the ensemble was fitted (`ferkit.inference.onnx_backend` does).
* metadata_props: ``ferkit`` (the weights' full metadata as JSON), ``classes`` (JSON list), ``input_size``,
  ``normalize``, ``num_classes``, ``model``, ``label_set``, ``ferkit_version``, ``source_sha256`` (of the
  weights file), ``exporter``, ``input_name``, ``output_name``, ``preprocessing`` (the recipe above, in words).

Exporter: torch 2.13's `torch.onnx.export` defaults to the torch.export-based ("dynamo") exporter, which
needs `onnxscript`; the TorchScript-based ("legacy") exporter works without it but is deprecated. ferkit
uses the dynamo exporter when onnxscript is importable (a ferkit dependency, like onnx and onnxruntime) and the
legacy one otherwise, or when torch.export cannot trace the model (``exporter="auto"``; e.g. `tan_pca`,
whose forward branches on a buffer's value); the ``exporter`` metadata says which ran. Every export is run
with ONNX Runtime at batch sizes 1 and 3 before it is written (``verify``): the dynamo exporter matched
PyTorch to <= 1.2e-7 on every registry model but `tan_pca` and on ensembles with each combiner; a fitted
`tan_pca` is refused (the TorchScript tracer bakes its `len(x)` to the example batch). See docs/detection.md.

Layering: export sits below `ferkit.inference`, whose ONNX backend (`ferkit.inference.onnx_backend.OnnxClassifier`)
uses this module's export, names and `onnx_session`; so export opens its own ONNX Runtime sessions to verify and
read files and never imports inference.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ferkit.data import file_sha256
from ferkit.data.fer2013 import IMAGE_SIDE

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
MEMBER_OUTPUT_NAME = "member_probabilities"  # ensembles only
DEFAULT_OPSET = 18
# Bumped when the exported graph of the same weights changes (2: contiguous weights, native strided 1x1 convs),
# so cached exports (ferkit.inference.onnx_backend.cached_export) made by older code are not reused.
# 3: ensembles add the member_probabilities output.
EXPORT_REVISION = 3
EXPORTERS = ("auto", "dynamo", "legacy")
PREPROCESSING = ("gray uint8 face / 255 -> float32 (B, 1, S, S), resized to input_size (bilinear, antialiased "
                 "when shrinking), normalized: dataset = (x - 0.5077) / 0.2550, per_image = (x - mean) / std "
                 "per face, none = unchanged")


class ProbabilityModel(nn.Module):
    """The exported graph: `model`'s softmax probabilities in float32; for an ensemble (an EnsembleModel), its
    combined probabilities and, as a second output, its members' (M, B, C)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.ensemble = hasattr(model, "probs_over_views")
        self.output_names = [OUTPUT_NAME, MEMBER_OUTPUT_NAME] if self.ensemble else [OUTPUT_NAME]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.ensemble:
            members = self.model.member_probs(x)
            return self.model.combine(members).float(), members.float()
        return self.model(x).float().softmax(-1)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The first output only: (B, C) probabilities."""
        out = self(x)
        return out[0] if self.ensemble else out


def onnx_available() -> bool:
    """True when both `onnx` and `onnxruntime` import (ferkit dependencies)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (None in sys.modules counts as absent)."""
    import sys
    from importlib.util import find_spec

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export/inference needs the `{module}` package (a ferkit dependency): "
                          "pip install onnx onnxruntime onnxscript") from e


def resolve_exporter(exporter: str = "auto") -> str:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    # Looked up, not imported: onnxscript takes seconds to import, and cached_export only needs the name for its
    # cache key (an export that is already cached then costs no onnx/onnxscript import at all).
    return "dynamo" if installed("onnxscript") else "legacy"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation / 'torchvision is not installed' chatter."""
    prefixes = ("torch", "onnxscript", "onnx_ir")
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in prefixes]
    loggers = [logging.getLogger(n) for n in {*names, *prefixes}]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # a failed torch.export attempt (we fall back) logs whole graphs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _load(source: Any, meta: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any], str | None]:
    from ferkit.models.weights import load_model

    if isinstance(source, nn.Module):
        if meta is None:
            raise ValueError("exporting a module needs its ferkit metadata (meta=...): classes, input_size, "
                             "normalize")
        return source, dict(meta), None
    if isinstance(source, tuple):
        model, m = source
        return model, dict(m), None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    model, m = load_model(path, "cpu")
    return model, m, file_sha256(path)


def export_onnx(source: Any, out: str | os.PathLike, *, meta: dict[str, Any] | None = None,
                opset: int = DEFAULT_OPSET, exporter: str = "auto", verify: bool = True) -> Path:
    """Write `source` (a .safetensors path of a model or a saved ensemble, a (model, meta) pair, or a module
    with `meta`) to `out` as ONNX (see the module docstring for inputs, outputs and metadata). Returns `out`.

    verify: before the file is put in place, run it with ONNX Runtime (when installed) at batch sizes 1 and 3
    against PyTorch; ValueError if it fails or differs by more than 1e-4 (e.g. a model whose forward bakes
    the example's batch size into the graph), and nothing is written.
    """
    import copy

    onnx = _require("onnx")
    from ferkit import __version__

    model, meta, sha = _load(source, meta)
    classes = list(meta.get("classes") or [])
    if not classes:
        raise ValueError("the model's metadata lists no class names")
    input_size = int(meta.get("input_size") or getattr(model, "input_size", IMAGE_SIDE))
    kind = resolve_exporter(exporter)
    # Export a CPU copy in eval mode (the caller's module is left as it was); ensembles keep their float64 combiner.
    # Contiguous (NCHW) weights: load_model returns channels_last modules, which the exporter would trace into
    # as_strided/Gather/Range ops around the head; ONNX Runtime picks its own CPU layout anyway.
    net = ProbabilityModel(copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, 1, input_size, input_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with _quiet(), torch.no_grad():
            if kind == "dynamo":
                try:
                    # a failed torch.export prints the whole graph to stderr (torch/export/_trace.py)
                    with contextlib.redirect_stderr(io.StringIO()):
                        _export(net, example, tmp, opset, dynamo=True)
                except Exception as e:  # torch.export cannot trace data-dependent Python control flow
                    if exporter != "auto":
                        raise
                    # e.g. tan_pca's `int(self.pca_k)`: the TorchScript tracer bakes the fitted value in
                    kind = "legacy (dynamo failed: " + type(e).__name__ + ")"
                    _export(net, example, tmp, opset, dynamo=False)
            else:
                _export(net, example, tmp, opset, dynamo=False)
        proto = onnx.load(str(tmp))
        props = {
            "ferkit": json.dumps(meta), "classes": json.dumps(classes), "input_size": str(input_size),
            "normalize": str(meta.get("normalize", "dataset")), "num_classes": str(len(classes)),
            "model": str(meta.get("model", "")), "label_set": str(meta.get("label_set") or ""),
            "ferkit_version": __version__, "source_sha256": sha or "", "exporter": kind,
            "torch_version": torch.__version__, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "preprocessing": PREPROCESSING,
        }
        del proto.metadata_props[:]
        for k, v in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.producer_name = "ferkit"
        proto.producer_version = __version__
        proto.doc_string = (f"ferkit {meta.get('model', 'model')}: faces (B, 1, {input_size}, {input_size}) -> "
                            f"probabilities over {classes}")
        onnx.save(proto, str(tmp))
        if verify:
            _verify(net, tmp, input_size, str(meta.get("model", "model")), kind)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return out


def _verify(net: ProbabilityModel, path: Path, input_size: int, name: str, kind: str, tol: float = 1e-4) -> None:
    try:
        session = onnx_session(path)
    except ImportError:  # no onnxruntime: nothing to check with
        return
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 1, input_size, input_size, generator=g)
        with torch.no_grad():
            refs = net(x)
        for output, ref in zip(net.output_names, refs if net.ensemble else (refs,), strict=True):
            try:
                got = run_session(session, x.numpy(), output)
            except Exception as e:  # onnxruntime raises its own error types
                raise ValueError(f"the ONNX export of {name} ({kind} exporter) fails at batch size {batch}: "
                                 f"{str(e).splitlines()[0][:300]}") from e
            diff = float(np.abs(got - ref.numpy()).max()) if got.shape == ref.shape else float("inf")
            if not diff <= tol:
                raise ValueError(f"the ONNX export of {name} ({kind} exporter) differs from PyTorch at batch size "
                                 f"{batch} in {output}: max |probability difference| {diff:.2e} > {tol:g}")


def _export(net: ProbabilityModel, example: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    names = net.output_names
    if dynamo:
        _require("onnxscript")
        torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                          external_data=False, opset_version=opset, verbose=False)
    else:
        # the batch is axis 0 of the probabilities, axis 1 of the members' (M, B, C)
        axes = {name: {int(name == MEMBER_OUTPUT_NAME): "batch"} for name in names}
        torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **axes}, dynamo=False, opset_version=opset)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """ferkit's metadata of an exported file: the original weights metadata (`ferkit` prop) plus the export
    facts (`exporter`, `source_sha256`, ...). Needs only onnxruntime."""
    return metadata_from_session(onnx_session(path), str(path))


def onnx_session(path: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An ONNX Runtime InferenceSession over the file at `path` (FileNotFoundError if there is none).

    threads: intra-op threads (default: torch.get_num_threads(), the CPU share ferkit gives torch). Worker threads
    wait passively between runs: spinning ones would compete for the cores with whatever runs next (e.g. the
    PyTorch face detector)."""
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # errors arrive as exceptions; no duplicate log lines
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def run_session(session: Any, x: np.ndarray, output: str | None = None) -> np.ndarray:
    """The graph's output `output` (default: its first, the probabilities) for preprocessed faces x (B, 1, S, S)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    name = output or session.get_outputs()[0].name
    return session.run([name], {session.get_inputs()[0].name: x})[0]


def metadata_from_session(session: Any, name: str = "<onnx>") -> dict[str, Any]:
    props = dict(session.get_modelmeta().custom_metadata_map)
    if "ferkit" not in props:
        raise ValueError(f"{name} has no ferkit metadata (was it written by `ferkit export`?)")
    meta = json.loads(props["ferkit"])
    meta["classes"] = json.loads(props.get("classes", json.dumps(meta.get("classes") or [])))
    meta["input_size"] = int(props.get("input_size", meta.get("input_size", 48)))
    meta["normalize"] = props.get("normalize", meta.get("normalize", "dataset"))
    meta["onnx"] = {k: v for k, v in props.items() if k not in ("ferkit", "classes")}
    return meta


def check_parity(model: nn.Module, onnx_path: str | os.PathLike, input_size: int, n: int = 16,
                 seed: int = 0) -> float:
    """Max |probability difference| between `model` (fp32 PyTorch) and the ONNX file on `n` random faces."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, input_size, input_size, generator=g)
    with torch.no_grad():
        ref = ProbabilityModel(model).eval().probabilities(x.to(next(model.parameters()).device)).cpu().numpy()
    got = run_session(onnx_session(onnx_path), x.numpy())
    return float(np.abs(got - ref).max())
