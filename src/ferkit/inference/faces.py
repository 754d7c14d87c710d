"""Cut faces out of photos the way FER2013's faces were cut: tight, centred, upright, grayscale, 48x48.

The framing is measured, not guessed. Running the detectors on 400 FER2013 training faces (upscaled 4x and
padded so the detector sees past the frame) gives, in units of the 48-pixel frame side (medians):

* RetinaFace's landmarks: eyes at (0.318, 0.389) and (0.682, 0.389), nose tip (0.498, 0.597), mouth
  corners (0.357, 0.764) and (0.648, 0.764). `FER2013_TEMPLATE` is this, made left-right symmetric; with
  landmarks, a face is warped by the least-squares similarity (rotation + uniform scale + shift) that puts
  its five points on the template, which also levels a tilted head (FER2013 faces are mostly upright).
* RetinaFace's box: height 1.03 and width 0.79 of the frame, its centre 0.016 below the frame's centre.
  Without landmarks the crop is the square of side 0.97 x max(w, h) centred 0.016 sides above the box centre.
* OpenCV's Haar box: 0.974 of the frame (FER2013 was likely cut with a Haar-style detector), centred; so
  the crop is the square of side 1.027 x the box side.

Pixels outside the photo are filled by repeating the edge. Large faces are first warped at their own
resolution and then shrunk with area averaging, so a 400-pixel face becomes a clean 48-pixel one.
"""

from __future__ import annotations

import numpy as np

FER_SIZE = 48
# (x, y) of left eye, right eye, nose tip, left and right mouth corner, as fractions of the frame side
# ("left" = smaller x in the image).
FER2013_TEMPLATE = np.array([[0.318, 0.389], [0.682, 0.389], [0.500, 0.597], [0.355, 0.764], [0.645, 0.764]],
                            dtype=np.float64)
# Box framing per detector: square side = scale * max(w, h); centre moved down by shift * side.
BOX_FRAMING: dict[str, tuple[float, float]] = {
    "retinaface": (0.97, -0.016),
    "haar": (1.027, 0.0),
    "none": (1.0, 0.0),
}


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the least-squares similarity mapping points `src` onto `dst` (Umeyama, no reflection)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s ** 2).sum() / len(src)
    if var <= 1e-12:
        raise ValueError("degenerate landmarks (all points coincide)")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ flip @ vt
    scale = np.trace(np.diag(sig) @ flip) / var
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def box_transform(box: tuple[float, float, float, float], size: int = FER_SIZE, scale: float = 1.0,
                  shift: float = 0.0) -> np.ndarray:
    """2x3 matrix mapping the square frame around `box` (x, y, w, h) onto a size x size image."""
    x, y, w, h = (float(v) for v in box)
    side = max(scale * max(w, h), 1.0)
    cx, cy = x + w / 2, y + h / 2 + shift * side
    k = size / side
    return np.array([[k, 0.0, size / 2 - k * cx], [0.0, k, size / 2 - k * cy]])


def warp_face(gray: np.ndarray, matrix: np.ndarray, size: int = FER_SIZE) -> np.ndarray:
    """Apply `matrix` (image -> size x size output); big faces are warped large, then area-averaged down."""
    import cv2

    zoom = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # output pixels per image pixel
    k = int(min(16, max(1, np.floor(1.0 / max(zoom, 1e-6)))))
    big = cv2.warpAffine(gray, matrix * k, (size * k, size * k), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    if k > 1:
        big = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return big


def crop_face(image: np.ndarray, box: tuple[float, float, float, float], landmarks: np.ndarray | None = None,
              size: int = FER_SIZE, framing: tuple[float, float] = (1.0, 0.0), align: bool = True) -> np.ndarray:
    """uint8 (size, size) grayscale face in FER2013 framing from an RGB (H, W, 3) or gray (H, W) image.

    With `landmarks` (5 x 2: eyes, nose, mouth corners) and `align`, the face is aligned to
    `FER2013_TEMPLATE`; otherwise the square around `box` given by `framing` (see `BOX_FRAMING`) is used.
    """
    from ferkit.inference.image_io import rgb_to_gray

    gray = rgb_to_gray(image) if image.ndim == 3 else image
    matrix = None
    if align and landmarks is not None:
        try:
            matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2),
                                          FER2013_TEMPLATE * size)
        except (ValueError, np.linalg.LinAlgError):
            matrix = None
    if matrix is None:
        matrix = box_transform(box, size, *framing)
    return warp_face(gray, matrix, size)


def to_face_array(face: np.ndarray, size: int = FER_SIZE) -> np.ndarray:
    """An already-cropped face image (uint8 RGB or gray, any size) -> uint8 (size, size) gray."""
    import cv2

    from ferkit.inference.image_io import rgb_to_gray

    gray = rgb_to_gray(face) if face.ndim == 3 else face
    if gray.shape == (size, size):
        return np.ascontiguousarray(gray)
    shrink = gray.shape[0] > size or gray.shape[1] > size
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
