"""Pixels of any image mode as uint8 RGB or gray: one conversion for the image-folder loader (ferkit.data.folders)
and for images at inference (ferkit.inference.image_io), so a model is trained and used on the same pixels.

High bit depths are scaled (16-bit: /257), not clipped; alpha is composited on white; palette, 1-bit and CMYK
images are converted; gray is ITU-R 601 luma (what PIL's "L" and OpenCV use). Failures raise `ImageError`,
which names the image and the reason.

`decode_image` is the one place encoded image files are decoded (image folders and prediction alike): a header
declaring more than `MAX_PIXELS` pixels is refused before any pixel is decoded (decompression-bomb guard), and
whatever a Pillow decoder raises on a corrupt file becomes an `ImageError`.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np

# 50 megapixels: a 8660 x 5773 photo; above anything a camera phone writes, far below memory trouble.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An input that cannot be used as an image; `source` names it, `reason` says why, and `kind` classifies it
    for callers that answer differently (the HTTP API's error codes): empty_file, too_many_pixels, not_an_image,
    corrupt_image or invalid_image."""

    def __init__(self, source: str, reason: str, kind: str = "invalid_image") -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.kind = kind


def check_pixels(label: str, width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an empty image, or one over `max_pixels` (0: no limit)."""
    if width <= 0 or height <= 0:
        raise ImageError(label, f"empty image ({width}x{height})")
    if max_pixels and width * height > max_pixels:
        raise ImageError(label, f"image is {width}x{height} = {width * height:,} pixels, more than the "
                                f"{max_pixels:,}-pixel limit (decompression-bomb guard)", "too_many_pixels")


def decode_image(source: str | os.PathLike | bytes, label: str, max_pixels: int = MAX_PIXELS, *,
                 gray: bool = False) -> np.ndarray:
    """Decode an image file (a path or its bytes) -> uint8 RGB (H, W, 3), or (H, W) luma with `gray`.

    The size in the header is checked against `max_pixels` before any pixel is decoded; EXIF orientation is
    applied. Every failure is an `ImageError` naming `label`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, bytes) and not source:
        raise ImageError(label, "empty file (0 bytes)", "empty_file")
    try:
        with warnings.catch_warnings():
            # Our own limit decides; PIL's warning (and its 2x hard limit) must not leak out as noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                check_pixels(label, im.size[0], im.size[1], max_pixels)  # Image.open has read the header only
                im.load()
                im = ImageOps.exif_transpose(im)
                if gray:
                    return np.asarray(im) if im.mode == "L" else rgb_to_gray(pil_to_rgb(im, label))
                return pil_to_rgb(im, label)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(label, f"refused by the decompression-bomb guard ({e}); the pixel limit is "
                                f"{max_pixels:,}", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageError(label, "not an image file, or a format Pillow cannot read", "not_an_image") from None
    except MemoryError:
        raise ImageError(label, "not enough memory to decode the image", "too_many_pixels") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:  # opening the path, not decoding it
        raise ImageError(label, f"cannot read file ({e.strerror or e})") from None
    except Exception as e:
        # Pillow's decoders are third-party parsers of untrusted bytes and raise whatever their format hits on
        # a corrupt file: OSError ("image file is truncated"), SyntaxError (broken PNG chunks), ValueError,
        # EOFError, struct.error, IndexError, NotImplementedError (a DDS with an unknown pixel format) ...
        raise ImageError(label, f"corrupt or truncated image ({type(e).__name__}: {e})", "corrupt_image") from None


def pil_to_rgb(im: Any, label: str) -> np.ndarray:
    """Any PIL mode -> uint8 RGB. Alpha is composited on white; high bit depths are scaled, not clipped."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return gray_to_rgb(scale_to_uint8(np.asarray(im), label))
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"))
        return composite_white(rgba)
    if mode == "1":
        im = im.convert("L")
    if mode == "L" or im.mode == "L":
        return gray_to_rgb(np.asarray(im))
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(label, f"cannot convert image mode {mode!r} to RGB ({e})") from None
    arr = np.asarray(im)
    if arr.dtype != np.uint8:  # pragma: no cover - PIL's RGB is always 8-bit
        arr = scale_to_uint8(arr, label)
    return np.ascontiguousarray(arr)


def composite_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def scale_to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    """Integers wider than 8 bits are scaled from their range (16-bit: /257); floats in [0, 1] are x255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        a = arr.astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0:
            raise ImageError(label, "negative pixel values")
        if arr.dtype == np.uint16 or hi > 255:  # 16-bit data (or wider integers holding it)
            top = max(65535, hi)
            return ((a * 255 + top // 2) // top).astype(np.uint8)
        return a.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            raise ImageError(label, "pixel values are NaN or infinite")
        if a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        return np.clip(a + 0.5, 0, 255).astype(np.uint8)
    raise ImageError(label, f"unsupported pixel type {arr.dtype}")


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (what PIL's "L" and OpenCV use), uint8 (H, W)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
