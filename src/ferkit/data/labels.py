"""Label sets: which emotions a model predicts, as data rather than code forks.

FER2013 stores the emotion as an integer 0..6. A label set maps those source ids to
contiguous class indices; ids not in the map (e.g. disgust for the 6-class set) are
dropped from the data when that label set is used.

`ferplus8` is the FER+ label set (Barsoum et al. 2016): FER2013's seven emotions in FER+ column order plus
contempt, which has no FER2013 id (source id -1). It is meant for FER+ labels (`load_dataset(...,
labels="fer2013new.csv")`); FER2013's own labels never say contempt.
"""

from __future__ import annotations

from dataclasses import dataclass

FER2013_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NO_SOURCE_ID = -1  # a class FER2013's emotion ids never name (FER+'s contempt)


@dataclass(frozen=True)
class LabelSet:
    """A named list of classes and the FER2013 emotion id each class comes from."""

    name: str
    classes: tuple[str, ...]
    source_ids: tuple[int, ...]  # FER2013 emotion id of each class, same order as `classes`

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def source_to_class(self) -> dict[int, int]:
        """FER2013 emotion id -> class index in this label set."""
        return {src: i for i, src in enumerate(self.source_ids) if src != NO_SOURCE_ID}


LABEL_SETS: dict[str, LabelSet] = {
    "fer7": LabelSet("fer7", FER2013_NAMES, tuple(range(7))),
    # The 6-class published project merges nothing: it simply drops the rare disgust rows.
    "fer6": LabelSet("fer6", tuple(n for n in FER2013_NAMES if n != "disgust"), (0, 2, 3, 4, 5, 6)),
    "ferplus8": LabelSet("ferplus8", ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt"),
                         (6, 3, 5, 4, 0, 1, 2, NO_SOURCE_ID)),
}


def get_label_set(name: str | LabelSet) -> LabelSet:
    """Look up a label set by name ('fer7', 'fer6' or 'ferplus8'); LabelSet instances pass through."""
    if isinstance(name, LabelSet):
        return name
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; choose one of {sorted(LABEL_SETS)}") from None
