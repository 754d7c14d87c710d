"""`ferkit predict` inputs (globs, --file-list) and its Ray path (ferkit.inference.cluster, ferkit[cluster]).

The Ray tests start one local Ray for the module (2 CPUs, 127.0.0.1, no dashboard) and compare the rows the
Ray path writes with the rows of single-process `ferkit predict --csv` on the same files: they must be equal,
value for value.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data.labels import FER2013_NAMES
from ferkit.inference import batch
from ferkit.inference.image_io import sample_image_path

CLASSES = list(FER2013_NAMES)
runner = CliRunner()
CPU = ["--device", "cpu", "--no-progress", "--backend", "torch"]


def _face_images(root: Path, n: int, seed: int = 0) -> None:
    """`n` images in 4 sub-folders: crops of the sample photo at 96-160 px (RetinaFace finds the face in most,
    not all) and noise pictures (no face), as .jpg and .png."""
    rng = np.random.default_rng(seed)
    src = cv2.imread(str(sample_image_path()))
    h, w = src.shape[:2]
    for i in range(n):
        sub = root / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 5 == 4:
            img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        else:
            s = rng.uniform(0.6, 1.0)
            cw, ch = int(w * s), int(h * s)
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            img = cv2.resize(src[y:y + ch, x:x + cw], (int(rng.integers(96, 160)),) * 2)
            img = img[:, ::-1] if i % 3 == 0 else img
        cv2.imwrite(str(sub / f"img{i:04d}.{'png' if i % 2 else 'jpg'}"), img)


def _bad_and_odd_files(root: Path) -> None:
    """Files that fail (empty, not an image, truncated), one that is skipped (.txt), a short video, and good
    pictures with awkward names (spaces, comma, glob characters, non-ASCII, a leading dash)."""
    root.mkdir(parents=True, exist_ok=True)
    face = cv2.resize(cv2.imread(str(sample_image_path())), (128, 128))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not a picture")
    ok, jpg = cv2.imencode(".jpg", face)
    (root / "truncated.jpg").write_bytes(jpg.tobytes()[:300])
    (root / "readme.txt").write_text("skipped: not an image or video")
    for name in ("with space.jpg", "a,b.png", "[1]*?.jpg", "ünï çødé.png", "-dash.jpg"):
        cv2.imwrite(str(root / "tmp.png"), face)
        os.replace(root / "tmp.png", root / name)
    writer = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (128, 128))
    for k in range(12):
        writer.write(np.roll(face, k, axis=1))
    writer.release()


def _typed(row: list[str], header: list[str]) -> tuple:
    """A row of `ferkit predict --csv` with the types of cluster.row_schema ("" is None)."""
    from ferkit.inference import cluster

    def value(column: str, text: str):
        if text == "":
            return None
        if column in cluster.INT_COLUMNS:
            return int(text)
        return text if column in ("file", "dominant", "error") else float(text)

    return tuple(value(c, t) for c, t in zip(header, row, strict=True))


def _sorted(rows: list[tuple]) -> list[tuple]:
    return sorted(rows, key=lambda r: tuple("" if v is None else str(v) for v in r))


def _single_process_rows(csv_path: Path) -> list[tuple]:
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header == batch.csv_header(CLASSES)
        return _sorted([_typed(r, header) for r in reader])


# -- inputs: file lists and glob patterns (no Ray) ---------------------------------------------------------

def test_read_file_list_keeps_names_as_written(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.jpg\r\n\n   \n with space.jpg \nraw-\xff.jpg\n")
    assert batch.read_file_list(listing) == ["a.jpg", " with space.jpg ", os.fsdecode(b"raw-\xff.jpg")]


@pytest.mark.parametrize("content, message", [(b"", "lists no paths"), (b"\n \n", "lists no paths"),
                                              (b"\xff\xd8\xff\x00JFIF", "not a text file")])
def test_read_file_list_refuses_empty_and_binary_files(tmp_path: Path, content: bytes, message: str) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        batch.read_file_list(listing)


def test_patterns_expand_but_existing_names_with_glob_characters_stay_literal(tmp_path: Path) -> None:
    for name in ("a/x.jpg", "a/b/y.jpg", "a/b/z.png", "[1].jpg", "1.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    paths, errors = batch.expand_patterns([tmp_path / "a" / "**" / "*.jpg", str(tmp_path / "[1].jpg"),
                                           str(tmp_path / "nothing-*.jpg")])
    assert paths == [str(tmp_path / "a/b/y.jpg"), str(tmp_path / "a/x.jpg"), str(tmp_path / "[1].jpg")]
    assert [(e.file, e.error) for e in errors] == [(str(tmp_path / "nothing-*.jpg"),
                                                    "no file or folder matches this pattern")]


@pytest.mark.parametrize("hostile", ["bad\x00name.jpg", "../" * 40 + "nope.jpg", "-rf", "x" * 5000, "*\x00*",
                                     "/proc/self/fd/*/nope"])
def test_hostile_paths_become_error_entries(hostile: str) -> None:
    inputs, errors, _ = batch.gather_inputs([hostile])
    assert inputs == [] and len(errors) == 1 and errors[0].file == hostile
    assert errors[0].error in ("file or folder not found", "no file or folder matches this pattern",
                               "cannot read: File name too long")


def test_predict_reads_a_file_list_with_bad_entries(weights: Path, tmp_path: Path) -> None:
    _bad_and_odd_files(tmp_path / "in")
    listing = tmp_path / "list.txt"
    names = ["with space.jpg", "empty.jpg", "notes.png", "readme.txt", "missing.jpg"]
    listing.write_text("".join(f"{tmp_path / 'in' / n}\n" for n in names))
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", "--file-list", str(listing), "--csv", str(out), "--weights",
                                 str(weights), *CPU])
    assert result.exit_code == 1, result.output  # bad files are rows, and the exit code says so
    rows = {r[0]: r[-1] for r in csv.reader(out.open())}
    assert rows[str(tmp_path / "in" / "with space.jpg")] == ""
    assert rows[str(tmp_path / "in" / "empty.jpg")].startswith("empty file")
    assert "not an image" in rows[str(tmp_path / "in" / "notes.png")]
    assert "not an image" in rows[str(tmp_path / "in" / "readme.txt")]  # named directly: always tried
    assert rows[str(tmp_path / "in" / "missing.jpg")] == "file or folder not found"
    assert "4 of 5 file(s) could not be read" in result.output


@pytest.mark.parametrize("content, message", [(None, "No such file or directory"), (b"", "lists no paths"),
                                              (b"GIF89a\x00\x01", "not a text file")])
def test_predict_refuses_a_bad_file_list(weights: Path, tmp_path: Path, content: bytes | None, message: str) -> None:
    listing = tmp_path / "list.txt"
    if content is not None:
        listing.write_bytes(content)
    result = runner.invoke(app, ["predict", "--file-list", str(listing), "--weights", str(weights), *CPU])
    assert result.exit_code == 2 and message in result.output, result.output


def test_entry_rows_are_the_csv_values(tmp_path: Path) -> None:
    face = {"box": [1, 2, 3, 4], "face_score": 0.99996, "dominant": "happy",
            "emotions": {c: (0.25 if c == "happy" else 0.125) for c in CLASSES}}
    entries = [batch.Entry("v.mp4", frame=5, time=0.5004, faces=[face, face]), batch.Entry("x.jpg", error="bad")]
    rows = [r for e in entries for r in batch.entry_rows(e, CLASSES)]
    assert [list(r) for r in rows] == [batch.csv_header(CLASSES)] * 3
    assert rows[1]["face"] == 2 and rows[1]["time"] == 0.5 and rows[1]["face_score"] == 1.0
    assert rows[2] == {**dict.fromkeys(batch.csv_header(CLASSES)), "file": "x.jpg", "error": "bad"}
    batch.write_csv(entries, tmp_path / "r.csv", CLASSES)
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[1] == "v.mp4,5,0.500,1,1,2,3,4,1.0000,happy,0.1250,0.1250,0.1250,0.2500,0.1250,0.1250,0.1250,"
    assert lines[3] == "x.jpg,,,,,,,,,,,,,,,,,bad"
    assert [_typed(next(csv.reader([line])), lines[0].split(",")) for line in lines[1:]] == [
        tuple(r.values()) for r in rows]


# -- the --ray options: usage errors before any Ray starts ------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--out", "o"], "--out is the shard folder of --ray"),
    (["--ray", "local"], "name a new folder with --out DIR"),
    (["--ray", " ", "--out", "o"], "--ray needs an address"),
    (["--ray", "local", "--out", "o", "--json", "r.json"], "--json cannot be used with --ray"),
    (["--ray", "local", "--out", "o", "--csv", "r.csv", "--annotate", "a"], "--csv, --annotate cannot be used"),
    (["--ray", "local", "--out", "o", "--format", "xml"], "unknown --format 'xml'"),
    (["--ray", "local", "--out", "o", "--actors", "0"], "--actors and --batch-size must be at least 1"),
    (["--ray", "local", "--out", "o", "--batch-size", "0"], "--actors and --batch-size must be at least 1"),
])
def test_ray_usage_errors(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                          message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"")
    result = runner.invoke(app, ["predict", "x.jpg", *args, "--weights", str(weights), *CPU])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_ray_refuses_a_used_output_folder_and_no_paths(weights: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"")
    result = runner.invoke(app, ["predict", str(sample_image_path()), "--ray", "local", "--out",
                                 str(tmp_path / "out"), "--weights", str(weights), *CPU])
    assert result.exit_code == 2 and "exists and is not empty" in result.output, result.output
    result = runner.invoke(app, ["predict", "--ray", "local", "--out", str(tmp_path / "new"), "--weights",
                                 str(weights), *CPU])
    assert result.exit_code == 2 and "--ray needs PATHS or --file-list" in result.output, result.output


def test_ray_without_the_extra_names_it(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    result = runner.invoke(app, ["predict", str(sample_image_path()), "--ray", "local", "--out",
                                 str(tmp_path / "o"), "--weights", str(weights), *CPU])
    assert result.exit_code == 2, result.output
    assert "pip install 'ferkit[cluster]'" in result.output


def test_ray_it_cannot_join_is_one_clear_error(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Joining Ray is ferkit.ray_support.connect, shared with `ferkit sweep`: whatever ray.init raises becomes one
    error naming the address (not a traceback, nor the address twice)."""
    ray = pytest.importorskip("ray")
    from ferkit import ray_support
    from ferkit.inference import cluster

    assert cluster.connect is ray_support.connect

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    result = runner.invoke(app, ["predict", str(sample_image_path()), "--ray", "auto", "--out",
                                 str(tmp_path / "o"), "--weights", str(weights), *CPU])
    assert result.exit_code == 2, result.output
    assert "cannot join Ray at 'auto': ConnectionError: Could not find any running Ray instance." in result.output
    assert result.output.count("cannot join Ray") == 1 and "Traceback" not in result.output


def test_actor_turns_any_failure_into_an_error_row(weights: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: a file that raises what process_input does not expect is a row, not a failed Ray job."""
    pa = pytest.importorskip("pyarrow")
    from ferkit.inference import cluster

    actor = cluster.RecognizerActor(weights.read_bytes(), weights.name, {"device": "cpu", "backend": "torch",
                                                                         "threads": 1}, every=10)
    real = batch.process_input

    def flaky(rec, item, every):
        if item.path.name == "boom.jpg":
            raise KeyError("surprise")
        return real(rec, item, every)

    monkeypatch.setattr(batch, "process_input", flaky)
    table = cluster.input_table([batch.Input(tmp_path / "boom.jpg", "boom.jpg", Path("boom.jpg")),
                                 batch.Input(sample_image_path(), "sample", Path("s.jpg"))],
                                [batch.Entry("gone.jpg", error="file or folder not found")])
    rows = actor(table).to_pylist()
    assert actor(table).schema == cluster.row_schema(CLASSES) and isinstance(actor(table), pa.Table)
    assert rows[0]["file"] == "boom.jpg" and rows[0]["error"] == "failed: KeyError: 'surprise'"
    assert rows[1]["file"] == "sample" and rows[1]["face"] == 1 and rows[1]["error"] is None
    assert rows[-1] == {**dict.fromkeys(batch.csv_header(CLASSES)), "file": "gone.jpg",
                        "error": "file or folder not found"}


# -- the Ray path on a local Ray ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for this module's tests, stopped after them."""
    ray = pytest.importorskip("ray", reason="the cluster extra (ray[data]) is not installed")

    def too_slow(signum, frame):
        raise TimeoutError("Ray tests took over 240 s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(240)  # a Ray that cannot schedule its actors waits forever: fail instead
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=300 * 1024**2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster-inputs")
    _face_images(root / "faces", 300)
    _bad_and_odd_files(root / "odd")
    return root


def test_ray_rows_equal_single_process_rows(ray_address: str, inputs: Path, weights: Path, tmp_path: Path) -> None:
    sources = [str(inputs / "faces"), str(inputs / "odd"), str(inputs / "missing.jpg"),
               str(inputs / "nothing-*.png")]
    single = runner.invoke(app, ["predict", *sources, "--csv", str(tmp_path / "single.csv"), "--weights",
                                 str(weights), "--every", "5", "--threads", "1", *CPU])
    assert single.exit_code == 1, single.output  # the bad files
    expected = _single_process_rows(tmp_path / "single.csv")
    assert len(expected) > 300 and any(r[9] for r in expected)  # faces were found, not just "no face" rows
    assert {r[1] for r in expected if r[0].endswith("clip.avi")} == {0, 5, 10}  # the video's sampled frames

    listing = tmp_path / "list.txt"  # the same inputs, this time half of them from a file list
    listing.write_text("\n".join(sources[1:]) + "\n")
    result = runner.invoke(app, ["predict", sources[0], "--file-list", str(listing), "--ray", ray_address,
                                 "--out", str(tmp_path / "shards"), "--actors", "2", "--batch-size", "8",
                                 "--weights", str(weights), "--every", "5", *CPU])
    assert result.exit_code == 1, result.output
    from ferkit.inference import cluster

    table = cluster.read_rows(str(tmp_path / "shards"), "parquet", CLASSES)
    assert table.schema == cluster.row_schema(CLASSES)
    assert len(list((tmp_path / "shards").glob("*.parquet"))) > 1  # shards, written by the workers
    assert _sorted([tuple(r.values()) for r in table.to_pylist()]) == expected
    note = next(line for line in single.output.splitlines() if " face(s), " in line)
    assert note in result.output  # the same summary: files, faces, errors, skipped files
    assert "wrote parquet shards" in result.output


def test_ray_csv_shards_hold_the_same_values(ray_address: str, inputs: Path, weights: Path, tmp_path: Path) -> None:
    sources = [str(inputs / "odd"), str(inputs / "faces" / "d1")]
    single = runner.invoke(app, ["predict", *sources, "--csv", str(tmp_path / "single.csv"), "--weights",
                                 str(weights), "--threads", "1", *CPU])
    result = runner.invoke(app, ["predict", *sources, "--ray", ray_address, "--out", str(tmp_path / "shards"),
                                 "--format", "csv", "--weights", str(weights), *CPU])
    assert result.exit_code == single.exit_code == 1, result.output
    from ferkit.inference import cluster

    rows = cluster.read_rows(str(tmp_path / "shards"), "csv", CLASSES).to_pylist()
    assert _sorted([tuple(r.values()) for r in rows]) == _single_process_rows(tmp_path / "single.csv")
