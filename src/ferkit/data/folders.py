"""Read image-folder trees: `root/<split>/<class>/*.png|jpg|jpeg|bmp` (the Kaggle re-packaging of FER2013).

Split folders: `train`/`training` -> Training, `val`/`valid`/`validation`/`public`/`publictest` -> PublicTest,
`test`/`private`/`privatetest` -> PrivateTest (case-insensitive; the canonical names work too).
Class folders: the label set's class names, case-insensitive, plus common aliases (`anger`, `happiness`,
`sadness`, `surprised`, ...). A folder of a FER2013 class that the label set leaves out (`disgust` under
'fer6') is skipped and counted; any other folder name is an error.

Every image is decoded and converted to 8-bit grayscale as prediction does it (ferkit.data.pixels: the same
pixel-count guard, checked before decoding, and the same errors) and resized to 48x48 when it is another size.
Files are read in natural sort order of their path relative to root (`im2.png` before `im10.png`), so loads are
deterministic; `FaceData.rows` is that running index and `FaceData.sha256` hashes the relative paths and
bytes of every image file in the tree, so a manifest can name the data.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ferkit.data.dataset import SPLITS, DataError, FaceData, canonical_split
from ferkit.data.labels import FER2013_NAMES, LabelSet, get_label_set

IMAGE_SIDE = 48
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Alternative class-folder names seen in FER re-packagings -> FER2013 class name.
CLASS_ALIASES: dict[str, str] = {
    "anger": "angry", "disgusted": "disgust", "fearful": "fear", "scared": "fear", "happiness": "happy",
    "sadness": "sad", "surprised": "surprise",
}


def load_image_folder(root: str | os.PathLike, label_set: str | LabelSet = "fer7") -> FaceData:
    """Load `root/<split>/<class>/<image>` into a `FaceData` (see the module docstring for the rules)."""
    root = Path(root)
    labels = get_label_set(label_set)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    class_index = {name: i for i, name in enumerate(labels.classes)}

    entries: list[tuple[Path, str, int]] = []  # (file, split, class index or -1 for a skipped class)
    split_dirs = _split_dirs(root)
    for split_dir, split in split_dirs:
        for class_dir in _sorted_dirs(split_dir):
            name = class_dir.name.lower()
            name = CLASS_ALIASES.get(name, name)
            if name not in FER2013_NAMES:
                raise DataError(
                    f"{class_dir}: unknown class directory {class_dir.name!r}; expected one of "
                    f"{list(labels.classes)} (case-insensitive; aliases {sorted(CLASS_ALIASES)})")
            cls = class_index.get(name, -1)
            entries.extend((f, split, cls) for f in _image_files(class_dir))

    entries.sort(key=lambda e: _natural_key(e[0].relative_to(root).as_posix()))
    digest = hashlib.sha256()
    images: list[np.ndarray] = []
    targets: list[int] = []
    usage: list[str] = []
    skipped = 0
    for path, split, cls in entries:
        rel = path.relative_to(root).as_posix().encode()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from e
        digest.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little"))
        digest.update(data)
        if cls < 0:
            skipped += 1
            continue
        images.append(_decode(path, data))
        targets.append(cls)
        usage.append(split)

    skipped_counts = {f"images of classes outside label set {labels.name}": skipped} if skipped else {}
    if not images:
        found = f"only {skipped} images of classes outside label set {labels.name}" if skipped else "no images"
        raise DataError(f"{root}: {found}; expected {root}/<split>/<class>/*{'|'.join(IMAGE_SUFFIXES)} with "
                        f"split folders {_split_help()} and class folders {list(labels.classes)}")
    return FaceData(
        images=np.stack(images), labels=np.asarray(targets, dtype=np.int64), usage=np.asarray(usage),
        rows=np.arange(len(images), dtype=np.int64), label_set=labels, source=str(root),
        sha256=digest.hexdigest(), skipped=skipped_counts,
    )


def _split_help() -> str:
    return "train, val (or validation/publictest), test (or the canonical " + "/".join(SPLITS) + ")"


def _split_dirs(root: Path) -> list[tuple[Path, str]]:
    dirs = _sorted_dirs(root)
    found, unknown = [], []
    for d in dirs:
        try:
            found.append((d, canonical_split(d.name)))
        except ValueError:
            unknown.append(d.name)
    if not found:
        hint = ""
        if any(CLASS_ALIASES.get(n.lower(), n.lower()) in FER2013_NAMES for n in unknown):
            hint = " (it holds class folders: point at the folder above it, or add a split level)"
        raise DataError(f"{root}: no split directories{hint}; expected {_split_help()}, found {unknown}")
    if unknown:
        raise DataError(f"{root}: unknown split directories {unknown}; expected {_split_help()}")
    return found


def _sorted_dirs(parent: Path) -> list[Path]:
    """Sub-directories, hidden ones (`.git`, `__MACOSX`) left out, in sorted order."""
    try:
        children = list(parent.iterdir())
    except OSError as e:
        raise DataError(f"{parent}: cannot list directory ({e})") from e
    return sorted((c for c in children if c.is_dir() and not c.name.startswith((".", "__"))),
                  key=lambda c: _natural_key(c.name))


def _image_files(class_dir: Path) -> list[Path]:
    try:
        return [f for f in class_dir.iterdir()
                if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()]
    except OSError as e:
        raise DataError(f"{class_dir}: cannot list directory ({e})") from e


def _natural_key(text: str) -> tuple:
    """'train/happy/im10.png' sorts after 'train/happy/im2.png'; ties fall back to the plain string."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def _decode(path: Path, data: bytes) -> np.ndarray:
    # The same decoder as prediction (ferkit.data.pixels): the same pixels (16-bit scaled, alpha on white, EXIF
    # orientation applied), the same pixel-count guard before decoding, every decoder failure named.
    # Imported here: `import ferkit.data` stays light.
    from PIL import Image

    from ferkit.data.pixels import ImageError, decode_image

    try:
        gray = decode_image(data, str(path), gray=True)
    except ImageError as e:
        raise DataError(f"{path}: cannot read image ({e.reason})") from None
    if gray.shape != (IMAGE_SIDE, IMAGE_SIDE):
        gray = np.asarray(Image.fromarray(gray).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR))
    return gray
