"""Face detectors behind one small interface; `get_detector(name)` builds one.

* ``retinaface`` (default): RetinaFace with a MobileNet-0.25 backbone, a CNN detector trained on WIDER FACE,
  run in PyTorch with weights shipped inside ferkit (1.7 MB; nothing is downloaded). Gives a confidence per
  face and five landmarks, used to align faces like FER2013's.
* ``haar``: OpenCV's Viola-Jones frontal-face Haar cascade (the XML ships in opencv-python-headless 4.x);
  fast and classical, no landmarks, misses turned or tilted faces.
* ``none``: no detection; the whole image is the face (for photos that are already face crops, such as
  FER2013-style image folders).

docs/detection.md records which detectors were considered and why this one is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ferkit.inference.faces import BOX_FRAMING


@dataclass
class Detection:
    """One face: box (x, y, w, h) in image pixels, clipped to the image; confidence in [0, 1]; landmarks."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray | None = field(default=None, repr=False)  # (5, 2): eyes, nose tip, mouth corners


class FaceDetector(Protocol):
    name: str
    framing: tuple[float, float]  # how to square a box into a FER2013-style crop (see faces.BOX_FRAMING)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a uint8 RGB (H, W, 3) image, ordered left to right."""
        ...


def _clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1 = max(0, int(round(x1))), max(0, int(round(y1)))
    x2, y2 = min(width, int(round(x2))), min(height, int(round(y2)))
    return x1, y1, max(0, x2 - x1), max(0, y2 - y1)


def _left_to_right(dets: list[Detection]) -> list[Detection]:
    return sorted(dets, key=lambda d: (d.box[0], d.box[1]))


class RetinaFaceDetector:
    """RetinaFace-MobileNet0.25 (Deng et al. 2020; biubug6/Pytorch_Retinaface weights, WIDER FACE).

    `min_score`: keep faces at least this confident. `max_side`: photos are shrunk so their longer side is
    at most this many pixels before detection (speed; boxes are mapped back). `min_face`: drop faces whose
    box is smaller than this many pixels (in the original image), too small to read an expression from.
    """

    name = "retinaface"
    framing = BOX_FRAMING["retinaface"]

    def __init__(self, device: str | torch.device = "cpu", min_score: float = 0.8, nms_iou: float = 0.4,
                 max_side: int = 1280, min_face: int = 16) -> None:
        from ferkit.inference.retinaface import load_retinaface

        self.device = torch.device(device)
        self.net = load_retinaface(self.device)
        self.min_score, self.nms_iou, self.max_side, self.min_face = min_score, nms_iou, max_side, min_face

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Detection]:
        import cv2

        from ferkit.inference.retinaface import BGR_MEAN, anchors_for, decode, input_shape, nms, scale_for

        height, width = image.shape[:2]
        scale = scale_for(height, width, self.max_side)
        small = image
        if scale < 1.0:
            h, w = input_shape(height, width, scale)
            small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.ascontiguousarray(small[..., ::-1])).to(self.device)  # RGB -> BGR
        x = (x.float() - torch.tensor(BGR_MEAN, device=self.device)).permute(2, 0, 1)[None]
        loc, scores, landms, shapes = self.net(x)
        anchors = anchors_for(shapes, x.shape[2], x.shape[3], self.device)
        keep = scores[0] >= self.min_score
        if not bool(keep.any()):
            return []
        boxes, pts = decode(loc[0][keep], landms[0][keep], anchors[keep])
        sx, sy = width / x.shape[3], height / x.shape[2]  # exact per-axis factors after rounding
        boxes = (boxes * torch.tensor([sx, sy, sx, sy], device=self.device)).cpu().numpy()
        pts = (pts * torch.tensor([sx, sy], device=self.device)).cpu().numpy()
        conf = scores[0][keep].float().cpu().numpy()
        out = []
        for i in nms(boxes, conf, self.nms_iou):
            box = _clip_box(*boxes[i], width, height)
            if min(box[2], box[3]) < self.min_face:
                continue
            out.append(Detection(box, float(conf[i]), pts[i].astype(np.float32)))
        return _left_to_right(out)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (Viola & Jones 2001; Lienhart's haarcascade_frontalface_default).

    A cascade gives no probability. `score` is n / (n + min_neighbors), where n is how many overlapping raw
    detections were merged into the box: 0.5 at the acceptance threshold, nearing 1 for strong faces. It
    ranks faces from one image; it is not comparable with RetinaFace's confidence. `min_face`: smallest face
    side searched for, in pixels of the original image (smaller is slower). Photos are shrunk to `max_side`
    first, as for RetinaFace.
    """

    name = "haar"
    framing = BOX_FRAMING["haar"]
    CASCADE = "haarcascade_frontalface_default.xml"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_face: int = 32,
                 max_side: int = 1280) -> None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError(f"OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5); "
                               "ferkit needs opencv-python-headless < 5 for the haar detector")
        path = str(cv2.data.haarcascades) + "/" + self.CASCADE
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade {path}")
        self.scale_factor, self.min_neighbors, self.min_face, self.max_side = (scale_factor, min_neighbors,
                                                                               min_face, max_side)

    def detect(self, image: np.ndarray) -> list[Detection]:
        import cv2

        from ferkit.inference.image_io import rgb_to_gray
        from ferkit.inference.retinaface import input_shape, scale_for

        gray = rgb_to_gray(image) if image.ndim == 3 else image
        height, width = gray.shape
        scale = scale_for(height, width, self.max_side)
        if scale < 1.0:
            h, w = input_shape(height, width, scale)
            gray = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        min_size = max(8, int(round(self.min_face * scale)))
        boxes, neighbors = self.cascade.detectMultiScale2(gray, scaleFactor=self.scale_factor,
                                                          minNeighbors=self.min_neighbors,
                                                          minSize=(min_size, min_size))
        out = []
        for (x, y, w, h), n in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(neighbors).reshape(-1), strict=True):
            box = _clip_box(x / scale, y / scale, (x + w) / scale, (y + h) / scale, width, height)
            out.append(Detection(box, float(n / (n + self.min_neighbors))))
        return _left_to_right(out)


class WholeImageDetector:
    """The whole image is one face (score 1): for inputs that are already face crops."""

    name = "none"
    framing = BOX_FRAMING["none"]

    def detect(self, image: np.ndarray) -> list[Detection]:
        height, width = image.shape[:2]
        return [Detection((0, 0, width, height), 1.0)]


DETECTORS = {"retinaface": RetinaFaceDetector, "haar": HaarDetector, "none": WholeImageDetector}
ALIASES = {"default": "retinaface", "cnn": "retinaface", "opencv": "haar", "haarcascade": "haar",
           "whole": "none", "crop": "none"}


def list_detectors() -> list[str]:
    return list(DETECTORS)


def get_detector(name: str | FaceDetector = "retinaface", device: str | torch.device = "cpu",
                 **options) -> FaceDetector:
    """A detector by name (see `list_detectors()`); a detector object passes through unchanged.

    Keyword options go to its constructor (e.g. ``min_score=0.9`` for RetinaFace, ``min_neighbors=8`` for Haar).
    """
    if not isinstance(name, str):
        if not hasattr(name, "detect"):
            raise TypeError(f"detector must be a name or an object with .detect(image), got {type(name).__name__}")
        return name
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if key == "retinaface":
        return RetinaFaceDetector(device=device, **options)
    return DETECTORS[key](**options)
