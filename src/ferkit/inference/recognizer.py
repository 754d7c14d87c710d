"""`Recognizer`: find faces in a photo and read their emotions with a ferkit model.

    >>> from ferkit import Recognizer
    >>> rec = Recognizer()                          # shipped model, RetinaFace detector, CPU or CUDA
    >>> rec.detect_emotions("group_photo.jpg")
    [{'box': [412, 96, 88, 110], 'emotions': {'angry': 0.01, ..., 'happy': 0.93, ...},
      'dominant': 'happy', 'face_score': 0.999}, ...]
    >>> rec.classify_faces(face_crop)               # already-cropped face(s): no detection
    {'emotions': {...}, 'dominant': 'neutral'}
    >>> Recognizer(backend="torch")                 # classify in PyTorch (default "auto": ONNX Runtime on CPU)
    >>> Recognizer(threads=1)                       # CPU threads (default: the CPUs this process may use)
    >>> Recognizer(model="model.onnx")              # a `ferkit export --format onnx` file (ONNX Runtime)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferkit.inference.detect import Detection, FaceDetector, get_detector
from ferkit.inference.faces import FER_SIZE, crop_face, to_face_array
from ferkit.inference.image_io import ImageError, load_image

BACKENDS = ("auto", "torch", "onnx")


def resolve_backend(backend: str, device: torch.device, precision: str = "fp32") -> str:
    """"auto" -> "onnx" on CPU in fp32 when ONNX Runtime and onnx (to export) are installed, else "torch";
    "torch" and "onnx" as given. ONNX Runtime classifies a face one at a time ~10x faster than PyTorch on CPU
    with the same probabilities (benchmarks/inference_speed.py); on CUDA, or in bf16/fp16, PyTorch runs it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from ferkit.inference.onnx_backend import onnx_backend_installed

    if device.type == "cpu" and precision == "fp32" and onnx_backend_installed():
        return "onnx"
    return "torch"


def resolve_tta(tta: bool | str | None) -> str:
    """False / None / "none" -> "none"; True / "flip" -> "flip"; "auto" or a mode of TTA_MODES by its name."""
    from ferkit.models.predict import TTA_CHOICES

    if tta is None or tta is False:
        return "none"
    if tta is True:
        return "flip"
    if isinstance(tta, str) and tta.lower() in TTA_CHOICES:
        return tta.lower()
    raise ValueError(f"unknown tta {tta!r}; use False, True (flip) or one of {', '.join(repr(m) for m in TTA_CHOICES)}")


def resolve_model(model: Any = "default", weights: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict, Path]:
    """(model, meta, weights path) from a shipped model's name (SHIPPED_MODELS), a .safetensors path, or a
    registry name + weights."""
    from ferkit.models.registry import list_models
    from ferkit.models.weights import SHIPPED_MODELS, load_model, resolve_weights, shipped_weights_path

    if isinstance(model, torch.nn.Module):
        raise TypeError("pass a weights file (or 'default'), not a module: the file's metadata says how to "
                        "preprocess faces and name the classes")
    if model is None or (isinstance(model, str) and model in SHIPPED_MODELS):
        path = Path(weights) if weights is not None else shipped_weights_path(model or "default")
        if weights is None and not path.is_file():
            raise FileNotFoundError(f"the shipped {model or 'default'!r} weights {path} are not installed; pass a "
                                    "weights file, e.g. Recognizer(model='runs/<name>/best.safetensors')")
        return (*load_model(path, device), path)
    if isinstance(model, os.PathLike) or (isinstance(model, str) and (model.endswith(".safetensors")
                                                                       or os.sep in model or Path(model).exists())):
        if weights is not None:
            raise ValueError("give either a weights path as `model` or `weights`, not both")
        path = resolve_weights(model)  # a run directory -> its best.safetensors
        return (*load_model(path, device), path)
    if isinstance(model, str) and model in list_models():
        if weights is None:
            raise ValueError(f"model {model!r} is a registry name; also pass weights= (a .safetensors file "
                             "trained for it), or use model='default'")
        net, meta = load_model(weights, device)
        if meta.get("model") != model:
            raise ValueError(f"{weights} holds a {meta.get('model')!r} model, not {model!r}")
        return net, meta, Path(weights)
    raise ValueError(f"model {model!r} is neither a shipped model ({', '.join(SHIPPED_MODELS)}), a .safetensors "
                     "file nor a registry model name")


class Recognizer:
    """Detect faces and classify their expressions.

    model: the name of a model shipped with ferkit ("default", the most accurate; see
        ``ferkit.models.weights.SHIPPED_MODELS``), a path to a .safetensors file written by ferkit, or a
        registry model name together with ``weights=PATH``.
    detector: "retinaface" (CNN, default), "haar" (OpenCV cascade, classical), "none" (the image is the face),
        or an object with ``.detect(rgb_image) -> list[Detection]``.
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    tta: test-time augmentation: "auto" (default: the view the weights were selected on, the centre crop for
        models trained on 40-pixel crops of 48-pixel faces such as khaireddin_vgg, else the whole face), False
        ("none"), True (= "flip": average with the mirrored face), "tencrop", "center" or "shift" (the face and
        four 2-pixel translations); see ferkit.models.predict.TTA_MODES.
    min_face_score: drop detections less confident than this (on top of the detector's own threshold).
    align: align faces on their landmarks when the detector gives them (see ferkit.inference.faces).
    precision: "fp32" (default, reproducible), "auto", "bf16" or "fp16" autocast for the emotion model.
    backend: "auto" (default): "onnx" on CPU in fp32 when ONNX Runtime is installed (it is a dependency), else
        "torch" (on CUDA, for bf16/fp16, or for a model that does not export: the reason is in
        `self.backend_note`); "torch" runs the emotion model in PyTorch; "onnx" runs it in ONNX Runtime (fp32),
        from the model's ONNX export (made once and cached, see ferkit.inference.onnx_backend) or, when
        `model` is a .onnx file written by `ferkit export`, from that file (then no PyTorch model is loaded
        and `self.model` is None). Both give the same probabilities (to ~1e-6). Detection stays in PyTorch
        either way. See the README's Speed section.
    threads: CPU threads for the models (torch's intra-op pool, ONNX Runtime's session, OpenCV). Default: the
        CPUs this process may use (affinity mask and cgroup CPU quota, see `ferkit.device.default_threads`), or
        fewer if torch was already set to fewer (torch.set_num_threads). Below 1 is a ValueError; more than the
        available CPUs is lowered to them. torch's and OpenCV's thread counts are per process, so the last
        Recognizer made sets them for all; `self.threads` is the count used. (Importing ferkit before torch also
        makes OpenMP's idle threads sleep instead of spinning, see ferkit/__init__.py.)
    prior: 'none' (default), or 'uniform' to divide the scores by the class prior the model was trained with
        (ferkit.models.prior; for photos not distributed like FER2013, where its frequent classes would be
        over-predicted).
    """

    def __init__(self, model: Any = "default", detector: str | FaceDetector = "retinaface", device: str = "auto",
                 tta: bool | str = "auto", *, weights: str | os.PathLike | None = None,
                 min_face_score: float = 0.0, align: bool = True, batch_size: int = 64,
                 precision: str = "fp32", backend: str = "auto", threads: int | None = None,
                 prior: str = "none") -> None:
        from ferkit.device import resolve_device, resolve_precision, set_threads

        self.device = resolve_device(device)
        self.threads = set_threads(threads)
        self.tta = resolve_tta(tta)
        is_onnx_file = isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx")
        self.backend = "onnx" if is_onnx_file else resolve_backend(backend, self.device, precision)
        self.backend_note = ""
        if self.backend == "onnx" and precision not in ("fp32", "auto"):
            raise ValueError(f"the onnx backend runs in fp32; precision {precision!r} needs backend='torch'")
        self._onnx: Any = None
        if is_onnx_file:
            from ferkit.inference.onnx_backend import OnnxClassifier

            if weights is not None:
                raise ValueError("give either an .onnx file as `model` or `weights`, not both")
            self._onnx = OnnxClassifier(model, device=self.device, threads=self.threads)
            self.model, self.meta, self.weights_path = None, self._onnx.meta, Path(model)
            from ferkit.models.weights import check_metadata

            check_metadata(self.meta, model)  # load_model checks .safetensors files; nothing else checks this one
        else:
            self.model, self.meta, self.weights_path = resolve_model(model, weights, self.device)
            if self.backend == "onnx":
                from ferkit.inference.onnx_backend import OnnxClassifier, cached_export

                try:
                    self._onnx = OnnxClassifier(cached_export(self.weights_path), device=self.device,
                                                threads=self.threads)
                except Exception as e:  # auto falls back to PyTorch: e.g. a fitted tan_pca does not export
                    if backend != "auto":
                        raise
                    self.backend, self.backend_note = "torch", f"onnx unavailable for this model: {e}"
        self.classes: list[str] = list(self.meta.get("classes") or [])
        if len(self.classes) != self.meta.get("num_classes", len(self.classes)) or not self.classes:
            raise ValueError(f"the weights' metadata lists {len(self.classes)} class names for "
                             f"{self.meta.get('num_classes')} classes")
        from ferkit.models.predict import model_tta

        self.tta = model_tta(self.tta, self.meta)
        from ferkit.models.prior import check_prior

        check_prior(prior, self.meta)
        self.prior = prior  # 'uniform': scores divided by the training class prior (models.prior)
        self.input_size = int(self.meta.get("input_size", FER_SIZE))
        self.normalize = self.meta.get("normalize", "dataset")
        self.dtype = None if self.backend == "onnx" else resolve_precision(precision, self.device)
        self._detector_spec = detector
        self._detector: FaceDetector | None = None if isinstance(detector, str) else get_detector(detector)
        if isinstance(detector, str):
            _check_detector_name(detector)
        self.min_face_score = float(min_face_score)
        self.align = align
        self.batch_size = int(batch_size)

    @property
    def detector(self) -> FaceDetector:
        """Built on first use, so classify_faces-only users never load a detector."""
        if self._detector is None:
            self._detector = get_detector(self._detector_spec, device=self.device)
        return self._detector

    def __repr__(self) -> str:
        name = self._detector_spec if isinstance(self._detector_spec, str) else type(self._detector_spec).__name__
        return (f"Recognizer(model={self.meta.get('model')!r}, classes={len(self.classes)}, detector={name!r}, "
                f"device={str(self.device)!r}, tta={self.tta!r}, backend={self.backend!r})")

    # -- classification -------------------------------------------------------------------------------

    def predict_proba(self, faces: np.ndarray) -> np.ndarray:
        """(N, C) probabilities for uint8 grayscale faces (N, 48, 48) already in FER2013 framing."""
        from ferkit.models.predict import predict_proba
        from ferkit.models.prior import adjust_prior

        if len(faces) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        if self._onnx is not None:
            from ferkit.models.predict import check_finite

            probs = check_finite(self._onnx.predict_proba(np.ascontiguousarray(faces), input_size=self.input_size,
                                                          norm=self.normalize, tta=self.tta,
                                                          batch_size=self.batch_size))
        else:
            probs = predict_proba(self.model, np.ascontiguousarray(faces), input_size=self.input_size,
                                  norm=self.normalize, tta=self.tta, batch_size=self.batch_size, dtype=self.dtype)
        return adjust_prior(probs, self.prior, self.meta)

    def _result(self, probs: np.ndarray) -> dict[str, Any]:
        emotions = {c: float(p) for c, p in zip(self.classes, probs, strict=True)}
        return {"emotions": emotions, "dominant": self.classes[int(np.argmax(probs))]}

    def classify_faces(self, faces: Any, color: str = "bgr") -> dict[str, Any] | list[dict[str, Any]]:
        """Emotions of already-cropped faces (no detection); all faces go through the model in batches.

        `faces`: one face (a path, a PIL image, or an array (H, W) / (H, W, 3) / (H, W, 4)), or a batch:
        a list of those (any sizes), or an array (N, H, W) gray or (N, H, W, 3) color. Arrays with 3 or 4
        channels are read in `color` order ("bgr" by default, or "rgb"). Each face is converted to gray
        and resized to 48x48 (so it should be framed roughly like FER2013: forehead to chin, cheek to cheek).
        Returns one {"emotions", "dominant"} dict for one face, a list of them for a batch.
        """
        single, items = _split_faces(faces)
        arrays = []
        for i, item in enumerate(items):
            name = None if single else f"face {i}"
            arrays.append(to_face_array(load_image(item, color=color, name=name)))
        batch = np.stack(arrays) if arrays else np.zeros((0, FER_SIZE, FER_SIZE), np.uint8)
        results = [self._result(p) for p in self.predict_proba(batch)]
        return results[0] if single else results

    # -- detection + classification ---------------------------------------------------------------------

    def detect_faces(self, image: Any, color: str = "bgr") -> tuple[np.ndarray, list[Detection], np.ndarray]:
        """(RGB image, detections, their 48x48 FER2013-style gray crops (N, 48, 48))."""
        rgb = load_image(image, color=color)
        dets = [d for d in self.detector.detect(rgb) if d.score >= self.min_face_score and d.box[2] and d.box[3]]
        framing = getattr(self.detector, "framing", (1.0, 0.0))
        crops = [crop_face(rgb, d.box, d.landmarks, FER_SIZE, framing, self.align) for d in dets]
        faces = np.stack(crops) if crops else np.zeros((0, FER_SIZE, FER_SIZE), np.uint8)
        return rgb, dets, faces

    def detect_emotions(self, image: Any, color: str = "bgr") -> list[dict[str, Any]]:
        """Faces in `image` (a path, a PIL image, or an array in `color` order: "bgr" default, "rgb", "gray")
        and their emotions, left to right:
        ``[{"box": [x, y, w, h], "emotions": {label: probability}, "dominant": label, "face_score": float}]``.
        An image without faces gives []. Unreadable input raises ImageError (a ValueError) naming the reason.
        """
        _, dets, faces = self.detect_faces(image, color=color)
        return self.describe(dets, faces)

    def describe(self, dets: list[Detection], faces: np.ndarray) -> list[dict[str, Any]]:
        """detect_emotions' result dicts for detections and their crops (as `detect_faces` returns them)."""
        out = []
        for det, probs in zip(dets, self.predict_proba(faces), strict=True):
            r = self._result(probs)
            out.append({"box": [int(v) for v in det.box], "emotions": r["emotions"], "dominant": r["dominant"],
                        "face_score": float(det.score)})
        return out


def _check_detector_name(name: str) -> None:
    """Raise ValueError now (not at first use) for an unknown detector name."""
    from ferkit.inference.detect import ALIASES, DETECTORS

    if ALIASES.get(name.lower(), name.lower()) not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


def _split_faces(faces: Any) -> tuple[bool, list[Any]]:
    """(is_single, items) for classify_faces' input."""
    from PIL import Image

    if isinstance(faces, (str, os.PathLike, Image.Image)):
        return True, [faces]
    if isinstance(faces, np.ndarray) or isinstance(faces, torch.Tensor):
        arr = faces.numpy() if isinstance(faces, torch.Tensor) else faces
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
            return True, [arr]
        if arr.ndim in (3, 4):
            return False, list(arr)
        raise ImageError("<array>", f"unsupported face array shape {arr.shape}")
    if isinstance(faces, Sequence):
        return False, list(faces)
    raise ImageError(type(faces).__name__, "expected a face image, a list of face images or an array batch")
