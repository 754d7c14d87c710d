"""Image decoding shared by the image-folder loader and prediction (ferkit.data.pixels.decode_image).

Both must refuse a decompression bomb before decoding it and turn whatever a Pillow decoder raises on a corrupt
file into an error that names the file.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ferkit.data import DataError, load_image_folder
from ferkit.data.pixels import MAX_PIXELS, ImageError, decode_image
from ferkit.inference.image_io import load_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A few hundred bytes whose header declares side x side 8-bit gray pixels (an invalid, tiny data stream)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idat + _chunk(b"IEND", b"")


def corrupt_dds() -> bytes:
    """A DDS header with a FourCC no decoder knows: Pillow raises NotImplementedError on it."""
    header = struct.pack("<7I", 124, 0x1007, 48, 48, 0, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<2I4s5I", 32, 0x4, b"XXXX", 0, 0, 0, 0, 0)
    return b"DDS " + header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + b"\0" * 64


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


BAD_FILES: dict[str, tuple[bytes, str]] = {  # file name -> (content, what the error says)
    "bomb.png": (bomb_png(13_000), r"13000x13000 = 169,000,000 pixels, more than the 50,000,000-pixel limit"),
    "huge.png": (bomb_png(100_000), r"decompression-bomb"),  # over Pillow's own hard limit too
    "corrupt.png": (corrupt_dds(), r"corrupt or truncated image \(NotImplementedError: Unimplemented pixel format"),
    "cut.png": (truncated_png(), r"corrupt or truncated image"),
    "empty.png": (b"", r"empty file \(0 bytes\)"),
    "notes.jpg": (b"these are my notes, not a picture\n", r"not an image file"),
}


def _folder_with(tmp_path: Path, name: str, content: bytes) -> tuple[Path, Path]:
    root = tmp_path / "faces"
    (root / "train" / "happy").mkdir(parents=True)
    Image.new("L", (48, 48), 100).save(root / "train" / "happy" / "good.png")
    bad = root / "train" / "happy" / name
    bad.write_bytes(content)
    return root, bad


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_image_folder_names_every_bad_image(tmp_path: Path, name: str) -> None:
    content, reason = BAD_FILES[name]
    root, bad = _folder_with(tmp_path, name, content)
    with pytest.raises(DataError, match=f"{bad.name}: cannot read image .*{reason}") as err:
        load_image_folder(root)
    assert str(err.value).startswith(f"{bad}: ")


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_prediction_names_every_bad_image(tmp_path: Path, name: str) -> None:
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        load_image(path)
    assert err.value.source == str(path)


@pytest.mark.parametrize("load", [lambda p: load_image_folder(p.parents[2]), load_image],
                         ids=["folder", "prediction"])
def test_pixel_guard_runs_before_any_pixel_is_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      load: Callable[[Path], object]) -> None:
    side = 7072  # 50,013,184 pixels: just over the limit
    assert side * side > MAX_PIXELS > (side - 1) ** 2
    bomb = tmp_path / "faces" / "train" / "happy" / "bomb.png"
    bomb.parent.mkdir(parents=True)
    bomb.write_bytes(bomb_png(side))
    decoded: list[str] = []

    def no_decode(self: Image.Image, *args: object) -> None:
        decoded.append(str(self.size))
        raise AssertionError("decoded a file over the pixel limit")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises((DataError, ImageError), match="7072x7072 = 50,013,184 pixels, more than the 50,000,000-pixel"):
        load(bomb)
    assert decoded == []


def test_decode_image_bytes_and_paths_agree(tmp_path: Path) -> None:
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., :3], rgba[:2, :, 3] = 90, 255
    path = tmp_path / "face.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = decode_image(path, "face")
    assert rgb.shape == (5, 7, 3) and np.array_equal(decode_image(path.read_bytes(), "face"), rgb)
    gray = decode_image(path.read_bytes(), "face", gray=True)
    assert gray.shape == (5, 7) and gray[0, 0] == 90 and gray[4, 0] == 255  # alpha composited on white
    with pytest.raises(ImageError, match="cannot read file"):
        decode_image(tmp_path / "absent.png", "absent")
