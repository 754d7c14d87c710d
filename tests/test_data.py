"""Data layer: the strict FER2013 CSV loader, its cache, image-folder trees and FER+ labels.

Synthetic files keep these tests tiny; the tests under `TestRealData*` use the real files beside the repo
(/work/shared/data) and skip when they are absent.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, REAL_FERPLUS, synthetic_rows, write_csv
from PIL import Image

from ferkit.data import (
    DataError,
    FaceData,
    attach_ferplus,
    load_dataset,
    load_fer2013_csv,
    load_ferplus_labels,
    load_image_folder,
)
from ferkit.data import fer2013 as fer2013_module

# ---------------------------------------------------------------------------------------------- CSV loader


def pixels_of(row: tuple) -> np.ndarray:
    return np.array(row[1].split(), dtype=np.uint8).reshape(48, 48)


def test_valid_csv_loads_with_right_shapes_splits_and_labels(tiny_csv: Path) -> None:
    data = load_fer2013_csv(tiny_csv)
    rows = synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35})
    assert isinstance(data, FaceData) and len(data) == 140
    assert data.images.shape == (140, 48, 48) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [r[0] for r in rows]
    assert data.usage.tolist() == [r[2] for r in rows]
    assert data.rows.tolist() == list(range(140))
    assert np.array_equal(data.images[0], pixels_of(rows[0]))
    assert np.array_equal(data.images[-1], pixels_of(rows[-1]))  # past the first 128-row parse chunk
    assert data.label_set.name == "fer7" and data.skipped == {}
    assert data.source == str(tiny_csv) and len(data.sha256) == 64
    assert data.class_counts().tolist() == [20] * 7


def test_split_aliases(tiny_csv: Path) -> None:
    data = load_fer2013_csv(tiny_csv)
    assert len(data.split("train")) == len(data.split("Training")) == 70
    assert len(data.split("val")) == len(data.split("validation")) == len(data.split("PublicTest")) == 35
    assert len(data.split("test")) == len(data.split("PrivateTest")) == 35
    assert set(data.split("val").usage) == {"PublicTest"}
    with pytest.raises(ValueError, match="unknown split"):
        data.split("holdout")


def test_gz_and_plain_give_identical_arrays(tmp_path: Path, cache_dir: Path) -> None:
    rows = synthetic_rows({"Training": 8, "PublicTest": 3, "PrivateTest": 3}, seed=1)
    plain = load_fer2013_csv(write_csv(tmp_path / "f.csv", rows))
    gz = load_fer2013_csv(write_csv(tmp_path / "f.csv.gz", rows, gz=True))
    for name in ("images", "labels", "usage", "rows"):
        assert np.array_equal(getattr(plain, name), getattr(gz, name)), name
    assert plain.sha256 != gz.sha256  # each names its own file


def test_crlf_quotes_and_blank_lines_are_accepted(tmp_path: Path, cache_dir: Path) -> None:
    rows = synthetic_rows({"Training": 3}, seed=2)
    text = "emotion,pixels,Usage\r\n" + "".join(f'{e},"{p}",{u}\r\n\r\n' for e, p, u in rows)
    (tmp_path / "crlf.csv").write_text(text)
    data = load_fer2013_csv(tmp_path / "crlf.csv")
    assert len(data) == 3 and np.array_equal(data.images[2], pixels_of(rows[2]))


def test_leading_zero_pixels_parse_like_their_value(tmp_path: Path, cache_dir: Path) -> None:
    rows = synthetic_rows({"Training": 3}, seed=3)
    tokens = rows[1][1].split()
    tokens[:3] = ["0255", "007", "0"]
    rows[1] = (rows[1][0], " ".join(tokens), rows[1][2])
    data = load_fer2013_csv(write_csv(tmp_path / "zeros.csv", rows))
    assert data.images[1].ravel()[:3].tolist() == [255, 7, 0]
    assert np.array_equal(data.images[0], pixels_of(rows[0]))


def _replace_pixel(row: tuple, value: str) -> tuple:
    tokens = row[1].split()
    tokens[100] = value
    return (row[0], " ".join(tokens), row[2])


# (id, how the bad row is made from a good one, message fragment, skipped reason)
BAD_ROWS = [
    ("too-few-pixels", lambda r: (r[0], " ".join(r[1].split()[:-1]), r[2]), "got 2303", "bad pixels"),
    ("too-many-pixels", lambda r: (r[0], r[1] + " 7", r[2]), "got 2305", "bad pixels"),
    ("double-space", lambda r: (r[0], r[1].replace(" ", "  ", 1), r[2]), "two spaces", "bad pixels"),
    ("float-pixel", lambda r: _replace_pixel(r, "12.5"), "'12.5' is not an integer", "bad pixels"),
    ("text-pixel", lambda r: _replace_pixel(r, "abc"), "'abc' is not an integer", "bad pixels"),
    ("pixel-256", lambda r: _replace_pixel(r, "256"), "256 is out of range", "bad pixels"),
    ("pixel-negative", lambda r: _replace_pixel(r, "-1"), "'-1' is not an integer", "bad pixels"),
    ("no-pixels", lambda r: (r[0], "", r[2]), "no pixel values", "bad pixels"),
    ("emotion-7", lambda r: (7, r[1], r[2]), "emotion '7'", "emotion out of range"),
    ("emotion-negative", lambda r: (-1, r[1], r[2]), "emotion '-1'", "emotion out of range"),
    ("emotion-text", lambda r: ("x", r[1], r[2]), "emotion 'x'", "emotion out of range"),
    ("unknown-usage", lambda r: (r[0], r[1], "Holdout"), "unknown Usage 'Holdout'", "unknown Usage"),
    ("extra-field", lambda r: (r[0], r[1], r[2], "extra"), "got 4", "wrong number of fields"),
    ("missing-field", lambda r: (r[0], r[1]), "got 2", "wrong number of fields"),
]


@pytest.mark.parametrize("make_bad, fragment, reason", [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS])
@pytest.mark.parametrize("bad_index", [2, 5])  # a middle row, and the last row
def test_bad_row_raises_with_file_and_line(tmp_path: Path, cache_dir: Path, make_bad, fragment: str,
                                           reason: str, bad_index: int) -> None:
    rows = synthetic_rows({"Training": 4, "PublicTest": 2}, seed=4)
    rows[bad_index] = make_bad(rows[bad_index])
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as err:
        load_fer2013_csv(path)
    message = str(err.value)
    assert str(path) in message and f"line {bad_index + 2}:" in message and fragment in message, message
    assert not list(cache_dir.glob("*.npz"))  # a bad file is never cached

    data = load_fer2013_csv(path, skip_bad_rows=True)
    assert data.skipped == {reason: 1}
    assert len(data) == 5 and bad_index not in data.rows.tolist()
    good = [i for i in range(6) if i != bad_index]
    assert data.rows.tolist() == good
    assert np.array_equal(data.images[-1], pixels_of(rows[good[-1]]))
    assert not list(cache_dir.glob("*.npz"))
    with pytest.raises(DataError):  # still strict afterwards: nothing was cached
        load_fer2013_csv(path)


def test_line_numbers_count_blank_lines(tmp_path: Path, cache_dir: Path) -> None:
    rows = synthetic_rows({"Training": 3}, seed=5)
    lines = ["emotion,pixels,Usage", ",".join(map(str, rows[0])), "", ",".join(map(str, rows[1])),
             f"9,{rows[2][1]},Training"]
    path = tmp_path / "blank.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"blank\.csv, line 5: emotion '9'"):
        load_fer2013_csv(path)


def test_skip_bad_rows_counts_every_reason(tmp_path: Path, cache_dir: Path) -> None:
    rows = synthetic_rows({"Training": len(BAD_ROWS) + 3}, seed=6)
    for i, (_, make_bad, _, _) in enumerate(BAD_ROWS):
        rows[i] = make_bad(rows[i])
    path = write_csv(tmp_path / "many.csv", rows)
    data = load_fer2013_csv(path, skip_bad_rows=True)
    expected: dict[str, int] = {}
    for *_, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert data.skipped == expected
    assert data.rows.tolist() == list(range(len(BAD_ROWS), len(BAD_ROWS) + 3))


@pytest.mark.parametrize("content, fragment", [
    ("", "empty file"),
    ("\n\n", "empty file"),
    ("emotion,pixels,Usage\n", "no data rows"),
    ("emotion,Usage\n3,Training\n", "line 1: missing column(s) ['pixels']"),
    ("emotion;pixels;Usage\n", "line 1: missing column(s)"),
])
@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_file_level_problems_always_raise(tmp_path: Path, cache_dir: Path, content: str, fragment: str,
                                          skip_bad_rows: bool) -> None:
    path = tmp_path / "broken.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_fer2013_csv(path, skip_bad_rows=skip_bad_rows)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_missing_and_corrupt_files(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_fer2013_csv(tmp_path / "absent.csv")
    full = write_csv(tmp_path / "t.csv.gz", synthetic_rows({"Training": 2}), gz=True).read_bytes()
    (tmp_path / "trunc.csv.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"trunc\.csv\.gz: cannot read"):
        load_fer2013_csv(tmp_path / "trunc.csv.gz")


def test_fer6_drops_disgust_and_counts_it(tiny_csv: Path) -> None:
    fer7 = load_fer2013_csv(tiny_csv)
    fer6 = load_fer2013_csv(tiny_csv, "fer6")
    assert fer6.label_set.num_classes == 6 and "disgust" not in fer6.label_set.classes
    n_disgust = int((fer7.labels == 1).sum())
    assert n_disgust == 20 and len(fer6) == 140 - n_disgust
    assert fer6.skipped == {"rows of classes outside label set fer6": n_disgust}
    # Same faces, same class names: fer6 rows are the fer7 rows minus disgust.
    keep = fer7.labels != 1
    assert np.array_equal(fer6.rows, fer7.rows[keep]) and np.array_equal(fer6.images, fer7.images[keep])
    names6 = [fer6.label_set.classes[i] for i in fer6.labels]
    names7 = [fer7.label_set.classes[i] for i in fer7.labels[keep]]
    assert names6 == names7


def test_cache_second_load_is_equal_and_skips_parsing(tiny_csv: Path, cache_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_fer2013_csv(tiny_csv)
    cached = list(cache_dir.glob("fer2013-*.npz"))
    assert len(cached) == 1 and first.sha256[:32] in cached[0].name

    def no_parse(*args, **kwargs):
        raise AssertionError("the cached file should not be parsed again")

    monkeypatch.setattr(fer2013_module, "_parse", no_parse)
    second = load_fer2013_csv(tiny_csv)
    for name in ("images", "labels", "usage", "rows"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    assert second.sha256 == first.sha256 and second.skipped == {}
    assert len(load_fer2013_csv(tiny_csv, "fer6")) == 120  # the cache holds raw ids: any label set works


def test_load_without_cache_writes_nothing(tiny_csv: Path, cache_dir: Path) -> None:
    load_fer2013_csv(tiny_csv, cache=False)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


# ------------------------------------------------------------------------------------------- image folders


def _png(path: Path, value: int | tuple, size: tuple[int, int] = (48, 48), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    _png(root / "train" / "angry" / "im1.png", 10)
    _png(root / "train" / "angry" / "im2.png", (200, 100, 50), mode="RGB")  # RGB -> grayscale
    _png(root / "train" / "Happiness" / "im10.png", 30, size=(60, 60))  # alias + resize
    _png(root / "train" / "Happiness" / "im2.png", 40, size=(96, 64), mode="L")
    _png(root / "train" / "disgust" / "im1.png", 50)
    _png(root / "test" / "NEUTRAL" / "im1.bmp", 60)
    _png(root / "val" / "sad" / "a.jpg", 70)
    (root / "train" / "angry" / "notes.txt").write_text("not an image, ignored")
    return root


def test_image_folder_labels_splits_and_order(image_tree: Path) -> None:
    data = load_image_folder(image_tree)
    names = [data.label_set.classes[i] for i in data.labels]
    # natural order of relative paths: test/ < train/ < val/, 'Happiness' < 'angry' (case-sensitive),
    # im2 before im10
    assert names == ["neutral", "happy", "happy", "angry", "angry", "disgust", "sad"]
    assert data.usage.tolist() == ["PrivateTest"] + ["Training"] * 5 + ["PublicTest"]
    assert data.images.shape == (7, 48, 48) and data.images.dtype == np.uint8
    assert data.images[:6, 0, 0].tolist() == [60, 40, 30, 10, 124, 50]  # RGB(200,100,50) -> L 124
    assert abs(int(data.images[6, 0, 0]) - 70) <= 1  # JPEG
    assert (data.images[1] == 40).all() and (data.images[2] == 30).all()  # resized, still uniform
    assert data.rows.tolist() == list(range(7)) and data.source == str(image_tree)
    assert len(data.sha256) == 64 and data.skipped == {}
    assert len(data.split("train")) == 5 and len(data.split("val")) == 1 and len(data.split("test")) == 1


def test_image_folder_pixels_match_prediction_for_16_bit_and_alpha(tmp_path: Path) -> None:
    # A 16-bit gradient and a half-transparent RGBA face read as prediction reads them (scaled, on white),
    # not clipped to 255 / composited on black.
    from ferkit.inference.image_io import load_image, rgb_to_gray

    root = tmp_path / "faces"
    (root / "train" / "happy").mkdir(parents=True)
    Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (48, 1))).save(
        root / "train" / "happy" / "deep.png")
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., :3], rgba[:24, :, 3] = 90, 255  # lower half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "train" / "happy" / "glass.png")
    data = load_image_folder(root)
    for face, name in zip(data.images, ["deep.png", "glass.png"], strict=True):
        expected = rgb_to_gray(load_image(root / "train" / "happy" / name, color="rgb"))
        assert np.array_equal(face, expected), name
    assert data.images[0, 0, -1] == 255 and data.images[0, 0, 0] == 0  # the full 16-bit range, scaled
    assert (data.images[1, 30:] == 255).all() and (data.images[1, :20] == 90).all()


def test_image_folder_sha256_names_the_content(image_tree: Path) -> None:
    first = load_image_folder(image_tree).sha256
    assert load_image_folder(image_tree).sha256 == first
    original = (image_tree / "test" / "NEUTRAL" / "im1.bmp").read_bytes()
    _png(image_tree / "test" / "NEUTRAL" / "im1.bmp", 61)
    assert load_image_folder(image_tree).sha256 != first
    (image_tree / "test" / "NEUTRAL" / "im1.bmp").write_bytes(original)
    assert load_image_folder(image_tree).sha256 == first
    (image_tree / "test" / "NEUTRAL" / "im1.bmp").rename(image_tree / "test" / "NEUTRAL" / "im2.bmp")
    assert load_image_folder(image_tree).sha256 != first  # names count, not only bytes


def test_image_folder_fer6_skips_disgust(image_tree: Path) -> None:
    data = load_image_folder(image_tree, "fer6")
    assert len(data) == 6 and "disgust" not in [data.label_set.classes[i] for i in data.labels]
    assert data.skipped == {"images of classes outside label set fer6": 1}


def test_image_folder_canonical_split_names_and_load_dataset(tmp_path: Path) -> None:
    root = tmp_path / "canon"
    _png(root / "Training" / "fear" / "1.png", 1)
    _png(root / "PublicTest" / "surprised" / "1.png", 2)
    _png(root / "PrivateTest" / "sadness" / "1.png", 3)
    data = load_dataset(str(root))
    assert sorted(data.usage.tolist()) == ["PrivateTest", "PublicTest", "Training"]
    assert sorted(data.label_set.classes[i] for i in data.labels) == ["fear", "sad", "surprise"]


def test_image_folder_unknown_class_dir(image_tree: Path) -> None:
    (image_tree / "train" / "contempt").mkdir()
    with pytest.raises(DataError) as err:
        load_image_folder(image_tree)
    message = str(err.value)
    assert str(image_tree / "train" / "contempt") in message and "'contempt'" in message
    assert "neutral" in message and "angry" in message  # lists the expected names


def test_image_folder_corrupt_image_names_the_file(image_tree: Path) -> None:
    bad = image_tree / "train" / "angry" / "im3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"im3\.png: cannot read image"):
        load_image_folder(image_tree)


def test_image_folder_structural_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_image_folder(tmp_path / "absent")
    flat = tmp_path / "flat"
    _png(flat / "happy" / "1.png", 1)  # class folders without a split level
    with pytest.raises(DataError, match="no split directories.*class folders"):
        load_image_folder(flat)
    empty = tmp_path / "empty"
    (empty / "train" / "happy").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"{empty}: no images")):
        load_image_folder(empty)
    only_disgust = tmp_path / "only_disgust"
    _png(only_disgust / "train" / "disgust" / "1.png", 1)
    with pytest.raises(DataError, match="only 1 images of classes outside label set fer6"):
        load_image_folder(only_disgust, "fer6")
    odd = tmp_path / "odd"
    _png(odd / "train" / "happy" / "1.png", 1)
    (odd / "extra").mkdir()
    with pytest.raises(DataError, match=r"unknown split directories \['extra'\]"):
        load_image_folder(odd)


# ---------------------------------------------------------------------------------------------- FER+ labels

FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
FERPLUS_ROWS = [
    "Training,fer0.png,1,6,0,0,0,0,3,0,0,0",  # happiness
    "Training,fer1.png,4,0,0,0,4,0,0,2,0,0",  # neutral/anger tie -> neutral (leftmost)
    "Training,,0,0,0,0,0,0,0,0,0,10",  # not a face
    "Training,fer3.png,2,0,0,0,0,0,0,5,3,0",  # contempt
    "PublicTest,fer4.png,0,0,3,0,0,3,0,0,0,4",  # NF majority
    "PrivateTest,fer5.png,0,0,0,5,0,5,0,0,0,0",  # sadness/disgust tie -> sadness
    "PrivateTest,fer6.png,0,0,0,0,0,7,3,0,0,0",  # disgust
]


@pytest.fixture
def ferplus_pair(tmp_path: Path, cache_dir: Path) -> tuple[Path, Path]:
    csv_path = write_csv(tmp_path / "fer2013.csv", synthetic_rows({"Training": 4, "PublicTest": 1,
                                                                   "PrivateTest": 2}, seed=7))
    fp_path = tmp_path / "fer2013new.csv"
    fp_path.write_text(FERPLUS_HEADER + "\n" + "\n".join(FERPLUS_ROWS) + "\n")
    return csv_path, fp_path


def _names(data: FaceData) -> list[str]:
    return [data.label_set.classes[i] for i in data.labels]


def test_ferplus_labels_file(ferplus_pair: tuple[Path, Path]) -> None:
    fp = load_ferplus_labels(ferplus_pair[1])
    assert len(fp) == 7 and fp.votes.shape == (7, 10) and fp.columns[0] == "neutral"
    assert fp.image_names[2] == "" and fp.is_face().tolist() == [True, True, False, True, True, True, True]
    assert [fp.columns[j] for j in fp.majority()] == ["happiness", "neutral", "NF", "contempt", "NF",
                                                      "sadness", "disgust"]


def test_ferplus_majority_ties_and_dropped_rows(ferplus_pair: tuple[Path, Path]) -> None:
    csv_path, fp_path = ferplus_pair
    data = attach_ferplus(load_fer2013_csv(csv_path), fp_path)
    assert data.rows.tolist() == [0, 1, 5, 6]
    assert _names(data) == ["happy", "neutral", "sad", "disgust"]
    assert data.usage.tolist() == ["Training", "Training", "PrivateTest", "PrivateTest"]
    assert data.soft_labels is None
    assert data.skipped == {"not a face (FER+ NF=10 or no image name)": 1, "FER+ majority contempt": 1,
                            "FER+ majority NF": 1}
    original = load_fer2013_csv(csv_path)
    assert np.array_equal(data.images, original.images[[0, 1, 5, 6]])
    assert len(data.sha256) == 64 and data.sha256 != original.sha256  # FER+ labels are other data


def test_ferplus_ties_follow_file_column_order(ferplus_pair: tuple[Path, Path], tmp_path: Path) -> None:
    csv_path, _ = ferplus_pair
    # Same votes, anger moved before neutral: the neutral/anger tie of row 1 now goes to anger.
    cols = FERPLUS_HEADER.split(",")
    order = [0, 1, 6, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    lines = [",".join(cols[k] for k in order)] + [",".join(r.split(",")[k] for k in order) for r in FERPLUS_ROWS]
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join(lines) + "\n")
    data = attach_ferplus(load_fer2013_csv(csv_path), swapped)
    assert _names(data) == ["happy", "angry", "sad", "disgust"]


def test_ferplus_soft_labels(ferplus_pair: tuple[Path, Path]) -> None:
    csv_path, fp_path = ferplus_pair
    data = attach_ferplus(load_fer2013_csv(csv_path), fp_path, mode="soft")
    soft = data.soft_labels
    assert soft is not None and soft.shape == (4, 7) and soft.dtype == np.float32
    assert np.allclose(soft.sum(axis=1), 1.0)
    classes = data.label_set.classes
    assert np.allclose(soft[0], [0, 0, 0.3, 0.6, 0, 0, 0.1])  # fear 3, happiness 6, neutral 1
    assert soft[1][classes.index("neutral")] == pytest.approx(0.5)  # contempt's 2 votes renormalized away
    assert soft[1][classes.index("angry")] == pytest.approx(0.5)
    assert _names(data) == ["happy", "neutral", "sad", "disgust"]  # labels = the majority (FER+ ties)
    assert all(soft[i, data.labels[i]] == soft[i].max() for i in range(len(data)))
    split = data.split("test")  # soft labels follow subsets
    assert split.soft_labels is not None and split.soft_labels.shape == (2, 7)


def test_ferplus_into_fer6(ferplus_pair: tuple[Path, Path]) -> None:
    csv_path, fp_path = ferplus_pair
    # fer7 data relabelled into fer6: the FER+ disgust row is dropped, disgust votes renormalized away.
    data = attach_ferplus(load_fer2013_csv(csv_path), fp_path, mode="soft", label_set="fer6")
    assert data.label_set.name == "fer6" and _names(data) == ["happy", "neutral", "sad"]
    assert data.skipped["FER+ majority disgust outside label set fer6"] == 1
    assert np.allclose(data.soft_labels[2], np.eye(6)[data.label_set.classes.index("sad")])
    # A fer6 load (FER2013 disgust rows already dropped and counted) still lines up row for row.
    fer6 = attach_ferplus(load_fer2013_csv(csv_path, "fer6"), fp_path)
    assert fer6.skipped["rows of classes outside label set fer6"] == 2  # FER2013 disgust: rows 1 and 6
    assert fer6.rows.tolist() == [0, 5]


def test_ferplus_validation_errors(ferplus_pair: tuple[Path, Path], tmp_path: Path) -> None:
    csv_path, fp_path = ferplus_pair
    data = load_fer2013_csv(csv_path)
    short = tmp_path / "short.csv"
    short.write_text(FERPLUS_HEADER + "\n" + "\n".join(FERPLUS_ROWS[:-1]) + "\n")
    with pytest.raises(DataError, match=r"short\.csv has 6 data rows but .* has 7"):
        attach_ferplus(data, short)
    with pytest.raises(DataError, match=r"has 7 data rows but .* has 4 \(4 loaded \+ 0 skipped\)"):
        attach_ferplus(data.split("train"), fp_path)  # attach before splitting
    shifted = tmp_path / "shifted.csv"  # rows rotated by one, image names left in place (those are checked below)
    rotated = FERPLUS_ROWS[1:] + FERPLUS_ROWS[:1]
    shifted.write_text(FERPLUS_HEADER + "\n" + "\n".join(
        _with_name(r, orig.split(",")[1]) for r, orig in zip(rotated, FERPLUS_ROWS, strict=True)) + "\n")
    with pytest.raises(DataError, match=r"shifted\.csv, line 5: Usage 'PublicTest'.*do not line up"):
        attach_ferplus(data, shifted)
    no_nf = tmp_path / "no_nf.csv"
    no_nf.write_text(FERPLUS_HEADER.replace(",NF", "") + "\n")
    with pytest.raises(DataError, match=r"no_nf\.csv, line 1: missing column\(s\) \['NF'\]"):
        load_ferplus_labels(no_nf)
    bad_vote = tmp_path / "bad_vote.csv"
    bad_vote.write_text(FERPLUS_HEADER + "\n" + FERPLUS_ROWS[0] + "\n" + FERPLUS_ROWS[1].replace(",4,", ",x,", 1))
    with pytest.raises(DataError, match=r"bad_vote\.csv, line 3: neutral votes 'x'"):
        load_ferplus_labels(bad_vote)
    with pytest.raises(ValueError, match="unknown FER\\+ mode"):
        attach_ferplus(data, fp_path, mode="vote")


def _with_name(row: str, name: str) -> str:
    fields = row.split(",")
    return ",".join([fields[0], name, *fields[2:]])


def _ferplus_file(path: Path, usages: list[str], names: list[str]) -> Path:
    """A FER+ file with these Usage values and image names, everyone voting happiness."""
    path.write_text(FERPLUS_HEADER + "\n" + "".join(f"{u},{n},0,10,0,0,0,0,0,0,0,0\n" for u, n in
                                                     zip(usages, names, strict=True)))
    return path


def test_ferplus_row_deleted_and_another_duplicated_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    # Same row count, same Usage on every row: only the image names show that rows 3..5 got the labels of 4..6.
    names = [f"fer{i:07d}.png" for i in range(10)]
    names[7] = ""  # a not-a-face row (which used up a number) inside the stretch, as in the real file
    usages = ["Training"] * 10
    fine = _ferplus_file(tmp_path / "fine.csv", usages, names)
    tampered = names[:3] + names[4:6] + [names[5]] + names[6:]  # delete row 3, duplicate row 5
    bad = _ferplus_file(tmp_path / "tampered.csv", usages, tampered)
    data = load_fer2013_csv(write_csv(tmp_path / "fer2013.csv", synthetic_rows({"Training": 10})))
    assert len(attach_ferplus(data, fine)) == 9
    for attempt in (lambda: load_ferplus_labels(bad), lambda: attach_ferplus(data, bad)):
        with pytest.raises(DataError, match=r"tampered\.csv, line 5: image name 'fer0000004\.png' is out of "
                                            r"sequence: expected .* N in 3\.\.3 after 'fer0000002\.png' on line 4"):
            attempt()
    # The duplicate first, the deletion further down: the duplicate's line is the first bad one.
    dup_first = _ferplus_file(tmp_path / "dup_first.csv", usages, names[:3] + [names[2]] + names[3:8] + names[9:])
    with pytest.raises(DataError, match=r"dup_first\.csv, line 5: image name 'fer0000002\.png'"):
        load_ferplus_labels(dup_first)
    wrong_form = _ferplus_file(tmp_path / "wrong_form.csv", usages[:2], ["fer0000000.png", "face1.jpg"])
    with pytest.raises(DataError, match=r"wrong_form\.csv, line 3: image name 'face1\.jpg' is not fer<number>\.png"):
        load_ferplus_labels(wrong_form)
    late_start = _ferplus_file(tmp_path / "late_start.csv", usages[:2], ["", "fer0000002.png"])  # N > row index
    with pytest.raises(DataError, match=r"line 3: .*N in 0\.\.1 on the first named row"):
        load_ferplus_labels(late_start)


def test_ferplus_split_sizes_must_match(tmp_path: Path, cache_dir: Path) -> None:
    data = load_fer2013_csv(write_csv(tmp_path / "fer2013.csv", synthetic_rows({"Training": 3, "PublicTest": 2})))
    names = [f"fer{i}.png" for i in range(5)]
    moved = _ferplus_file(tmp_path / "moved.csv", ["Training"] * 4 + ["PublicTest"], names)
    with pytest.raises(DataError, match=r"moved\.csv has 4 Training rows but .*fer2013\.csv has 3"):
        attach_ferplus(data, moved)


def test_ferplus_tie_labels_the_leftmost_column_not_argmax_of_soft(ferplus_pair: tuple[Path, Path]) -> None:
    # Row 1 votes neutral 4 / anger 4: the majority (FER+ column order) is neutral, while the soft labels'
    # first maximum in FER2013 class order is angry. `labels` keeps the documented majority rule.
    data = attach_ferplus(load_fer2013_csv(ferplus_pair[0]), ferplus_pair[1], mode="soft")
    classes = data.label_set.classes
    assert data.rows[1] == 1 and classes[data.labels[1]] == "neutral"
    assert classes[int(np.argmax(data.soft_labels[1]))] == "angry"
    assert data.soft_labels[1, data.labels[1]] == data.soft_labels[1].max()
    assert np.array_equal(attach_ferplus(load_fer2013_csv(ferplus_pair[0]), ferplus_pair[1]).labels, data.labels)


def test_ferplus_rejects_image_folders(image_tree: Path, ferplus_pair: tuple[Path, Path]) -> None:
    with pytest.raises(DataError, match="image folder has no FER2013 row order"):
        attach_ferplus(load_image_folder(image_tree), ferplus_pair[1])


# --------------------------------------------------------------- real data (skip when the files are absent)

README_COUNTS = {  # /work/shared/data/README.md: Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral
    "Training": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "PublicTest": [467, 56, 496, 895, 653, 415, 607],
    "PrivateTest": [491, 55, 528, 879, 594, 416, 626],
}
README_FERPLUS_MAJORITY = {  # the same README: majority votes per split (FER+ column names)
    "Training": {"neutral": 10309, "happiness": 7528, "surprise": 3562, "sadness": 3515, "anger": 2467,
                 "disgust": 191, "fear": 652, "contempt": 165, "unknown": 170},
    "PublicTest": {"neutral": 1335, "happiness": 899, "surprise": 456, "sadness": 412, "anger": 319,
                   "disgust": 34, "fear": 74, "contempt": 24, "unknown": 25},
    "PrivateTest": {"neutral": 1262, "happiness": 928, "surprise": 444, "sadness": 444, "anger": 325,
                    "disgust": 23, "fear": 93, "contempt": 27, "unknown": 27},
}
FERPLUS_TO_CLASS = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                    "anger": "angry", "disgust": "disgust", "fear": "fear"}


@functools.cache
def _real_fer2013() -> FaceData:
    """The real CSV, parsed once per test session (no cache: tests leave ~/.cache alone)."""
    return load_fer2013_csv(REAL_DATA, cache=False)


@pytest.fixture
def real_ferplus(real_csv: Path) -> Path:
    if not REAL_FERPLUS.is_file():
        pytest.skip(f"real FER+ labels not found at {REAL_FERPLUS}")
    return REAL_FERPLUS


class TestRealDataFER2013:
    def test_split_sizes_and_class_counts_match_readme(self, real_csv: Path) -> None:
        data = _real_fer2013()
        assert len(data) == 35887 and data.skipped == {}
        assert data.sha256 == "aee2206a1e4bdc0155d31e955aa5d747083ca7e0e89d2ba9a64ef431b3f9144a"
        sizes = {s: len(data.split(s)) for s in README_COUNTS}
        assert sizes == {"Training": 28709, "PublicTest": 3589, "PrivateTest": 3589}
        for split, counts in README_COUNTS.items():
            assert data.split(split).class_counts().tolist() == counts, split
        # Usage blocks run in file order: Training, then PublicTest, then PrivateTest.
        assert (data.usage[:28709] == "Training").all() and (data.usage[-3589:] == "PrivateTest").all()


class TestRealDataFERPlus:
    def test_labels_file(self, real_ferplus: Path) -> None:
        fp = load_ferplus_labels(real_ferplus)
        assert len(fp) == 35887 and int((fp.image_names == "").sum()) == 173
        assert np.array_equal(fp.usage, _real_fer2013().usage)  # the two files line up row by row
        # The name invariant `check_name_sequence` enforces holds on the real file: 35,714 names, 57 of them
        # equal to fer<row index> (the drift starts at row 60), four stray repeats.
        named = fp.image_names[fp.image_names != ""]
        assert len(named) == 35714 and len(set(named.tolist())) == 35710
        assert sum(n == f"fer{i:07d}.png" for i, n in enumerate(fp.image_names)) == 57

    def test_name_check_refuses_a_real_row_deleted_and_another_duplicated(self, real_ferplus: Path,
                                                                          tmp_path: Path) -> None:
        lines = real_ferplus.read_text().splitlines(keepends=True)
        del lines[1001]  # data row 1000
        lines.insert(20001, lines[20000])  # data row 20000 (19,999 before the deletion) twice
        bad = tmp_path / "fer2013new.csv"
        bad.write_text("".join(lines))
        with pytest.raises(DataError, match=r"fer2013new\.csv, line 1002: image name .* is out of sequence"):
            attach_ferplus(_real_fer2013(), bad)

    def test_majority_counts_match_readme(self, real_ferplus: Path) -> None:
        data = attach_ferplus(_real_fer2013(), real_ferplus)
        for split, expected in README_FERPLUS_MAJORITY.items():
            counts = dict(zip(data.label_set.classes, data.split(split).class_counts().tolist(), strict=True))
            assert counts == {FERPLUS_TO_CLASS[c]: n for c, n in expected.items() if c in FERPLUS_TO_CLASS}, split
        train = data.split("train").class_counts()
        assert train[data.label_set.classes.index("happy")] == 7528
        assert train[data.label_set.classes.index("neutral")] == 10309
        skipped = data.skipped
        assert skipped["FER+ majority contempt"] == 216 and skipped["FER+ majority unknown"] == 222
        not_face = skipped["not a face (FER+ NF=10 or no image name)"]
        assert not_face >= 173 and not_face + skipped.get("FER+ majority NF", 0) == 177
        assert len(data) + sum(skipped.values()) == 35887

    def test_soft_labels(self, real_ferplus: Path) -> None:
        data = attach_ferplus(_real_fer2013(), real_ferplus, mode="soft", label_set="fer6")
        assert data.soft_labels.shape == (len(data), 6)
        assert np.allclose(data.soft_labels.sum(axis=1), 1.0, atol=1e-5)
        assert np.array_equal(np.take_along_axis(data.soft_labels, data.labels[:, None], 1)[:, 0],
                              data.soft_labels.max(axis=1))
