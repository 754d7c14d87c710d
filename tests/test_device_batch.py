"""tools/device_batch.py: data reassembly with a checksum, jobs under a deadline, and the pack that comes back."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("device_batch", ROOT / "tools" / "device_batch.py")
device_batch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_batch)


def test_data_is_rebuilt_from_its_parts_and_checked(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 1000
    for i in range(3):
        (tmp_path / f"d.gz.part{i:02d}").write_bytes(blob[i * 100_000:(i + 1) * 100_000])
    sha = hashlib.sha256(blob).hexdigest()
    data = tmp_path / "out" / "d.gz"
    assert device_batch.assemble_data(str(tmp_path / "d.gz.part*"), data, sha) == sha
    assert data.read_bytes() == blob
    data.unlink()
    (tmp_path / "d.gz.part01").unlink()  # a part that did not arrive
    with pytest.raises(SystemExit, match="sha256"):
        device_batch.assemble_data(str(tmp_path / "d.gz.part*"), data, sha)
    assert not data.exists()  # never left behind for a rerun to train on
    with pytest.raises(SystemExit, match="no data parts"):
        device_batch.assemble_data(str(tmp_path / "nothing*"), data, sha)


def test_jobs_run_together_and_the_deadline_stops_the_slow_one(tmp_path: Path) -> None:
    jobs = ["echo done", "exit 3", f"{sys.executable} -c 'import time; time.sleep(60)'"]
    summary = device_batch.run_jobs(jobs, deadline_s=3.0, log_dir=tmp_path / "logs", env={"PATH": "/usr/bin:/bin"},
                                    grace_s=5.0)
    assert [j["returncode"] for j in summary[:2]] == [0, 3]
    assert [j["stopped_at_deadline"] for j in summary] == [False, False, True]
    assert summary[2]["returncode"] != 0
    assert "done" in (tmp_path / "logs" / "job00.log").read_text()


def test_end_to_end_pack_holds_what_the_jobs_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "tree"
    work.mkdir()
    (work / "src").symlink_to(ROOT / "src")  # the tree's own ferkit, as on the GPU machine
    (work / "results").mkdir()
    (work / "results" / "old.csv").write_text("untouched\n")
    old_time = 1_000_000_000
    os.utime(work / "results" / "old.csv", (old_time, old_time))
    monkeypatch.chdir(work)
    job = ("ferkit models --markdown > results/models.md && mkdir -p runs/r && echo w > runs/r/best.safetensors "
           "&& echo c > runs/r/checkpoint.pt && echo v > runs/r/teacher_views.pt "
           "&& echo $FERKIT_GIT_COMMIT > results/commit.txt")
    out = tmp_path / "out"
    rc = device_batch.main([job, "--deadline", "120", "--out", str(out), "--commit", "abc123"])
    assert rc == 0
    chunks = sorted(out.glob("batch.tar.gz.*"))
    assert chunks and (out / "summary.json").is_file()
    with tarfile.open(fileobj=io.BytesIO(b"".join(c.read_bytes() for c in chunks)), mode="r:gz") as tar:
        names = tar.getnames()
        assert tar.extractfile("results/commit.txt").read().decode().strip() == "abc123"
        assert "frivas_cnn3" in tar.extractfile("results/models.md").read().decode()
    assert "runs/r/best.safetensors" in names and "runs/r/checkpoint.pt" not in names
    assert "runs/r/teacher_views.pt" not in names  # a resume file of 1 GB and more (distill_view=cached)
    assert "results/old.csv" not in names  # unchanged files stay out of the pack
    summary = json.loads((out / "summary.json").read_text())
    assert summary["commit"] == "abc123" and summary["jobs"][0]["returncode"] == 0
    assert any(n.endswith("job00.log") for n in names)


def test_results_come_first_and_big_run_files_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sizes = {"results/seeds.csv": 50, "docs/results.md": 40, "runs/a/best.safetensors": 30,
             "runs/b/best.safetensors": 500, "runs/a/metrics.csv": 10}
    for name, size in sizes.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(b"x" * size)
    packed, left_out = device_batch.within_budget([Path(n) for n in sizes], budget=140)
    assert [str(p) for p in packed] == ["results/seeds.csv", "docs/results.md", "runs/a/metrics.csv",
                                        "runs/a/best.safetensors"]
    assert [str(p) for p in left_out] == ["runs/b/best.safetensors"]
