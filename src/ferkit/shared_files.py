"""Results files (CSV tables, the results page) that several processes may update at once.

`ferkit reproduce` runs are often started side by side (one per core, or several on one GPU) and each one
upserts its row into results/seeds.csv when it ends, then refreshes docs/results.md; `ferkit ensemble --record`
does the same for results/ensembles.csv. A read-modify-write without a lock can lose a row, or the page's
notes, when two of them finish together, so updates hold an exclusive lock on the file's folder while they
read and rewrite the file, and the rewrite is atomic (a temporary file, then a rename).

`replacing` is that atomic rewrite for any file ferkit writes (weights, checkpoints, caches): every writer goes
through it, so a kill or a full disk mid-write leaves the previous file intact and no temporary file behind."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: updates are still atomic, just not serialized
    fcntl = None  # type: ignore[assignment]


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The file's rows as dicts; [] when it does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def locked(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock for a read-modify-write of `path` (on its folder, which a rename leaves in place)."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    return _folder_lock(folder, wait=True)


def claimed(folder: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """Hold the existing `folder` for this process alone (a training run's directory) while the block runs;
    BlockingIOError at once when another process holds it. The lock ends with its process, even a killed one."""
    return _folder_lock(Path(folder), wait=False)


@contextlib.contextmanager
def _folder_lock(folder: Path, wait: bool) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_rows(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict]) -> None:
    """Replace the CSV file with these rows, atomically."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file with `text`, atomically: a kill mid-write leaves the previous file intact."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:  # no newline translation: csv's stay as written
        f.write(text)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write its new contents to; when the block ends without an error, the
    file there replaces `path` in one rename. On any error (a kill, a full disk) the temporary file is removed
    and `path` is left as it was.

        with replacing("best.safetensors") as tmp:
            save_file(state, str(tmp))
    """
    path = Path(path)
    # Unique per writer, threads of one process included; a name beside `path`, so the rename stays on one disk.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        # On disk before the rename: after a power cut the name must not point at a file whose data never landed
        # (a zero-byte checkpoint).
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
