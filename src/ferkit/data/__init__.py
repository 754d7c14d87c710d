"""Datasets: FER2013 CSV, image folders, FER+ labels; label sets; batch augmentation."""

from ferkit.data.dataset import SPLITS, DataError, FaceData, canonical_split
from ferkit.data.fer2013 import file_sha256, load_fer2013_csv
from ferkit.data.ferplus import FerPlusLabels, attach_ferplus, load_ferplus_labels
from ferkit.data.folders import load_image_folder
from ferkit.data.labels import FER2013_NAMES, LABEL_SETS, LabelSet, get_label_set

__all__ = ["FER2013_NAMES", "LABEL_SETS", "SPLITS", "DataError", "FaceData", "FerPlusLabels", "LabelSet",
           "attach_ferplus", "canonical_split", "file_sha256", "get_label_set", "load_dataset",
           "load_fer2013_csv", "load_ferplus_labels", "load_image_folder"]


def load_dataset(path: str, label_set: str | LabelSet = "fer7", *, skip_bad_rows: bool = False,
                 labels: str | None = None, label_mode: str = "majority") -> FaceData:
    """Load any supported dataset: a FER2013-style CSV (plain or .gz) or an image folder tree.

    `labels`: a FER+ votes file (`fer2013new.csv`) whose labels replace the CSV's own, joined by row position
    (see `attach_ferplus`); `label_mode` 'majority' (hard labels) or 'soft' (also the vote distribution, for
    training on it). Any label set works with FER+ labels: 'ferplus8' keeps contempt, 'fer7' drops its rows.
    """
    from pathlib import Path

    p = Path(path)
    if labels:
        if p.is_dir():
            raise DataError(f"{p}: FER+ labels ({labels}) join FER2013 CSV rows by position; an image folder has "
                            f"no such order: pass the FER2013 CSV as the data")
        return attach_ferplus(load_fer2013_csv(p, "fer7", skip_bad_rows=skip_bad_rows), labels, label_mode,
                              label_set)
    if p.is_dir():
        return load_image_folder(p, label_set)
    return load_fer2013_csv(p, label_set, skip_bad_rows=skip_bad_rows)
