"""Load any image safely into one canonical form: uint8 RGB, shape (H, W, 3).

Accepts a path, a NumPy array (BGR by default, as OpenCV gives; or RGB / gray by argument) or a PIL image.
Whatever the file holds — 16-bit, RGBA / LA (composited on white), palette, 1-bit, CMYK, gray, EXIF-rotated
phone photos — comes out as 8-bit RGB. Every failure is an `ImageError` that names the file and the reason;
a file whose header declares more than `max_pixels` pixels is refused before any pixel is decoded
(decompression-bomb guard).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.data.pixels import (  # noqa: F401  (ImageError, MAX_PIXELS, gray_to_rgb, rgb_to_gray: re-exported)
    MAX_PIXELS,
    ImageError,
    check_pixels,
    composite_white,
    decode_image,
    gray_to_rgb,
    pil_to_rgb,
    rgb_to_gray,
    scale_to_uint8,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
                            ".pnm", ".pbm", ".jfif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"})
COLOR_ORDERS = ("bgr", "rgb", "gray")


def sample_image_path() -> Path:
    """The bundled public-domain sample photo (NASA astronaut Eileen Collins; see ferkit/assets/README.md)."""
    from importlib import resources

    return Path(str(resources.files("ferkit") / "assets" / "astronaut.jpg"))


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def load_image(source: Any, color: str = "bgr", max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """uint8 RGB (H, W, 3) from a path, an array or a PIL image.

    `color` says how to read a 3- or 4-channel NumPy array: "bgr" (OpenCV's order, the default), "rgb",
    or "gray" (the array is one gray channel). Paths and PIL images carry their own mode.
    `name` overrides how the input is named in errors.
    """
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), max_pixels, name)
    label = name or ("<PIL image>" if isinstance(source, Image.Image) else "<array>")
    if isinstance(source, Image.Image):
        check_pixels(label, source.size[0], source.size[1], max_pixels)
        return pil_to_rgb(source, label)
    if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        return array_to_rgb(np.asarray(source), color, label, max_pixels)
    raise ImageError(name or type(source).__name__,
                     f"unsupported input type {type(source).__name__} (expected a path, a NumPy array or a PIL image)")


def _load_path(path: Path, max_pixels: int, name: str | None) -> np.ndarray:
    label = name or str(path)
    if not path.exists():
        raise ImageError(label, "file not found")
    if path.is_dir():
        raise ImageError(label, "is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(label, f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise ImageError(label, "empty file (0 bytes)")
    return decode_image(path, label, max_pixels)  # shared with the image-folder loader (ferkit.data.pixels)


def array_to_rgb(arr: np.ndarray, color: str = "bgr", label: str = "<array>",
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A NumPy image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any numeric dtype -> uint8 RGB."""
    if color not in COLOR_ORDERS:
        raise ValueError(f"unknown color order {color!r}; choose one of {COLOR_ORDERS}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(label, f"unsupported array shape {arr.shape} (expected (H, W), (H, W, 3) or (H, W, 4))")
    check_pixels(label, arr.shape[1], arr.shape[0], max_pixels)
    arr = scale_to_uint8(arr, label)
    if arr.ndim == 2:
        return gray_to_rgb(arr)
    if color == "gray":
        raise ImageError(label, f"color='gray' but the array has {arr.shape[-1]} channels")
    if arr.shape[-1] == 4:
        arr = arr[..., [2, 1, 0, 3]] if color == "bgr" else arr
        return composite_white(arr)
    return np.ascontiguousarray(arr[..., ::-1] if color == "bgr" else arr)
