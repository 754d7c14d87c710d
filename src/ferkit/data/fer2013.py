"""Read the FER2013 CSV (`emotion,pixels,Usage`, plain or gzip) fast and strictly.

Every problem is reported with the file name and its 1-based line number (the header is line 1).
With `skip_bad_rows=True` bad rows are left out instead, and `FaceData.skipped` counts them by reason.
Clean files are cached as uint8 arrays keyed by the file's sha256, so a second load is sub-second. The cache
is written atomically and checked on every read (zip CRCs, the source's sha256, shapes, value ranges); a
cache that fails any check is deleted and rebuilt from the CSV.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from ferkit.data.dataset import SPLITS, DataError, FaceData
from ferkit.data.labels import LabelSet, get_label_set
from ferkit.shared_files import replacing

IMAGE_SIDE = 48
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_EMOTIONS = 7  # FER2013 emotion ids are 0..6
REQUIRED_COLUMNS = ("emotion", "pixels", "Usage")
_DIGITS_AND_SPACE = b"0123456789 "


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$FERKIT_CACHE, else $XDG_CACHE_HOME/ferkit, else ~/.cache/ferkit."""
    if env := os.environ.get("FERKIT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferkit"


def load_fer2013_csv(
    path: str | os.PathLike,
    label_set: str | LabelSet = "fer7",
    *,
    skip_bad_rows: bool = False,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FaceData:
    """Load a FER2013-format CSV into a `FaceData`.

    Rows whose emotion is a valid FER2013 id but not in `label_set` (disgust under 'fer6') are
    dropped and counted in `skipped`; anything malformed raises `DataError` unless `skip_bad_rows`.
    """
    path = Path(path)
    labels = get_label_set(label_set)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sha = file_sha256(path)
    cache_file = Path(cache_dir or default_cache_dir()) / f"fer2013-{sha[:32]}.npz"
    raw = _read_cache(cache_file, sha) if cache else None
    if raw is None:
        raw = _parse(path, skip_bad_rows)
        if cache and not raw["skipped"]:  # only clean files are cached: a bad file must always raise
            _write_cache(cache_file, raw, sha)
    skipped = dict(raw["skipped"])
    return _apply_label_set(raw, labels, source=str(path), sha256=sha, skipped=skipped)


def _apply_label_set(raw: dict, labels: LabelSet, source: str, sha256: str, skipped: dict) -> FaceData:
    mapping = np.full(NUM_EMOTIONS, -1, dtype=np.int64)
    for src, cls in labels.source_to_class().items():
        mapping[src] = cls
    cls = mapping[raw["emotion"]]
    keep = cls >= 0
    if (dropped := int((~keep).sum())):
        skipped[f"rows of classes outside label set {labels.name}"] = dropped
    return FaceData(
        images=raw["images"][keep], labels=cls[keep], usage=np.asarray(SPLITS)[raw["usage"][keep]],
        rows=raw["rows"][keep], label_set=labels, source=source, sha256=sha256, skipped=skipped,
    )


def _read_text(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] != b"\x1f\x8b":
            return raw
        # One zlib call is ~1.5x faster than gzip.open().read(); multi-member files take the gzip module.
        d = zlib.decompressobj(wbits=31)
        data = d.decompress(raw)
        if not d.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        return gzip.decompress(raw) if d.unused_data else data
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _parse(path: Path, skip_bad_rows: bool) -> dict:
    data = _read_text(path)
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    lines = data.split(b"\n")
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file (expected a header line 'emotion,pixels,Usage')")
    header = [h.strip().strip(b'"').decode("utf-8", "replace") for h in lines[0].split(b",")]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {missing} in header {header}")
    col = {c: header.index(c) for c in REQUIRED_COLUMNS}
    # (line number, fields); the raw text and lines are dropped right after to halve peak memory
    body = [(i + 2, line.split(b",")) for i, line in enumerate(lines[1:]) if line.strip()]
    del data, lines
    if not body:
        raise DataError(f"{path}: no data rows after the header")

    usage_code = {name.encode(): i for i, name in enumerate(SPLITS)}
    good: list[int] = []
    emotions: list[int] = []
    usages: list[int] = []
    pixel_strings: list[bytes] = []
    skipped: Counter[str] = Counter()

    def bad(line_no: int, reason: str, detail: str) -> None:
        if not skip_bad_rows:
            raise DataError(f"{path}, line {line_no}: {detail}")
        skipped[reason] += 1

    for k, (line_no, f) in enumerate(body):
        if len(f) != len(header):
            bad(line_no, "wrong number of fields", f"expected {len(header)} comma-separated fields, got {len(f)}")
            continue
        emo = f[col["emotion"]].strip().strip(b'"')
        if not emo.isdigit() or int(emo) >= NUM_EMOTIONS:
            bad(line_no, "emotion out of range",
                f"emotion {emo.decode(errors='replace')!r} is not a FER2013 emotion id 0..{NUM_EMOTIONS - 1}")
            continue
        use = usage_code.get(f[col["Usage"]].strip().strip(b'"'))
        if use is None:
            bad(line_no, "unknown Usage",
                f"unknown Usage {f[col['Usage']].decode(errors='replace')!r}; expected one of {list(SPLITS)}")
            continue
        good.append(k)
        emotions.append(int(emo))
        usages.append(use)
        pixel_strings.append(f[col["pixels"]].strip().strip(b'"'))

    pixels, ok = _parse_pixels(pixel_strings)
    for j in np.flatnonzero(~ok):  # slow path only for rows the vectorized check flagged
        line_no = body[good[j]][0]
        bad(line_no, "bad pixels", _describe_pixel_problem(pixel_strings[j]))
    keep = np.flatnonzero(ok)
    return {
        "images": pixels[keep].reshape(-1, IMAGE_SIDE, IMAGE_SIDE),
        "emotion": np.asarray(emotions, dtype=np.int64)[keep],
        "usage": np.asarray(usages, dtype=np.int64)[keep],
        "rows": np.asarray(good, dtype=np.int64)[keep],
        "skipped": dict(skipped),
    }


def _parse_pixels(pixel_strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Parse all rows; returns (N, 2304) uint8 and a per-row ok mask.

    A valid row is exactly 2304 tokens of ASCII digits, separated by single spaces, each at most 255.
    Rows that look valid (digits and the right number of spaces) are parsed in vectorized chunks;
    anything else, or anything the chunk parser flags, is re-checked by the per-row reference parser.
    """
    n = len(pixel_strings)
    out = np.zeros((n, NUM_PIXELS), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    fast = [i for i, p in enumerate(pixel_strings)
            if p.count(b" ") == NUM_PIXELS - 1 and not p.translate(None, _DIGITS_AND_SPACE)]
    slow = sorted(set(range(n)).difference(fast))
    for start in range(0, len(fast), _CHUNK_ROWS):
        idx = np.asarray(fast[start:start + _CHUNK_ROWS], dtype=np.int64)
        values, good = _parse_chunk([pixel_strings[i] for i in idx])
        out[idx[good]] = values[good]
        ok[idx[good]] = True
        slow.extend(idx[~good].tolist())
    for i in slow:
        values = _parse_row(pixel_strings[i])
        if values is not None:
            out[i] = values
            ok[i] = True
    return out, ok


_CHUNK_ROWS = 128  # ~1 MB of text per chunk: stays in CPU cache (measured fastest), bounded memory


def _parse_chunk(rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Rows known to hold only digits and exactly 2303 spaces -> (n, 2304) uint8 and a per-row ok mask.

    Each token ends at a space; its value is assembled from its last three digits. A row is not ok when
    a token is empty (double space), longer than 3 digits (leading zeros: left to the reference parser)
    or above 255.
    """
    n = len(rows)
    buf = np.frombuffer(b" ".join(rows) + b" ", dtype=np.uint8)
    ends = np.flatnonzero(buf == 32)  # exactly n * 2304 by construction
    lengths = np.diff(ends, prepend=-1) - 1
    digit = buf.astype(np.int16) - 48
    values = digit[ends - 1]
    values += np.where(lengths >= 2, digit[ends - 2] * 10, 0)
    values += np.where(lengths >= 3, digit[ends - 3] * 100, 0)
    bad = (lengths < 1) | (lengths > 3) | (values > 255)
    ok = ~bad.reshape(n, NUM_PIXELS).any(axis=1)
    return values.reshape(n, NUM_PIXELS).astype(np.uint8), ok


def _parse_row(pixels: bytes) -> np.ndarray | None:
    """Reference parser for one row (same rules as `_parse_chunk`); None when the row is invalid."""
    tokens = pixels.split(b" ")
    if len(tokens) != NUM_PIXELS or not all(t.isdigit() for t in tokens):
        return None
    values = np.array([int(t) for t in tokens], dtype=np.int64)
    return values.astype(np.uint8) if values.max() <= 255 else None


def _describe_pixel_problem(pixels: bytes) -> str:
    if not pixels.strip():
        return "no pixel values"
    tokens = pixels.split(b" ")
    for k, t in enumerate(tokens):
        if not t:
            return f"empty pixel value at position {k + 1} (two spaces in a row?)"
        if not t.isdigit():
            return f"pixel value {t.decode(errors='replace')!r} is not an integer 0..255"
        if int(t) > 255:
            return f"pixel value {int(t)} is out of range 0..255"
    return f"expected {NUM_PIXELS} pixel values (48x48), got {len(tokens)}"


CACHE_VERSION = 2  # bump when the cached arrays change meaning: older caches are then rebuilt
_CACHE_ARRAYS = ("images", "emotion", "usage", "rows")


def _read_cache(cache_file: Path, sha256: str) -> dict | None:
    """The cached arrays of the CSV with this sha256, or None (a corrupt cache is deleted) to parse the CSV."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            # Reading each array to its end checks its zip CRC-32: a flipped or truncated byte raises here.
            raw = {k: z[k] for k in _CACHE_ARRAYS}
            problem = _cache_problem(raw, int(z["version"]), str(z["source_sha256"]), sha256)
    except Exception as e:  # whatever a damaged file makes numpy or zipfile raise, the cache is rebuilt
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem is None:
        return raw | {"skipped": {}}
    try:
        cache_file.unlink()
    except OSError:
        pass  # the rewrite after parsing replaces it anyway
    return None


def _cache_problem(raw: dict, version: int, cached_sha256: str, sha256: str) -> str | None:
    """Why the cached arrays cannot be the parse of the CSV with this sha256, or None when they can."""
    if version != CACHE_VERSION:
        return f"cache format {version}, expected {CACHE_VERSION}"
    if cached_sha256 != sha256:
        return "written for another file"
    images, n = raw["images"], len(raw["rows"])
    if images.dtype != np.uint8 or images.shape != (n, IMAGE_SIDE, IMAGE_SIDE):
        return f"images {images.dtype} {images.shape} for {n} rows"
    for key, top in (("emotion", NUM_EMOTIONS), ("usage", len(SPLITS)), ("rows", None)):
        a = raw[key]
        if a.dtype != np.int64 or a.shape != (n,) or (n and (a.min() < 0 or (top is not None and a.max() >= top))):
            return f"{key} out of range"
    if n and (np.diff(raw["rows"]) <= 0).any():
        return "rows not increasing"
    return None


def _write_cache(cache_file: Path, raw: dict, sha256: str) -> None:
    """Atomic write (shared_files.replacing): a crash or a full disk never leaves a partial cache behind, the temp
    file is removed on any failure, and concurrent loads never read a half-written file."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: raw[k] for k in _CACHE_ARRAYS}, version=np.array(CACHE_VERSION),
                     source_sha256=np.array(sha256))
    except OSError:
        pass  # caching is an optimisation; a read-only or full disk must not break loading
