"""Draw results on a photo: a box per face, its dominant emotion and a bar per class probability."""

from __future__ import annotations

from typing import Any

import numpy as np

# BGR colours per emotion (box, label and the dominant bar); others fall back to grey.
COLORS = {
    "angry": (40, 40, 220), "disgust": (40, 140, 40), "fear": (160, 60, 160), "happy": (0, 200, 255),
    "sad": (200, 110, 30), "surprise": (0, 140, 255), "neutral": (170, 170, 170), "contempt": (120, 90, 60),
}
DEFAULT_COLOR = (200, 200, 200)


def annotate(rgb: np.ndarray, faces: list[dict[str, Any]]) -> np.ndarray:
    """A BGR copy of `rgb` with each face's box, dominant label and probability bars drawn on it."""
    import cv2

    img = np.ascontiguousarray(rgb[..., ::-1]).copy()
    height, width = img.shape[:2]
    unit = max(1.0, min(height, width) / 500)  # line and text scale for this image size
    for face in faces:
        x, y, w, h = (int(v) for v in face["box"])
        color = COLORS.get(face["dominant"], DEFAULT_COLOR)
        cv2.rectangle(img, (x, y), (x + w, y + h), color, max(1, round(2 * unit)), cv2.LINE_AA)
        prob = face["emotions"][face["dominant"]]
        _label(img, f"{face['dominant']} {prob:.0%}", (x, y), color, unit)
        _bars(img, face, color, unit)
    return img


def _label(img: np.ndarray, text: str, corner: tuple[int, int], color: tuple[int, int, int], unit: float) -> None:
    import cv2

    scale, thick = 0.55 * unit, max(1, round(unit * 1.2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = corner
    top = y - th - base - 4 if y - th - base - 4 >= 0 else y  # above the box, or inside it at the top
    cv2.rectangle(img, (x, top), (x + tw + 6, top + th + base + 4), color, -1)
    cv2.putText(img, text, (x + 3, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)


def _bars(img: np.ndarray, face: dict[str, Any], color: tuple[int, int, int], unit: float) -> None:
    """A small panel of one bar per class, right of the box (left when there is no room)."""
    import cv2

    height, width = img.shape[:2]
    x, y, w, h = (int(v) for v in face["box"])
    emotions = face["emotions"]
    scale, thick = 0.4 * unit, max(1, round(unit))
    (label_w, text_h), _ = cv2.getTextSize("surprise", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    row = text_h + max(3, round(4 * unit))
    bar_w = round(60 * unit)
    panel_w, panel_h = label_w + bar_w + round(14 * unit), row * len(emotions) + round(6 * unit)
    px = x + w + round(4 * unit)
    if px + panel_w > width:
        px = x - panel_w - round(4 * unit)
    px = int(np.clip(px, 0, max(0, width - panel_w)))
    py = int(np.clip(y, 0, max(0, height - panel_h)))
    x2, y2 = min(width, px + panel_w), min(height, py + panel_h)
    roi = img[py:y2, px:x2]
    roi[:] = (roi * 0.35 + 20 * 0.65).astype(np.uint8)  # darkened backdrop keeps the text readable
    pad = round(4 * unit)
    for i, (name, p) in enumerate(emotions.items()):
        ty = py + pad + (i + 1) * row - round(3 * unit)
        cv2.putText(img, name, (px + pad, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), thick, cv2.LINE_AA)
        bx = px + pad + label_w + pad
        bar_color = color if name == face["dominant"] else (150, 150, 150)
        cv2.rectangle(img, (bx, ty - text_h), (bx + bar_w, ty), (70, 70, 70), 1)  # track: the 100% mark
        cv2.rectangle(img, (bx, ty - text_h), (bx + max(1, round(bar_w * float(p))), ty), bar_color, -1)
