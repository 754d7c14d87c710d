"""The decoded-array cache of the FER2013 loader: a damaged cache is detected and rebuilt, never trusted, and a
failed write leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_rows, write_csv

from ferkit.data import FaceData, load_fer2013_csv
from ferkit.data import fer2013 as fer2013_module


def _same(a: FaceData, b: FaceData) -> bool:
    return (np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.usage, b.usage) and np.array_equal(a.rows, b.rows))


def _truncate(cache: Path) -> None:
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])


def _flip_a_pixel_byte(cache: Path) -> None:
    data = bytearray(cache.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the images array: only the zip CRC-32 notices
    cache.write_bytes(bytes(data))


def _garbage(cache: Path) -> None:
    cache.write_bytes(b"not a cache at all")


def _inconsistent(cache: Path) -> None:  # a readable archive whose arrays do not fit together
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = arrays["images"][:3]
    np.savez(cache, **arrays)


def _out_of_range(cache: Path) -> None:
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["emotion"][0] = 9
    np.savez(cache, **arrays)


def _of_another_file(cache: Path) -> None:  # another CSV's (valid) cache under this name
    other = write_csv(cache.parent.parent / "other.csv", synthetic_rows({"Training": 5}, seed=3))
    load_fer2013_csv(other)
    (other_cache,) = [p for p in cache.parent.glob("fer2013-*.npz") if p != cache]
    other_cache.replace(cache)


def _old_format(cache: Path) -> None:  # written by the loader before the cache recorded its source
    with np.load(cache) as z:
        arrays = {k: z[k] for k in ("images", "emotion", "usage", "rows")}
    np.savez(cache, **arrays)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_pixel_byte, _garbage, _inconsistent, _out_of_range,
                                    _of_another_file, _old_format])
def test_damaged_cache_is_detected_and_rebuilt(tiny_csv: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               damage: Callable[[Path], None]) -> None:
    expected = load_fer2013_csv(tiny_csv, cache=False)
    load_fer2013_csv(tiny_csv)
    (cache,) = cache_dir.glob("fer2013-*.npz")
    damage(cache)
    assert _same(load_fer2013_csv(tiny_csv), expected)  # parsed again, not read from the damaged cache

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rebuilt cache should be used")

    monkeypatch.setattr(fer2013_module, "_parse", no_parse)
    assert _same(load_fer2013_csv(tiny_csv), expected)
    assert [p.name for p in cache_dir.iterdir()] == [cache.name]  # rebuilt in place, no temp files left


def test_failed_cache_write_leaves_no_temp_file(tiny_csv: Path, cache_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_savez = np.savez

    def disk_full(file: object, **arrays: np.ndarray) -> None:
        real_savez(file, images=arrays["images"][:1])  # part of the archive written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fer2013_module.np, "savez", disk_full)
    data = load_fer2013_csv(tiny_csv)  # caching is an optimisation: the load itself succeeds
    assert len(data) == 140
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []

    def interrupted(file: object, **arrays: np.ndarray) -> None:
        real_savez(file, images=arrays["images"][:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(fer2013_module.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not swallowed, but still cleaned up
        load_fer2013_csv(tiny_csv)
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []
