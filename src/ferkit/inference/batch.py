"""Run a Recognizer over many inputs (images, folders, videos) for `ferkit predict`.

Every input becomes one or more `Entry` records: one per image, one per sampled video frame. A failure
(unreadable file, decompression bomb, a video that does not open, a model output that is not finite) becomes
an entry with `error` set, naming the file and the reason, and the run goes on. A picture without a face is
a result (no faces), not an error.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from ferkit.inference.image_io import ImageError, is_image_path, is_video_path, sample_image_path

# What one input can raise that makes it, not the run, fail: memory, torch/OpenCV errors on odd images, and
# ValueError (e.g. NonFiniteOutputError: the model gave NaN for this face). Weights problems never get here:
# loading the weights refuses them before the first file.
FILE_FAILURES = (MemoryError, RuntimeError, ValueError, cv2.error)


@dataclass
class Entry:
    file: str
    frame: int | None = None  # video frame index (0-based), None for images
    time: float | None = None  # video timestamp in seconds
    faces: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    annotated: str | None = None  # path of the annotated image, when written

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file}
        if self.frame is not None:
            d["frame"] = self.frame
            d["time"] = None if self.time is None else round(self.time, 3)
        d["faces"] = self.faces
        d["error"] = self.error
        if self.annotated:
            d["annotated"] = self.annotated
        return d


@dataclass
class Input:
    path: Path
    display: str  # how the file is named in output
    rel: Path  # path relative to the folder it was found in (for annotated file names)


def collect_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[Input], list[Entry], int]:
    """(inputs, error entries for paths that do not exist or folders without any image or video, number of
    non-media files skipped in folders).

    Folders are searched recursively for image and video files (by extension), in sorted order; files
    named directly are always tried, whatever their extension.
    """
    inputs: list[Input] = []
    errors: list[Entry] = []
    skipped = 0
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found, others = 0, 0
            for f in sorted(q for q in path.rglob("*") if q.is_file()):
                if is_image_path(f) or is_video_path(f):
                    inputs.append(Input(f, str(f), f.relative_to(path)))
                    found += 1
                else:
                    others += 1
            skipped += others
            if not found:  # a folder given by mistake (or emptied) must not look like a clean run
                errors.append(Entry(str(path), error=f"folder has no images or videos ({others} other file(s))"))
        elif path.exists():
            display = f"{path.name} (bundled sample)" if path == sample_image_path() else str(path)
            inputs.append(Input(path, display, Path(path.name)))
        else:
            errors.append(Entry(str(path), error="file or folder not found"))
    return inputs, errors, skipped


class Annotator:
    """Writes annotated images under `out_dir` with unique names."""

    def __init__(self, out_dir: Path, single_file: Path | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.single_file = single_file  # write the (one) annotated image to exactly this path
        self.used: set[Path] = set()

    def target(self, rel: Path, suffix: str = "") -> Path:
        if self.single_file is not None:
            return self.single_file
        # Names are built whole, not with with_suffix: "party.2024.01.05" would lose ".05" (and its "-2"
        # variant would turn back into the same name, looping forever).
        base = self.out_dir / rel.parent / (rel.stem + suffix)
        out, n = base.with_name(f"{base.name}.jpg"), 2
        while out in self.used:
            out, n = base.with_name(f"{base.name}-{n}.jpg"), n + 1
        self.used.add(out)
        return out

    def write(self, rgb: np.ndarray, faces: list[dict[str, Any]], target: Path) -> str:
        from ferkit.inference.annotate import annotate

        return self.write_bgr(annotate(rgb, faces), target)

    def write_bgr(self, bgr: np.ndarray, target: Path) -> str:
        target.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise OSError(f"cannot encode annotated image for {target}")
        target.write_bytes(buf.tobytes())
        return str(target)


GLOB_CHARS = frozenset("*?[")


def read_file_list(path: str | os.PathLike) -> list[str]:
    """The paths in a text file, one a line (for more files than a command line holds).

    Line ends are removed and blank lines skipped; nothing else is stripped, so names with spaces work.
    Relative paths are relative to the current folder, as on a command line. Bytes that are not UTF-8 are
    kept as the OS gives them (surrogateescape), so every file name can be listed. Raises ValueError for a
    file that is not text (holds NUL bytes) or lists no path, OSError when it cannot be read.
    """
    data = Path(path).read_bytes()
    if b"\0" in data:  # an image or archive given by mistake would become thousands of "not found" rows
        raise ValueError(f"{os.fspath(path)!r} is not a text file of paths (it holds NUL bytes)")
    paths = [line for line in data.decode("utf-8", "surrogateescape").splitlines() if line.strip()]
    if not paths:
        raise ValueError(f"{os.fspath(path)!r} lists no paths")
    return paths


def expand_patterns(paths: Iterable[str | os.PathLike]) -> tuple[list[str | os.PathLike], list[Entry]]:
    """(paths with glob patterns expanded, error entries for patterns that match nothing).

    A path that exists is kept as it is, even if its name holds * ? or [ (a file may be called that);
    otherwise such a path is a pattern (`**` spans folders), expanded in sorted order. Quoted patterns
    reach here unexpanded, so a folder of millions of files never meets the shell's argument limit.
    """
    out: list[str | os.PathLike] = []
    errors: list[Entry] = []
    for p in paths:
        text = os.fspath(p)
        if GLOB_CHARS.isdisjoint(text) or os.path.lexists(text):
            out.append(p)
            continue
        matches = sorted(glob.glob(text, recursive=True))
        if matches:
            out.extend(matches)
        else:
            errors.append(Entry(text, error="no file or folder matches this pattern"))
    return out, errors


def gather_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[Input], list[Entry], int]:
    """`collect_inputs` after `expand_patterns`: what `ferkit predict` runs on, with and without Ray. A path the
    OS refuses to look at (a name too long, a folder that cannot be listed) is an error entry too."""
    expanded, errors = expand_patterns(paths)
    inputs: list[Input] = []
    skipped = 0
    for p in expanded:
        try:
            found, bad, others = collect_inputs([p])
        except (OSError, ValueError) as e:
            errors.append(Entry(os.fspath(p), error=f"cannot read: {getattr(e, 'strerror', None) or e}"))
            continue
        inputs += found
        errors += bad
        skipped += others
    return inputs, errors, skipped


def process_image(rec: Any, item: Input, annotator: Annotator | None = None) -> Entry:
    entry = Entry(item.display)
    try:
        rgb, dets, faces = rec.detect_faces(item.path)
        entry.faces = rec.describe(dets, faces)
    except ImageError as e:
        entry.error = e.reason
        return entry
    except FILE_FAILURES as e:  # one bad file must not end a batch run
        entry.error = f"failed: {type(e).__name__}: {e}"
        return entry
    if annotator is not None:
        entry.annotated = annotator.write(rgb, entry.faces, annotator.target(item.rel))
    return entry


def process_video(rec: Any, item: Input, every: int, annotator: Annotator | None = None,
                  progress: bool = False, outputs: list[str] | None = None) -> Iterator[Entry]:
    """One entry per `every`-th frame (0, every, 2*every, ...), with its timestamp in seconds.

    With an `annotator` (writing into a folder), also writes `<name>.annotated.mp4` (or .avi, see
    ferkit.inference.video) holding every frame of the clip at its frame rate, each frame showing the
    results of the latest sampled frame (so boxes hold still for `every` frames; --every 1 analyses every
    frame), and `<name>.emotions.png`, the probabilities of the largest face over time. Their paths are
    appended to `outputs`.
    """
    from tqdm.auto import tqdm

    from ferkit.inference.annotate import annotate

    cap = cv2.VideoCapture(str(item.path))
    video_out = annotator is not None and annotator.single_file is None
    writer, video_path = None, None
    times: list[float] = []
    frame_faces: list[list[dict[str, Any]]] = []
    last_faces: list[dict[str, Any]] = []
    try:
        if not cap.isOpened():
            yield Entry(item.display, error="cannot open as a video (unsupported codec, corrupt or not a video)")
            return
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        fps = fps if math.isfinite(fps) and 0 < fps < 1000 else 0.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        bar = tqdm(total=math.ceil(total / every) if total > 0 else None, desc=item.path.name, unit="frame",
                   leave=False, disable=None if progress else True)
        index, sampled = 0, 0
        while True:
            if index % every == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                ts = index / fps if fps else (cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0) / 1000.0
                entry = Entry(item.display, frame=index, time=ts)
                drawn = None
                try:
                    rgb, dets, faces = rec.detect_faces(frame, color="bgr")
                    entry.faces = rec.describe(dets, faces)
                    if annotator is not None:
                        drawn = annotate(rgb, entry.faces)
                        target = annotator.target(item.rel.parent / item.rel.stem / f"frame_{index:06d}")
                        entry.annotated = annotator.write_bgr(drawn, target)
                except ImageError as e:
                    entry.error = f"frame {index}: {e.reason}"
                except FILE_FAILURES as e:
                    entry.error = f"frame {index}: failed: {type(e).__name__}: {e}"
                sampled += 1
                last_faces = entry.faces
                times.append(ts)
                frame_faces.append(entry.faces)
                if video_out:
                    writer, video_path = _write_video_frame(writer, video_path, annotator, item, fps, frame,
                                                            drawn, last_faces)
                bar.update(1)
                yield entry
            elif video_out:  # the annotated video needs every frame decoded
                ok, frame = cap.read()
                if not ok:
                    break
                writer, video_path = _write_video_frame(writer, video_path, annotator, item, fps, frame, None,
                                                        last_faces)
            elif not cap.grab():  # skipped frames are only demuxed, not decoded
                break
            index += 1
        bar.close()
        if sampled == 0:
            yield Entry(item.display, error="no frames could be read (empty, corrupt or unsupported video)")
    finally:
        cap.release()
        if writer is not None:
            writer.release()
            if outputs is not None and video_path is not None:
                outputs.append(str(video_path))
        if video_out and annotator is not None and times and any(frame_faces):
            from ferkit.inference.video import plot_emotion_timeline

            plot = annotator.out_dir / item.rel.parent / f"{item.rel.stem}.emotions.png"
            plot_emotion_timeline(times, frame_faces, list(rec.classes), plot,
                                  title=f"{item.path.name}: emotions of the largest face (every {every} frame(s))")
            if outputs is not None:
                outputs.append(str(plot))


def _write_video_frame(writer: Any, path: Path | None, annotator: Annotator, item: Input, fps: float,
                       frame: np.ndarray, drawn: np.ndarray | None,
                       faces: list[dict[str, Any]]) -> tuple[Any, Path | None]:
    """Append one annotated frame (drawn now from `faces` unless given) to the clip's annotated video."""
    from ferkit.inference.annotate import annotate
    from ferkit.inference.video import open_writer

    if drawn is None:
        drawn = annotate(np.ascontiguousarray(frame[..., ::-1]), faces) if faces else frame
    if writer is None:
        height, width = drawn.shape[:2]
        writer, path = open_writer(annotator.out_dir / item.rel.parent / f"{item.rel.stem}.annotated",
                                   fps or 25.0, (width, height))
    writer.write(np.ascontiguousarray(drawn))
    return writer, path


def process_input(rec: Any, item: Input, every: int = 10, annotator: Annotator | None = None,
                  progress: bool = False, outputs: list[str] | None = None) -> list[Entry]:
    """The entries of one input: one for an image, one per sampled frame of a video (see process_video)."""
    if is_video_path(item.path):
        return list(process_video(rec, item, every, annotator, progress, outputs))
    return [process_image(rec, item, annotator)]


def run(rec: Any, paths: Iterable[str | os.PathLike], every: int = 10, annotate_dir: str | os.PathLike | None = None,
        progress: bool = True, annotate_file: str | os.PathLike | None = None,
        outputs: list[str] | None = None) -> tuple[list[Entry], int]:
    """(entries, files skipped in folders) for all `paths`; see `collect_inputs`.

    `annotate_dir`: write annotated copies there (and, for videos, an annotated video and an emotion-over-
    time plot; their paths are appended to `outputs`). `annotate_file`: write the annotated image of a
    single-image run to exactly this path (used by `ferkit demo`).
    """
    from tqdm.auto import tqdm

    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    inputs, entries, skipped = gather_inputs(paths)
    annotator = None
    if annotate_file is not None:
        annotator = Annotator(Path(annotate_file).parent, single_file=Path(annotate_file))
    elif annotate_dir is not None:
        annotator = Annotator(Path(annotate_dir))
    for item in tqdm(inputs, desc="predict", unit="file", disable=None if progress else True):
        entries.extend(process_input(rec, item, every, annotator, progress, outputs))
    return entries, skipped


# -- output -----------------------------------------------------------------------------------------------

def write_json(entries: list[Entry], out: str | os.PathLike | TextIO, info: dict[str, Any]) -> None:
    doc = {**info, "results": [e.to_json() for e in entries],
           "summary": summary(entries)}
    text = json.dumps(doc, indent=2, allow_nan=False)  # the last guard: NaN is not JSON
    if hasattr(out, "write"):
        out.write(text + "\n")
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def csv_header(classes: list[str]) -> list[str]:
    return ["file", "frame", "time", "face", "x", "y", "w", "h", "face_score", "dominant", *classes, "error"]


def entry_rows(entry: Entry, classes: list[str]) -> list[dict[str, Any]]:
    """The rows of one entry, keyed by `csv_header(classes)`: one per face, or one with the face columns None
    for an input without a face or with an error. Times are rounded to 3 decimals and scores to 4, as the CSV
    prints them, so the CSV and the Parquet shards of the Ray path (ferkit.inference.cluster) hold the same
    values."""
    base = {"file": entry.file, "frame": entry.frame, "time": None if entry.time is None else round(entry.time, 3)}
    if not entry.faces:
        return [{**base, **dict.fromkeys(csv_header(classes)[3:-1]), "error": entry.error}]
    rows = []
    for i, face in enumerate(entry.faces, 1):
        x, y, w, h = face["box"]
        rows.append({**base, "face": i, "x": x, "y": y, "w": w, "h": h,
                     "face_score": round(face["face_score"], 4), "dominant": face["dominant"],
                     **{c: round(face["emotions"][c], 4) for c in classes}, "error": entry.error})
    return rows


def csv_cell(column: str, value: Any) -> Any:
    """How the CSV prints a value of `entry_rows`."""
    if value is None:
        return ""
    if isinstance(value, float):  # fixed decimals ("0.2500", not "0.25"), as the CSV always had
        return f"{value:.3f}" if column == "time" else f"{value:.4f}"
    return value


def write_csv(entries: list[Entry], out: str | os.PathLike, classes: list[str]) -> None:
    """One row per face; an input with no face or an error gets one row with the face columns empty."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(csv_header(classes))
        for e in entries:
            for row in entry_rows(e, classes):
                w.writerow([csv_cell(k, v) for k, v in row.items()])


def summary(entries: list[Entry]) -> dict[str, int]:
    """Counts: entries (images and sampled frames), faces, entries without a face (a result, not an error),
    errors (entries that failed), files, failed_files (files with at least one failed entry)."""
    return {"entries": len(entries), "faces": sum(len(e.faces) for e in entries),
            "without_face": sum(not e.faces and e.error is None for e in entries),
            "errors": sum(e.error is not None for e in entries),
            "files": len({e.file for e in entries}),
            "failed_files": len({e.file for e in entries if e.error is not None})}


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def format_table(entries: list[Entry]) -> str:
    """A readable table: one line per face (file, frame/time for videos, box, detector score, top emotions)."""
    has_video = any(e.frame is not None for e in entries)
    width = min(40, max([len(e.file) for e in entries] + [4]))
    head = f"{'file':<{width}}" + (f" {'frame':>6} {'time':>8}" if has_video else "")
    head += f" {'face':>4}  {'box x,y,w,h':<19} {'score':>5}  {'emotion':<9} {'prob':>5}  runners-up"
    lines = [head, "-" * len(head)]
    for e in entries:
        where = f"{_short(e.file, width):<{width}}"
        if has_video:
            where += (f" {e.frame:>6} {e.time:>7.2f}s" if e.frame is not None and e.time is not None
                      else f" {'':>6} {'':>8}")
        if e.error and not e.faces:
            lines.append(f"{where} error: {e.error}")
            continue
        if not e.faces:
            lines.append(f"{where} {'-':>4}  (no face)")
        for i, face in enumerate(e.faces, 1):
            top = sorted(face["emotions"].items(), key=lambda kv: -kv[1])
            box = ",".join(str(v) for v in face["box"])
            rest = ", ".join(f"{k} {v:.2f}" for k, v in top[1:3])
            lines.append(f"{where} {i:>4}  {box:<19} {face['face_score']:>5.2f}  {top[0][0]:<9} {top[0][1]:>5.2f}  "
                         f"{rest}")
        if e.error:
            lines.append(f"{where} error: {e.error}")
    return "\n".join(lines)
