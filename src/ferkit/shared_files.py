"""Results files (CSV tables, the results page) that several processes may update at once.

`ferkit reproduce` runs are often started side by side (one per core, or several on one GPU) and each one
upserts its row into results/seeds.csv when it ends, then refreshes docs/results.md; `ferkit ensemble --record`
does the same for results/ensembles.csv. A read-modify-write without a lock can lose a row, or the page's
notes, when two of them finish together, so updates hold an exclusive lock on the file's folder while they
read and rewrite the file, and the rewrite is atomic (a temporary file, then a rename)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
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


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of `path` (on its folder, which a rename leaves in place)."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
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
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:  # no newline translation: csv's line endings stay as written
        f.write(text)
    os.replace(tmp, path)
