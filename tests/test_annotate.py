"""Annotated images: numbered labels, bar panels that never cover another face."""

from __future__ import annotations

import numpy as np
import pytest

from ferkit.inference.annotate import annotate, face_label

CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def _face(box: list[int], dominant: str = "happy") -> dict:
    emotions = {c: 0.02 for c in CLASSES}
    emotions[dominant] = 1 - 0.02 * (len(CLASSES) - 1)
    return {"box": box, "emotions": emotions, "dominant": dominant, "face_score": 0.99}


def _interior(img: np.ndarray, box: list[int], margin: int = 6) -> np.ndarray:
    x, y, w, h = box
    return img[y + margin:y + h - margin, x + margin:x + w - margin]


def test_face_label_numbers_faces_from_one_like_the_csv_rows() -> None:
    assert face_label(1, _face([0, 0, 10, 10])) == "1 happy 88%"
    assert face_label(12, _face([0, 0, 10, 10], "sad")).startswith("12 sad ")


@pytest.mark.parametrize("layout", ["side_by_side", "stacked"])
def test_a_face_panel_never_covers_a_neighbouring_face(layout: str) -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    if layout == "side_by_side":  # a group photo: the first face's panel used to go right, over the second
        a, b = [60, 100, 60, 70], [130, 100, 60, 70]
    else:
        a, b = [150, 40, 60, 70], [150, 120, 60, 70]
    both = annotate(photo, [_face(a), _face(b, "sad")])
    for box, alone in ((b, annotate(photo, [_face(b, "sad")])), (a, annotate(photo, [_face(a)]))):
        # Inside each face, the only drawing is that face's own (its label may sit at its top when there is
        # no room above): nothing of the other face's label or panel.
        np.testing.assert_array_equal(_interior(both, box)[20:], _interior(alone, box)[20:])


def test_a_lone_face_keeps_its_panel_and_a_crowded_one_drops_it() -> None:
    photo = np.full((200, 200, 3), 128, dtype=np.uint8)
    lone = annotate(photo, [_face([70, 60, 60, 60])])
    assert (lone[60:140, 134:200] != 128).any()  # the panel right of the box
    # Faces on every side and no room at the photo's edges: no panel, the other faces stay clean.
    boxes = [[0, 0, 64, 64], [68, 0, 64, 64], [136, 0, 64, 64], [0, 68, 64, 64], [68, 68, 64, 64],
             [136, 68, 64, 64], [0, 136, 64, 64], [68, 136, 64, 64], [136, 136, 64, 64]]
    crowd = annotate(photo, [_face(bx) for bx in boxes])
    centre_alone = annotate(photo, [_face(boxes[4])])
    for i, box in enumerate(boxes):
        if i != 4:
            np.testing.assert_array_equal(_interior(crowd, box)[20:], _interior(annotate(photo, [_face(box)]),
                                                                                  box)[20:])
    assert crowd.shape == centre_alone.shape
