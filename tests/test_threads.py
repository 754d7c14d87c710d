"""Thread counts from the CPUs this process may use (affinity, cgroup quota), `Recognizer(threads=...)`, the
`--threads` options, OpenMP's passive waiting, and the default backend ("auto": ONNX Runtime on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ferkit import device
from ferkit.cli import app

runner = CliRunner()


@pytest.fixture
def one_thread():
    """Tests run torch on one thread (conftest); put it back after a test that changes it."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def no_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake cgroup tree and /proc/self/cgroup, and no OMP_NUM_THREADS."""
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc_cgroup"
    proc.write_text("")
    monkeypatch.setattr(device, "CGROUP_ROOT", root)
    monkeypatch.setattr(device, "PROC_CGROUP", proc)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return root


def fake_affinity(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


def test_default_threads_follow_the_affinity_mask(no_quota: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_affinity(monkeypatch, 6)
    assert device.cgroup_cpu_limit() is None
    assert device.default_threads() == 6
    fake_affinity(monkeypatch, 1)
    assert device.default_threads() == 1


def test_default_threads_respect_a_cgroup_v2_quota_on_the_process_path(no_quota: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake_affinity(monkeypatch, 8)
    (no_quota / "cpu.max").write_text("max 100000\n")  # the root: no limit
    job = no_quota / "user.slice" / "job"
    job.mkdir(parents=True)
    (job / "cpu.max").write_text("max 100000\n")
    (no_quota / "user.slice" / "cpu.max").write_text("150000 100000\n")  # an ancestor's 1.5 CPUs apply
    device.PROC_CGROUP.write_text("0::/user.slice/job\n")
    assert device.cgroup_cpu_limit() == pytest.approx(1.5)
    assert device.default_threads() == 2  # rounded up
    (job / "cpu.max").write_text("50000 100000\n")  # half a CPU
    assert device.default_threads() == 1


def test_default_threads_respect_a_cgroup_v1_quota(no_quota: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_affinity(monkeypatch, 4)
    cpu = no_quota / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # no limit at the top (a container sees only its own level)
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    inner = cpu / "docker" / "abc"
    inner.mkdir(parents=True)
    (inner / "cpu.cfs_quota_us").write_text("200000\n")
    (inner / "cpu.cfs_period_us").write_text("100000\n")
    device.PROC_CGROUP.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert device.cgroup_cpu_limit() == pytest.approx(2.0)
    assert device.default_threads() == 2
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")  # the mount's top level limits too
    assert device.default_threads() == 1


def test_omp_num_threads_is_the_users_explicit_choice(no_quota: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_affinity(monkeypatch, 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "nonsense")
    assert device.default_threads() == 4


def test_thread_counts_below_one_are_errors_and_too_many_are_lowered(no_quota: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake_affinity(monkeypatch, 2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            device.check_threads(bad)
    assert device.check_threads(1) == 1
    assert device.check_threads(10_000) == 2


def test_set_threads_keeps_a_lower_torch_setting_by_default(no_quota: Path, monkeypatch: pytest.MonkeyPatch,
                                                            one_thread: None) -> None:
    fake_affinity(monkeypatch, 2)
    torch.set_num_threads(1)
    assert device.set_threads() == 1 and torch.get_num_threads() == 1  # the caller's choice stands
    assert device.set_threads(2) == 2 and torch.get_num_threads() == 2
    import cv2

    assert cv2.getNumThreads() == 2


def test_recognizer_threads_set_torch_and_onnx_runtime(weights: Path, one_thread: None) -> None:
    from ferkit.inference import Recognizer

    rec = Recognizer(model=weights, detector="none", device="cpu", backend="onnx", threads=1)
    assert rec.threads == 1 and torch.get_num_threads() == 1
    assert rec._onnx.threads == 1
    assert rec._onnx.session.get_session_options().intra_op_num_threads == 1
    assert rec._onnx.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    if device.available_cpus() >= 2:
        rec = Recognizer(model=weights, detector="none", device="cpu", backend="torch", threads=2)
        assert rec.threads == 2 and torch.get_num_threads() == 2
    rec = Recognizer(model=weights, detector="none", device="cpu", backend="torch", threads=10_000)
    assert rec.threads == device.available_cpus()
    with pytest.raises(ValueError, match="at least 1"):
        Recognizer(model=weights, detector="none", device="cpu", threads=0)


@pytest.mark.parametrize("command", [["predict", "--detector", "none"], ["evaluate", "--data", "x.csv"],
                                     ["serve"]])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_option_below_one_is_a_usage_error(command: list[str], value: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("emotion,pixels,Usage\n")
    result = runner.invoke(app, [*command, "--threads", value])
    assert result.exit_code == 2, result.output
    assert "--threads must be at least 1" in result.output


def test_predict_threads_option_runs_on_that_many_threads(weights: Path, tmp_path: Path, one_thread: None) -> None:
    from ferkit.inference.image_io import sample_image_path

    result = runner.invoke(app, ["predict", str(sample_image_path()), "--weights", str(weights), "--detector",
                                 "none", "--json", "-", "--no-progress", "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert json.loads(result.stdout)["results"][0]["faces"]


def test_importing_ferkit_makes_openmp_wait_passively_unless_the_user_chose() -> None:
    code = "import os, ferkit, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


# -- the default backend -------------------------------------------------------------------------------------------


def test_auto_backend_is_onnx_on_cpu_and_gives_torchs_probabilities(weights: Path) -> None:
    from ferkit.inference import Recognizer

    auto = Recognizer(model=weights, detector="none", device="cpu")
    assert auto.backend == "onnx" and auto.backend_note == ""
    ref = Recognizer(model=weights, detector="none", device="cpu", backend="torch")
    faces = np.random.default_rng(0).integers(0, 256, (17, 48, 48), dtype=np.uint8)
    for batch in (faces[:1], faces):
        a, t = auto.predict_proba(batch), ref.predict_proba(batch)
        assert np.abs(a - t).max() < 1e-5
        assert (a.argmax(1) == t.argmax(1)).all()


@pytest.mark.parametrize("name", ["fast", "default"])
def test_auto_backend_matches_torch_on_the_shipped_models(name: str) -> None:
    from ferkit.inference import Recognizer
    from ferkit.inference.image_io import sample_image_path

    auto = Recognizer(model=name, device="cpu")
    ref = Recognizer(model=name, device="cpu", backend="torch")
    assert auto.backend == "onnx"
    got, want = auto.detect_emotions(sample_image_path()), ref.detect_emotions(sample_image_path())
    assert [f["dominant"] for f in got] == [f["dominant"] for f in want]
    for g, w in zip(got, want, strict=True):
        assert g["emotions"] == pytest.approx(w["emotions"], abs=1e-5)


def test_auto_backend_is_torch_where_onnx_does_not_apply(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit.inference import Recognizer, onnx_backend, recognizer

    assert Recognizer(model=weights, detector="none", device="cpu", precision="bf16").backend == "torch"
    assert recognizer.resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(onnx_backend, "onnx_backend_installed", lambda: False)
    assert Recognizer(model=weights, detector="none", device="cpu").backend == "torch"
    monkeypatch.undo()

    def no_export(path, cache_dir=None):
        raise ValueError("the ONNX export of tan_pca fails")

    monkeypatch.setattr(onnx_backend, "cached_export", no_export)
    rec = Recognizer(model=weights, detector="none", device="cpu")
    assert rec.backend == "torch" and "tan_pca" in rec.backend_note
    assert rec.predict_proba(np.zeros((1, 48, 48), np.uint8)).shape == (1, 7)
    with pytest.raises(ValueError, match="tan_pca"):  # asked for by name, the failure is the caller's to see
        Recognizer(model=weights, detector="none", device="cpu", backend="onnx")
