"""Classify faces with ONNX Runtime: the `backend="onnx"` of `Recognizer`.

`OnnxClassifier(path)` wraps an InferenceSession over a file written by `ferkit.export.export_onnx` (input
(B, 1, S, S) preprocessed faces, output probabilities, ferkit metadata inside). Preprocessing and
test-time augmentation are the same torch code as the PyTorch backend (`ferkit.models.predict`), so the two
backends differ only in who runs the network. `cached_export(weights)` exports a weights file once into
the cache directory (``$FERKIT_CACHE/onnx``, else ``~/.cache/ferkit/onnx``), keyed by the file's SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferkit.data.augment import FER2013_MEAN, FER2013_STD
from ferkit.export import (
    DEFAULT_OPSET,
    EXPORT_REVISION,
    MEMBER_OUTPUT_NAME,
    _require,
    export_onnx,
    installed,
    metadata_from_session,
    onnx_session,
    resolve_exporter,
)
from ferkit.models.ensemble_weights import EnsembleWeights, apply_ensemble  # numpy only (ferkit.ensembles: ~0.5 s)


def onnx_backend_installed() -> bool:
    """True when onnxruntime (to run) and onnx (to export) are installed; looked up without importing them
    (importing onnx takes ~1 s, onnxruntime is imported only when a session is made)."""
    return installed("onnxruntime") and installed("onnx")


def onnx_cache_dir() -> Path:
    from ferkit.data.fer2013 import default_cache_dir

    return default_cache_dir() / "onnx"


def cached_export(weights: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ONNX export of `weights` (a .safetensors model or ensemble), made on first use and reused after."""
    from ferkit import __version__
    from ferkit.data import file_sha256

    weights = Path(weights)
    kind = resolve_exporter("auto")
    key = f"{file_sha256(weights)[:32]}-ferkit{__version__}-opset{DEFAULT_OPSET}-r{EXPORT_REVISION}-{kind}"
    path = Path(cache_dir or onnx_cache_dir()) / f"{weights.stem}-{key}.onnx"
    if not path.is_file():
        export_onnx(weights, path, exporter=kind)
    return path


SMALL_BATCH = 4  # batches up to this size may run on their own (single-thread) session, see OnnxClassifier


# FER2013's mean/std as float32 scalars, made once: at batch 1 the whole call takes ~150 us, so per-call
# imports and conversions show up in faces/s.
_SCALE, _MEAN, _STD = np.float32(255.0), np.float32(FER2013_MEAN), np.float32(FER2013_STD)


def _normalized(faces: np.ndarray) -> np.ndarray:
    """uint8 faces -> float32 normalized with FER2013's mean/std, as ferkit.data.augment does in torch."""
    x = faces.astype(np.float32) / _SCALE
    return (x - _MEAN) / _STD


def _best_time(session: Any, x: np.ndarray, input_name: str, runs: int = 5) -> float:
    import time

    session.run(None, {input_name: x})  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {input_name: x})
        best = min(best, time.perf_counter() - start)
    return best


class OnnxClassifier:
    """An ONNX Runtime session over a ferkit ONNX export; `meta` is the weights' metadata stored in the file.

    threads: intra-op threads (default: torch.get_num_threads(), so both backends use the same CPU share).
    device: "cpu", or "cuda" to use CUDAExecutionProvider when the installed onnxruntime has it.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        self._ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist")
        self.threads = int(threads or torch.get_num_threads())
        self.providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in self._ort.get_available_providers():
            self.providers.insert(0, "CUDAExecutionProvider")
        self.session = self._session(self.threads)
        self.meta = metadata_from_session(self.session, str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0]
        # A saved ensemble's export also gives its members' probabilities (M, B, C): under a multi-view TTA they
        # are averaged over the views and then combined, as the ensemble was fitted (see _probs_over_views).
        self.member_output = MEMBER_OUTPUT_NAME if MEMBER_OUTPUT_NAME in outputs else None
        self.ensemble_weights: EnsembleWeights | None = None
        if self.meta.get("ensemble"):
            self.ensemble_weights = EnsembleWeights.from_json(self.meta["weights"])
        # Small batches of a small network are faster on one thread (waking workers costs more than they
        # save); which one wins depends on the network, so the first small batch measures both (see _small).
        self._small_session: Any = None

    def _session(self, threads: int) -> Any:
        return onnx_session(self.path, threads, self.providers)  # workers wait passively: see onnx_session

    def _small(self, x: np.ndarray) -> Any:
        """The session for batches up to SMALL_BATCH: the faster of one thread and `threads` threads, timed
        once on the first such batch (best of a few runs each; only speed differs, not the results)."""
        if self._small_session is None:
            if self.threads == 1 or self.providers[0] != "CPUExecutionProvider":
                self._small_session = self.session
            else:
                single = self._session(1)
                self._small_session = min((self.session, single), key=lambda s: _best_time(s, x, self.input_name))
        return self._small_session

    def run(self, x: np.ndarray | torch.Tensor, output: str | None = None) -> np.ndarray:
        """(B, C) float32 probabilities for preprocessed faces (B, 1, S, S) (or the graph's output `output`)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        session = self._small(x) if len(x) <= SMALL_BATCH else self.session
        return session.run([output or self.output_name], {self.input_name: x})[0].astype(np.float32, copy=False)

    def _probs_over_views(self, x: np.ndarray, views: int) -> np.ndarray:
        """(B, C) probabilities of `views` TTA views of B faces, view-major (V*B, 1, S, S), averaged over the
        views; a saved ensemble averages each member over the views and then combines (the ONNX twin of
        EnsembleModel.probs_over_views)."""
        ensemble = self.ensemble_weights
        if views == 1 or ensemble is None or (self.member_output is None and
                                              ensemble.combiner in ("mean", "accuracy_weighted")):
            probs = self.run(x)  # for linear combiners, averaging combined views is the same
            return probs.reshape(views, -1, probs.shape[-1]).mean(0) if views > 1 else probs
        if self.member_output is None:
            raise ValueError(f"{self.path} is an ensemble exported by an older ferkit, without its members' "
                             f"outputs; re-export it (ferkit export) to run its {ensemble.combiner} combiner under a "
                             "multi-view TTA, or use the torch backend")
        members = self.run(x, self.member_output)
        members = members.reshape(members.shape[0], views, -1, members.shape[-1]).mean(1)
        return apply_ensemble(ensemble, members).astype(np.float32)

    def _run_views(self, x: np.ndarray, tta: str) -> np.ndarray:
        """Probabilities of normalized faces (B, 1, S, S); "flip" averages them with their mirror images, run in
        the same batch (one session call instead of two)."""
        if tta == "none":
            return self.run(x)
        return self._probs_over_views(np.concatenate([x, x[..., ::-1]]), 2)

    def predict_proba(self, images: Any, *, input_size: int, norm: str = "dataset", tta: str = "none",
                      batch_size: int = 256) -> np.ndarray:
        """(N, C) float32 probabilities for uint8 faces (N, H, W); the ONNX twin of models.predict.predict_proba."""
        from ferkit.models.predict import CROP_MODES, TTA_MODES, preprocess, tencrop_source_size, tta_views

        if tta not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {tta!r}; choose one of {TTA_MODES}")
        if tta in ("none", "flip") and norm == "dataset" and np.shape(images)[1:] == (input_size, input_size):
            # The common case (48x48 faces, no TTA or flip) in NumPy: the same float32 operations as
            # preprocess(), without a round trip through torch tensors (a third of the time of one face).
            images = np.asarray(images)
            if 0 < len(images) <= batch_size:  # one batch (one face per call is common): no list, no concatenate
                return self._run_views(_normalized(images)[:, None], tta)
            out = [self._run_views(_normalized(images[i:i + batch_size])[:, None], tta)
                   for i in range(0, len(images), batch_size)]
            return np.concatenate(out) if out else np.zeros((0, len(self.meta.get("classes") or [])), np.float32)
        images = torch.as_tensor(images)
        prep_size = tencrop_source_size(input_size) if tta in CROP_MODES else input_size
        out = []
        for i in range(0, len(images), batch_size):
            x = preprocess(images[i:i + batch_size], prep_size, norm)
            views = tta_views(x, tta, input_size)
            out.append(self._probs_over_views(views.flatten(0, 1).contiguous().numpy(), len(views)))
        if not out:
            return np.zeros((0, len(self.meta.get("classes") or [])), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)
