"""Draw results on a photo: a numbered box per face, its dominant emotion and a bar per class probability.

Face numbers start at 1 in the order of the results (the `face` column of `--csv`, the order of `faces` in
JSON), so a drawn face can be matched to its row. In group photos a face's bar panel goes where it covers no
other face (right of the box, left, below, above); where there is no such place it is left out (the scores
are in the JSON/CSV rows), and a label that would cover another face shrinks to the face's number.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# BGR colours per emotion (box, label and the dominant bar); others fall back to grey.
COLORS = {
    "angry": (40, 40, 220), "disgust": (40, 140, 40), "fear": (160, 60, 160), "happy": (0, 200, 255),
    "sad": (200, 110, 30), "surprise": (0, 140, 255), "neutral": (170, 170, 170), "contempt": (120, 90, 60),
}
DEFAULT_COLOR = (200, 200, 200)

Rect = tuple[int, int, int, int]  # x, y, w, h


def face_label(number: int, face: dict[str, Any]) -> str:
    """The text drawn above face `number` (1-based): number, dominant emotion and its probability."""
    return f"{number} {face['dominant']} {face['emotions'][face['dominant']]:.0%}"


def annotate(rgb: np.ndarray, faces: list[dict[str, Any]]) -> np.ndarray:
    """A BGR copy of `rgb` with each face's numbered box, dominant label and probability bars drawn on it."""
    import cv2

    img = np.ascontiguousarray(rgb[..., ::-1]).copy()
    height, width = img.shape[:2]
    unit = max(1.0, min(height, width) / 500)  # line and text scale for this image size
    boxes: list[Rect] = [(int(a), int(b), int(c), int(d)) for a, b, c, d in (face["box"] for face in faces)]
    taken: list[Rect] = []  # labels and panels already drawn: later ones avoid them too
    for i, face in enumerate(faces):
        x, y, w, h = boxes[i]
        others = boxes[:i] + boxes[i + 1:]
        color = COLORS.get(face["dominant"], DEFAULT_COLOR)
        cv2.rectangle(img, (x, y), (x + w, y + h), color, max(1, round(2 * unit)), cv2.LINE_AA)
        label = _place_label(img, face_label(i + 1, face), str(i + 1), (x, y), others + taken, unit)
        _draw_label(img, *label, color, unit)
        taken.append(label[1])
        panel = _place_panel(img, face, boxes[i], others + taken, unit)
        if panel is not None:
            _draw_bars(img, face, panel, color, unit)
            taken.append(panel)
    return img


def _overlaps(a: Rect, b: Rect) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def _text_size(text: str, unit: float, scale: float) -> tuple[int, int, int, float, int]:
    import cv2

    scale, thick = scale * unit, max(1, round(unit * 1.2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    return tw, th, base, scale, thick


def _label_rect(img: np.ndarray, text: str, corner: tuple[int, int], unit: float, inside: bool) -> Rect:
    tw, th, base, _, _ = _text_size(text, unit, 0.55)
    x, y = corner
    box_h = th + base + 4
    top = y if inside or y - box_h < 0 else y - box_h  # above the box, or inside it at the top
    return x, top, min(tw + 6, img.shape[1] - x), box_h


def _place_label(img: np.ndarray, text: str, short: str, corner: tuple[int, int], avoid: list[Rect],
                 unit: float) -> tuple[str, Rect]:
    """The full label where it covers no other face or label (above the box, else inside its top), else just
    the face's number there; inside the face's own box when nothing else is free."""
    for words in (text, short):
        for inside in (False, True):
            rect = _label_rect(img, words, corner, unit, inside)
            if not any(_overlaps(rect, r) for r in avoid):
                return words, rect
    return short, _label_rect(img, short, corner, unit, inside=True)


def _draw_label(img: np.ndarray, text: str, rect: Rect, color: tuple[int, int, int], unit: float) -> None:
    import cv2

    x, top, w, h = rect
    _, th, _, scale, thick = _text_size(text, unit, 0.55)
    cv2.rectangle(img, (x, top), (x + w, top + h), color, -1)
    cv2.putText(img, text, (x + 3, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)


def _panel_layout(face: dict[str, Any], unit: float) -> tuple[int, int, int, int, int, float, int]:
    """Panel width and height, then the row height, label column width, text height, scale, thickness."""
    import cv2

    scale, thick = 0.4 * unit, max(1, round(unit))
    (label_w, text_h), _ = cv2.getTextSize("surprise", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    row = text_h + max(3, round(4 * unit))
    panel_w = label_w + round(60 * unit) + round(14 * unit)
    panel_h = row * len(face["emotions"]) + round(6 * unit)
    return panel_w, panel_h, row, label_w, text_h, scale, thick


def _place_panel(img: np.ndarray, face: dict[str, Any], box: Rect, avoid: list[Rect], unit: float) -> Rect | None:
    """Where the bar panel covers no other face, label or panel: right of the box, left, below, above."""
    height, width = img.shape[:2]
    panel_w, panel_h = _panel_layout(face, unit)[:2]
    if panel_w > width or panel_h > height:
        return None
    x, y, w, h = box
    gap = round(4 * unit)
    candidates = [(x + w + gap, y), (x - panel_w - gap, y), (x, y + h + gap), (x, y - panel_h - gap)]
    for px, py in candidates:
        if px < 0 or py < 0 or px + panel_w > width or py + panel_h > height:
            continue
        rect = (px, py, panel_w, panel_h)
        if not any(_overlaps(rect, r) for r in avoid):
            return rect
    if avoid:
        return None
    # A lone face with no free side (a face filling the photo): the panel goes over the photo's corner.
    px = int(np.clip(x + w + gap, 0, width - panel_w))
    return px, int(np.clip(y, 0, height - panel_h)), panel_w, panel_h


def _draw_bars(img: np.ndarray, face: dict[str, Any], rect: Rect, color: tuple[int, int, int], unit: float) -> None:
    """One bar per class inside `rect`, on a darkened backdrop."""
    import cv2

    px, py, panel_w, panel_h = rect
    _, _, row, label_w, text_h, scale, thick = _panel_layout(face, unit)
    roi = img[py:py + panel_h, px:px + panel_w]
    roi[:] = (roi * 0.35 + 20 * 0.65).astype(np.uint8)  # darkened backdrop keeps the text readable
    pad, bar_w = round(4 * unit), round(60 * unit)
    for i, (name, p) in enumerate(face["emotions"].items()):
        ty = py + pad + (i + 1) * row - round(3 * unit)
        cv2.putText(img, name, (px + pad, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), thick, cv2.LINE_AA)
        bx = px + pad + label_w + pad
        bar_color = color if name == face["dominant"] else (150, 150, 150)
        cv2.rectangle(img, (bx, ty - text_h), (bx + bar_w, ty), (70, 70, 70), 1)  # track: the 100% mark
        cv2.rectangle(img, (bx, ty - text_h), (bx + max(1, round(bar_w * float(p))), ty), bar_color, -1)
