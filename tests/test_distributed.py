"""Training on several processes (torchrun, gloo on CPU): the same run as one process, exact resume after a kill,
one process unchanged, reproduce, and the refusals (another world size, settings that cannot be shared).

The multi-process tests start `torchrun` themselves on 127.0.0.1 with a free port, on tiny synthetic data and the
cheapest model, each launch bounded by a timeout after which its whole process group is killed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file

from ferkit.training import TrainConfig, TrainingError, train
from ferkit.training.distill import distillation_loss
from ferkit.training.distributed import Dist
from ferkit.training.trainer import _check_shares, _share_loss

LAUNCH_TIMEOUT = 120  # seconds for one torchrun launch (a few seconds when the machine is free)
# The run both sides train: augmentation on (each process keeps its share of the globally augmented batch),
# balanced class weights with label smoothing (the loss normalizer is the whole batch's), 70 faces in batches
# of 16 (the last batch, 6 faces, splits 3 + 3) and 35 PublicTest faces (17 + 18). A small learning rate keeps
# float rounding from growing into visible differences.
SETTINGS = {"model": "sixclass_cnn4", "epochs": 3, "batch_size": 16, "lr": 0.01, "precision": "fp32",
            "class_weights": "balanced", "label_smoothing": 0.1, "threads": 1, "seed": 0}


def flags(settings: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N <args>` on 127.0.0.1; its process group is killed when it overruns."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun overran {timeout}s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def train_cli(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "ferkit", "train", "--data", str(data), "--out", str(out), "--no-progress", *extra,
            *flags(SETTINGS)]


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp:  # this module's processes (and their children) cache under d
        mp.setenv("FERKIT_CACHE", str(d / "cache"))
        yield write_csv(d / "tiny.csv", synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35}))


@pytest.fixture(scope="module")
def two_process_run(data: Path) -> Path:
    """An uninterrupted 2-process run, started as the README says (no --name: rank 0 names the directory)."""
    out = data.parent / "two"
    done = torchrun(2, train_cli(data, out), cwd=data.parent)
    assert done.returncode == 0, done.stdout[-4000:]
    runs = list(out.iterdir())
    assert len(runs) == 1, f"one run directory for the two processes, got {runs}"  # rank 0 alone makes it
    assert done.stdout.count("ferkit train:") == 1, done.stdout[-4000:]  # rank 0 alone speaks
    return runs[0]


def test_two_processes_train_the_one_process_run(data: Path, two_process_run: Path, tmp_path: Path) -> None:
    one = train(TrainConfig(data=str(data), out_dir=str(tmp_path), run_name="one", progress=False, **SETTINGS))
    manifest = json.loads((two_process_run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and json.loads((one.run_dir / "manifest.json").read_text())["world_size"] == 1
    assert manifest["command"].startswith("torchrun --nproc_per_node 2 -m ferkit train --data ")  # how to rerun it
    assert torch.load(two_process_run / "checkpoint.pt", weights_only=True)["world_size"] == 2
    # Same global batch, same faces, same augmentation: the same weights up to float rounding.
    two_w = load_file(str(two_process_run / "last.safetensors"))
    one_w = load_file(str(one.run_dir / "last.safetensors"))
    for k, v in one_w.items():
        torch.testing.assert_close(two_w[k], v, rtol=1e-4, atol=1e-6, msg=k)
    two_rows, one_rows = metrics(two_process_run), [{k: float(v) for k, v in r.items()
                                                     if k not in ("seconds", "val_weights")} for r in one.history]
    assert [r["val_acc"] for r in two_rows] == [str(r["val_acc"]) for r in one_rows]  # evaluation gathered
    for a, b in zip(two_rows, one_rows, strict=True):
        for k in ("train_loss", "train_acc", "val_loss", "lr"):
            assert float(a[k]) == pytest.approx(b[k], rel=1e-5, abs=1e-9), k


def cli_worker(patch: str, records: str | None = None) -> str:
    """Source of a torchrun worker script: `patch` (Python source) wraps some ferkit function, then the worker runs
    the ferkit CLI with the script's arguments. With `records`, the list of that name (filled by the patch) is
    written to `<records><RANK>.json` in the working directory however the command ends: when the CLI's app returns
    or raises, since a worker then ends with os._exit (`ferkit.cli.main`), past any `finally` around main()."""
    run = 'sys.argv = ["ferkit", *sys.argv[1:]]\n'
    if records is not None:
        run += ("import ferkit.cli as cli\ncommand = cli.app\n\ndef recorded():\n    try:\n        command()\n"
                f"    finally:\n        with open(f\"{records}{{os.environ['RANK']}}.json\", \"w\") as f:\n"
                f"            json.dump({records}, f)\n\ncli.app = recorded\n")
    return "import json, os, sys\n" + textwrap.dedent(patch) + "\nfrom ferkit.cli import main\n" + run + "main()\n"


KILLED_WORKER = cli_worker("""
    # Rank 0 dies (SIGKILL) in epoch 2's save, after its weights and metrics and before its checkpoint: the worst
    # moment, as a kill or a power cut would choose it. torchrun then stops the other process.
    import signal
    import torch.distributed as dist
    from ferkit.training import trainer

    save, calls = trainer._save_checkpoint, []

    def dying_save(path, state):
        calls.append(path)
        if len(calls) == 2 and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        save(path, state)

    trainer._save_checkpoint = dying_save
""")


def test_a_killed_two_process_run_resumes_to_the_same_result(data: Path, two_process_run: Path,
                                                            tmp_path: Path) -> None:
    worker = tmp_path / "killed_worker.py"
    worker.write_text(KILLED_WORKER)
    args = train_cli(data, tmp_path / "runs", "--name", "cut")[2:]  # without "-m ferkit"
    killed = torchrun(2, [str(worker), *args], cwd=tmp_path)
    run = tmp_path / "runs" / "cut"
    assert killed.returncode != 0, killed.stdout[-4000:]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 2's files, epoch 1's checkpoint
    resumed = torchrun(2, ["-m", "ferkit", "train", "--resume", str(run), "--no-progress"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert metrics(run) == metrics(two_process_run)
    full, again = load_file(str(two_process_run / "last.safetensors")), load_file(str(run / "last.safetensors"))
    for k, v in full.items():
        assert torch.equal(v, again[k]), k
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2


def test_two_processes_distil_from_cached_views_as_one_process(data: Path, tmp_path: Path) -> None:
    # distill_view=cached under torchrun: rank 0 builds the views and saves them while the other process waits,
    # the other reads them (the teacher runs once, not once per process), and the run is the one-process run.
    from ferkit.data import get_label_set
    from ferkit.models import create_model
    from ferkit.models.weights import save_weights

    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("sixclass_cnn4", num_classes=7).eval(), teacher,
                 {"model": "sixclass_cnn4", "num_classes": 7, "label_set": "fer7", "input_size": 48,
                  "classes": list(get_label_set("fer7").classes), "normalize": "dataset", "model_kwargs": {}})
    cached = {"teacher": str(teacher), "distill_view": "cached", "distill_views": 2, "mixup_alpha": 0.4}
    worker = tmp_path / "views_worker.py"
    worker.write_text(cli_worker("""
        from ferkit.training import teacher_views

        build, builds = teacher_views.build, []

        def counted_build(*args, **kwargs):
            builds.append(1)
            return build(*args, **kwargs)

        teacher_views.build = counted_build
    """, records="builds"))
    args = [*train_cli(data, tmp_path / "two", "--name", "two"), *flags(cached)][2:]  # without "-m ferkit"
    two = torchrun(2, [str(worker), *args], cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-4000:]
    assert [json.loads((tmp_path / f"builds{rank}.json").read_text()) for rank in (0, 1)] == [[1], []]
    one = train(TrainConfig(data=str(data), out_dir=str(tmp_path), run_name="one", progress=False,
                            **SETTINGS, **cached))
    two_w, one_w = load_file(str(tmp_path / "two" / "two" / "last.safetensors")), load_file(
        str(one.run_dir / "last.safetensors"))
    for k, v in one_w.items():
        torch.testing.assert_close(two_w[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert not (tmp_path / "two" / "two" / "teacher_views.pt").exists()  # the run is over


def test_resuming_under_another_number_of_processes_is_refused(two_process_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(two_process_run, tmp_path / "copy")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingError, match=r"trained by 2 processes.*torchrun --nproc_per_node 2"):
        train(resume=run)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_torchrun_with_one_process_is_the_one_process_run(data: Path, tmp_path: Path) -> None:
    """One process under torchrun takes the one-process code path: bit-identical weights and metrics."""
    done = torchrun(1, train_cli(data, tmp_path / "tr", "--name", "r"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    plain = train(TrainConfig(data=str(data), out_dir=str(tmp_path / "plain"), run_name="r", progress=False,
                              **SETTINGS))
    a = load_file(str(tmp_path / "tr" / "r" / "last.safetensors"))
    b = load_file(str(plain.run_dir / "last.safetensors"))
    for k, v in b.items():
        assert torch.equal(a[k], v), k
    assert metrics(tmp_path / "tr" / "r") == metrics(plain.run_dir)


def test_reproduce_under_torchrun_trains_once_and_records_once(data: Path, tmp_path: Path) -> None:
    args = ["-m", "ferkit", "reproduce", "sixclass_cnn4", "--data", str(data), "--runs", "runs", "--results",
            "results", "--no-progress", "epochs=1"]
    done = torchrun(2, args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    assert done.stdout.count("row written to") == 1  # rank 0 evaluates and reports; the other process returns
    manifest = json.loads((tmp_path / "runs" / "repro-sixclass_cnn4" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["epochs_done"] == 1
    with open(tmp_path / "results" / "seeds.csv") as f:
        assert [row["name"] for row in csv.DictReader(f)] == ["sixclass_cnn4"]


# ---- in-process checks of the pieces (no processes started) -------------------------------------------------


@pytest.mark.parametrize("case", ["labels", "weighted_smoothed", "soft_weighted", "distilled"])
def test_the_shares_losses_average_to_the_whole_batch_gradient(case: str) -> None:
    """DDP averages the processes' gradients: the share losses must make that average the gradient of the
    one-process loss of the whole batch, whatever the shares' sizes (here 3 + 4 of 7 faces)."""
    torch.manual_seed(0)
    n, c = 7, 5
    logits = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, c, (n,))
    targets = torch.softmax(torch.randn(n, c, dtype=torch.float64), 1) if case == "soft_weighted" else labels
    weight = torch.rand(c, dtype=torch.float64) + 0.5 if case in ("weighted_smoothed", "soft_weighted") else None
    teacher = torch.softmax(torch.randn(n, c, dtype=torch.float64), 1) if case == "distilled" else None
    cfg = TrainConfig(label_smoothing=0.1 if case == "weighted_smoothed" else 0.0,
                      teacher="t" if teacher is not None else "", distill_weight=0.7, distill_temperature=4.0)
    whole = F.cross_entropy(logits, targets, weight=weight, label_smoothing=cfg.label_smoothing)
    if case == "soft_weighted":  # distributions are divided by the sum of their weights, as labels are
        whole = F.cross_entropy(logits, targets, weight=weight, reduction="sum") / (targets * weight).sum()
    if teacher is not None:
        whole = 0.3 * whole + 0.7 * distillation_loss(logits, teacher, 4.0)
    (expected,) = torch.autograd.grad(whole, logits)
    batch = torch.arange(n)
    averaged = torch.zeros_like(logits)
    for rank, share in enumerate((batch[:3], batch[3:])):
        loss = _share_loss(cfg, logits[share], targets, weight, teacher, batch, share, Dist(rank, 2))
        averaged += torch.autograd.grad(loss, logits)[0] / 2
    torch.testing.assert_close(averaged, expected)


def test_shares_cover_every_row_once_in_order() -> None:
    for n in (0, 1, 6, 7, 35):
        for world in (1, 2, 3, 4):
            rows = [i for r in range(world) for i in range(n)[Dist(r, world).shard(n)]]
            assert rows == list(range(n))


def test_settings_that_cannot_be_shared_are_clear_errors() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="multiple of 3"):
        _check_shares(TrainConfig(batch_size=16), 70, 35, cpu, Dist(0, 3))
    with pytest.raises(ValueError, match="last batch holds 1 faces"):
        _check_shares(TrainConfig(batch_size=16), 65, 35, cpu, Dist(0, 2))
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
        _check_shares(TrainConfig(batch_size=16, sync_batchnorm=True), 70, 35, cpu, Dist(0, 2))
    _check_shares(TrainConfig(batch_size=16), 70, 35, cpu, Dist(1, 2))  # the test run's shares: fine
