"""FER+ relabelling (Microsoft FERPlus `fer2013new.csv`): crowd votes for every FER2013 row.

The file has one row per FER2013 data row, in the same order, with the votes of 10 annotators over
`neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF` (NF = not a face).
FER+ joins FER2013 **by row position** (image names drift and repeat), so `attach_ferplus` uses
`FaceData.rows` and checks that the row counts, the row counts per split and every row's Usage agree.
The image names still pin the row order down: `load_ferplus_labels` refuses a file whose names are out of
sequence (a row deleted, duplicated or moved), see `check_name_sequence`.

Majority label: the column with the most votes, ties going to the leftmost column in file order (the
rule behind the counts in the data README). Soft labels: the vote fractions over the label set's classes.
On a tie the majority label is the leftmost FER+ column, which need not be the class `np.argmax` picks from
the soft labels (FER2013 class order): e.g. neutral 4 / anger 4 is labelled neutral, while the soft labels'
first maximum is angry.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ferkit.data.dataset import SPLITS, DataError, FaceData
from ferkit.data.fer2013 import file_sha256
from ferkit.data.labels import LabelSet, get_label_set

VOTE_COLUMNS: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                                 "contempt", "unknown", "NF")
REQUIRED_COLUMNS: tuple[str, ...] = ("Usage", "Image name", *VOTE_COLUMNS)
# FER+ emotion column -> FER2013 class name; contempt, unknown and NF have no FER2013 class.
FERPLUS_TO_FER2013: dict[str, str] = {
    "neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad", "anger": "angry",
    "disgust": "disgust", "fear": "fear",
}
# majority: the most-voted column. clear: the FER+ reference code's majority rule (microsoft/FERPlus
# `_process_data`): votes of a single annotator are dropped as outliers and the winner needs more than half of the
# rest, else the row is dropped (its test sets, behind the published FER+ accuracies). soft: majority labels plus
# the vote distribution, for training on it.
MODES = ("majority", "clear", "soft")
IMAGE_NAME = re.compile(r"fer(\d+)\.png")
# The four rows (0-based data rows) of Microsoft's fer2013new.csv (commit ae2128a) whose image name is out of
# sequence: each repeats a name that another row holds in sequence. Only this name on this row is let through.
KNOWN_STRAY_NAMES: dict[int, str] = {5274: "fer0006953.png", 5348: "fer0011785.png", 15835: "fer0008403.png",
                                     34334: "fer0033120.png"}


@dataclass
class FerPlusLabels:
    """The contents of `fer2013new.csv`, one entry per FER2013 data row.

    usage:       (N,) str split of each row.
    image_names: (N,) str FER+ image name ('' for the rows FER+ marks as not a face).
    votes:       (N, 10) int64 votes, columns in `columns` order (the file's order).
    """

    usage: np.ndarray
    image_names: np.ndarray
    votes: np.ndarray
    columns: tuple[str, ...]
    source: str = ""
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.usage)

    def is_face(self) -> np.ndarray:
        """False where FER+ says the row is not a face: NF == 10 votes, or no image name."""
        nf = self.votes[:, self.columns.index("NF")]
        return (nf < 10) & (self.image_names != "")

    def clear(self) -> np.ndarray:
        """(N,) True where the majority is clear under the FER+ reference rule: after dropping columns with a
        single vote, the most-voted column holds more than half of the remaining votes."""
        kept = np.where(self.votes > 1, self.votes, 0)
        return kept.max(axis=1) * 2 > kept.sum(axis=1)

    def majority(self) -> np.ndarray:
        """(N,) column index of the most-voted column; ties go to the leftmost column."""
        return np.argmax(self.votes, axis=1)


def load_ferplus_labels(path: str | os.PathLike) -> FerPlusLabels:
    """Read and validate `fer2013new.csv`; problems raise `DataError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if not any(header):
        raise DataError(f"{path}: empty file (expected a header line {','.join(REQUIRED_COLUMNS)})")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {missing} in header {header}")
    col = {c: header.index(c) for c in REQUIRED_COLUMNS}
    columns = tuple(sorted(VOTE_COLUMNS, key=col.__getitem__))  # the file's order decides ties

    usage: list[str] = []
    names: list[str] = []
    line_numbers: list[int] = []
    votes: list[list[int]] = []
    for fields in reader:
        line_no = reader.line_num
        if not fields or not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataError(f"{path}, line {line_no}: expected {len(header)} comma-separated fields, "
                            f"got {len(fields)}")
        use = fields[col["Usage"]].strip()
        if use not in SPLITS:
            raise DataError(f"{path}, line {line_no}: unknown Usage {use!r}; expected one of {list(SPLITS)}")
        row = []
        for c in columns:
            v = fields[col[c]].strip()
            if not (v.isascii() and v.isdigit()):
                raise DataError(f"{path}, line {line_no}: {c} votes {v!r} is not a vote count (integer >= 0)")
            row.append(int(v))
        usage.append(use)
        names.append(fields[col["Image name"]].strip())
        votes.append(row)
        line_numbers.append(line_no)
    if not votes:
        raise DataError(f"{path}: no data rows after the header")
    check_name_sequence(names, line_numbers, str(path))
    return FerPlusLabels(usage=np.asarray(usage), image_names=np.asarray(names),
                         votes=np.asarray(votes, dtype=np.int64), columns=columns, source=str(path),
                         sha256=file_sha256(path))


def check_name_sequence(names: list[str], line_numbers: list[int], where: str) -> None:
    """Refuse rows deleted, duplicated or moved, as far as the FER+ image names can tell.

    FER+ numbered its images in row order, so in the real file (all 35,714 named rows) a named row is
    `fer<N>.png` and, between two named rows k rows apart, N rises by at least 1 and at most k (a row without a
    name in between may or may not have used up a number); the first named row's N is at most its row index.
    The only exceptions are the four `KNOWN_STRAY_NAMES`. A deleted named row makes the next name jump by 2
    over 1 row, a duplicated row repeats its N: the error names the first line out of sequence, where the
    labels start to shift.
    """
    prev_row, prev_num, prev = -1, -1, ""
    for row, name in enumerate(names):
        if not name or KNOWN_STRAY_NAMES.get(row) == name:
            continue
        match = IMAGE_NAME.fullmatch(name)
        if match is None:
            raise DataError(f"{where}, line {line_numbers[row]}: image name {name!r} is not fer<number>.png")
        num = int(match.group(1))
        if not 1 <= num - prev_num <= row - prev_row:
            after = f"after {prev!r} on line {line_numbers[prev_row]}" if prev else "on the first named row"
            raise DataError(
                f"{where}, line {line_numbers[row]}: image name {name!r} is out of sequence: expected "
                f"fer<N>.png with N in {prev_num + 1}..{prev_num + row - prev_row} {after}; a row was deleted, "
                f"duplicated or moved here, which would shift every label below it")
        prev_row, prev_num, prev = row, num, name


def attach_ferplus(
    data: FaceData,
    ferplus_path: str | os.PathLike | FerPlusLabels,
    mode: str = "majority",
    label_set: str | LabelSet | None = None,
) -> FaceData:
    """Replace FER2013 labels by FER+ labels, joining by row position (`data.rows`).

    `data` must be the complete load of the FER2013 CSV the FER+ file describes (attach first, split
    after): the FER+ row count must equal the CSV's row count (`len(data)` plus every row counted in
    `data.skipped`), and each row's Usage must agree. Rows are dropped, and counted in `skipped`, when
    FER+ says they are not a face, or their majority is unknown, NF or a class outside the label set (contempt
    unless the set has it, as ferplus8 does); `dropped_per_split` counts the dropped rows of each split.
    mode 'majority': `labels` = the majority class. mode 'clear': the same, keeping only rows with a clear
    majority (`FerPlusLabels.clear`; the FER+ protocol). mode 'soft': additionally `soft_labels` = vote
    fractions over the label set's classes (renormalized); `labels` stays the majority class, one of the soft
    labels' maxima but on a tie not necessarily `np.argmax`'s (ties follow the FER+ column order).
    `label_set` defaults to `data.label_set`; pass one to relabel into another set (e.g. load 'fer7',
    attach with 'fer6', so rows FER2013 called disgust can still be used when FER+ disagrees).
    """
    if mode not in MODES:
        raise ValueError(f"unknown FER+ mode {mode!r}; choose one of {list(MODES)}")
    labels = get_label_set(label_set if label_set is not None else data.label_set)
    fp = ferplus_path if isinstance(ferplus_path, FerPlusLabels) else load_ferplus_labels(ferplus_path)
    where = fp.source or "FER+ labels"
    if data.source and Path(data.source).is_dir():
        raise DataError(f"{data.source}: FER+ labels join FER2013 CSV rows by position, and an image folder "
                        f"has no FER2013 row order; load the FER2013 CSV instead")
    source_rows = len(data) + sum(data.skipped.values())
    if len(fp) != source_rows or (len(data) and int(data.rows.max()) >= len(fp)):
        raise DataError(
            f"{where} has {len(fp)} data rows but {data.source or 'the data'} has {source_rows} "
            f"({len(data)} loaded + {sum(data.skipped.values())} skipped); FER+ joins FER2013 by row "
            f"position, so they must describe the same file (attach FER+ to the complete CSV before splitting)")
    if not data.skipped:  # a complete load knows every row's split: compare the split sizes first
        for split in SPLITS:
            n_fp, n_data = int((fp.usage == split).sum()), int((data.usage == split).sum())
            if n_fp != n_data:
                raise DataError(f"{where} has {n_fp} {split} rows but {data.source or 'the data'} has {n_data}; "
                                f"the files do not line up")
    rows = data.rows
    mismatch = np.flatnonzero(fp.usage[rows] != data.usage)
    if len(mismatch):
        i = int(mismatch[0])
        raise DataError(
            f"{where}, line {int(rows[i]) + 2}: Usage {str(fp.usage[rows[i]])!r} but {data.source or 'the data'} "
            f"row {int(rows[i])} is {str(data.usage[i])!r} ({len(mismatch)} rows disagree); the files do not line up")

    votes = fp.votes[rows]
    majority = fp.majority()[rows]
    class_of_column = np.array([labels.classes.index(class_name(c)) if class_name(c) in labels.classes else -1
                                for c in fp.columns])
    face = fp.is_face()[rows] & (votes.sum(axis=1) > 0)
    cls = class_of_column[majority]
    keep = face & (cls >= 0)
    unclear = keep & ~fp.clear()[rows] if mode == "clear" else np.zeros_like(keep)
    keep &= ~unclear

    skipped = dict(data.skipped)
    reasons: Counter[str] = Counter()
    reasons["not a face (FER+ NF=10 or no image name)"] = int((~face).sum())
    for j, c in enumerate(fp.columns):
        n = int((face & (cls < 0) & (majority == j)).sum())
        if c in FERPLUS_TO_FER2013:
            reasons[f"FER+ majority {c} outside label set {labels.name}"] = n
        else:
            reasons[f"FER+ majority {c}"] = n
    reasons["no clear FER+ majority (over half the votes, single votes left out)"] = int(unclear.sum())
    skipped.update({why: n for why, n in reasons.items() if n})
    dropped = {split: int(((data.usage == split) & ~keep).sum()) for split in SPLITS}

    soft = None
    if mode == "soft":
        in_set = class_of_column >= 0
        kept_votes = votes[keep][:, in_set].astype(np.float64)
        soft = np.zeros((len(kept_votes), labels.num_classes), dtype=np.float64)
        soft[:, class_of_column[in_set]] = kept_votes
        soft = (soft / soft.sum(axis=1, keepdims=True)).astype(np.float32)
    out = data.subset(keep)
    tag = hashlib.sha256(f"{data.sha256}+ferplus:{fp.sha256}:{mode}:{labels.name}".encode()).hexdigest()
    return replace(out, labels=cls[keep].astype(np.int64), label_set=labels, soft_labels=soft, skipped=skipped,
                   source=f"{data.source} + FER+ {fp.source} ({mode})", sha256=tag,
                   dropped_per_split={k: n + data.dropped_per_split.get(k, 0) for k, n in dropped.items()})


def class_name(column: str) -> str:
    """The ferkit class a FER+ vote column stands for: FER2013's name, or the column's own (contempt, unknown,
    NF: only a label set that has such a class, e.g. ferplus8's contempt, keeps its rows)."""
    return FERPLUS_TO_FER2013.get(column, column)
