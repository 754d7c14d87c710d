"""Results CSVs: updates from processes that finish at the same time must not lose each other's rows."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from ferkit.shared_files import locked, read_rows, replacing, write_rows

FIELDS = ("name", "value")


def _add_rows(path: str, worker: int, count: int) -> None:
    for i in range(count):
        with locked(path):
            rows = read_rows(path)
            rows.append({"name": f"w{worker}-{i}", "value": str(i)})
            write_rows(path, FIELDS, rows)


def test_concurrent_upserts_keep_every_row(tmp_path: Path) -> None:
    path = str(tmp_path / "results" / "table.csv")
    ctx = mp.get_context("spawn")  # fresh interpreters, like separate `ferkit reproduce` runs
    workers = [ctx.Process(target=_add_rows, args=(path, w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    names = [r["name"] for r in read_rows(path)]
    assert sorted(names) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
    assert not list(Path(path).parent.glob("*.tmp*"))  # no temporary file left behind


def test_missing_file_reads_as_no_rows(tmp_path: Path) -> None:
    assert read_rows(tmp_path / "absent.csv") == []


def test_a_failed_replacement_leaves_the_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_text("previous")
    with pytest.raises(OSError, match="No space left"):
        with replacing(path) as tmp:
            tmp.write_text("part of the new")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    with replacing(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
