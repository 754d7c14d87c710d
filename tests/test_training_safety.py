"""Trainer safety (issue #26): a run never writes into another run's directory, a diverged run stops before
saving non-finite weights, a damaged or unsaved run resumes or fails clearly, and shipped model names work as
teacher= and init_weights=."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file
from test_training import SMALL_MODEL, small_config, without_timing
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import DataError, file_sha256
from ferkit.data.augment import AugmentConfig
from ferkit.models.weights import shipped_weights_path
from ferkit.shared_files import claimed
from ferkit.training import TrainConfig, TrainingError, create_run, train


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


# ---- item 1: one run per directory --------------------------------------------------------------------------


def test_an_explicit_name_that_exists_is_refused_and_its_run_left_alone(tiny_csv: Path, tmp_path: Path) -> None:
    first = train(small_config(tiny_csv, tmp_path, epochs=1))
    before = run_files(first.run_dir)
    with pytest.raises(TrainingError, match=r"run directory .*run holds a run: continue it with `ferkit train "
                                            r"--resume .*`, or choose another --name"):
        train(small_config(tiny_csv, tmp_path, epochs=1, seed=7))
    assert run_files(first.run_dir) == before
    # A directory that is not a run is refused too (it may be anything of the user's).
    (tmp_path / "mine").mkdir()
    with pytest.raises(TrainingError, match="exists .not a ferkit run"):
        create_run(small_config(tiny_csv, tmp_path, run_name="mine"))
    assert list((tmp_path / "mine").iterdir()) == []


def test_cli_train_with_a_taken_name_fails_clearly(tiny_csv: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tiny_csv), "--model", SMALL_MODEL, "--epochs", "1", "--out", str(tmp_path),
            "--name", "x", "--no-progress", "precision=\"fp32\""]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "error: run directory" in again.output and "--resume" in again.output


def test_default_names_taken_in_the_same_second_get_a_suffix(tiny_csv: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import ferkit.training.trainer as trainer

    monkeypatch.setattr(trainer.time, "strftime", lambda fmt: "20261206-120000")
    dirs = [create_run(small_config(tiny_csv, tmp_path, run_name="", seed=seed)) for seed in (0, 7, 8)]
    assert [d.name for d in dirs] == [f"{SMALL_MODEL}-20261206-120000{s}" for s in ("", "-2", "-3")]
    assert [json.loads((d / "config.json").read_text())["seed"] for d in dirs] == [0, 7, 8]


def test_a_run_in_use_by_another_process_is_refused(tiny_csv: Path, tmp_path: Path) -> None:
    run_dir = create_run(small_config(tiny_csv, tmp_path, epochs=1))
    with claimed(run_dir):  # as another process training in it holds it
        with pytest.raises(TrainingError, match="in use"):
            train(resume=run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_reproduce_never_trains_in_a_directory_it_did_not_make(tiny_csv: Path, tmp_path: Path) -> None:
    from ferkit.reproduce import reproduce

    (tmp_path / "runs" / "repro-sixclass_cnn4").mkdir(parents=True)
    with pytest.raises(TrainingError, match="not a ferkit run"):
        reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                  extra=["epochs=1", "precision=fp32"], progress=False)
    assert list((tmp_path / "runs" / "repro-sixclass_cnn4").iterdir()) == []


# ---- item 10: resuming what a kill or a full disk left ------------------------------------------------------


def test_a_run_with_no_epoch_saved_resumes_from_its_first_epoch(tiny_csv: Path, tmp_path: Path) -> None:
    # config.json is written before training: a run killed in its first epoch is still a run to resume.
    full = train(small_config(tiny_csv, tmp_path / "full", epochs=2))
    run_dir = create_run(small_config(tiny_csv, tmp_path / "killed", epochs=2))
    resumed = train(resume=run_dir)
    assert without_timing(resumed.history) == without_timing(full.history)


def test_reproduce_resumes_a_run_that_saved_no_epoch(tiny_csv: Path, tmp_path: Path) -> None:
    import ferkit.training.trainer as trainer
    from ferkit.reproduce import reproduce

    def killed(path: Path, state: dict) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:  # the first attempt dies before its first checkpoint
        m.setattr(trainer, "_save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                      extra=["epochs=1", "precision=fp32"], progress=False)
    run_dir = tmp_path / "runs" / "repro-sixclass_cnn4"
    overrides = (run_dir / "reproduce_overrides.json").read_text()
    with claimed(run_dir):  # another process resuming it: this one writes nothing into it
        with pytest.raises(TrainingError, match="in use"):
            reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                      extra=["threads=1"], progress=False)
    assert (run_dir / "reproduce_overrides.json").read_text() == overrides
    row = reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                    extra=["epochs=1", "precision=fp32"], progress=False)
    assert row["epochs"] == "1" and row["command"].endswith("epochs=1 precision=fp32")


def disk_full_at_checkpoint(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """torch.save writes part of the checkpoint of `epoch`, then the disk is full."""
    import ferkit.training.trainer as trainer

    real_save = torch.save

    def save(state, path):
        if state["epoch"] == epoch:
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(state, path)

    monkeypatch.setattr(trainer.torch, "save", save)


@pytest.mark.parametrize("failing_epoch", [1, 2])
def test_a_full_disk_at_a_checkpoint_is_a_clear_error_and_the_run_resumes(
        tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_epoch: int) -> None:
    full = train(small_config(tiny_csv, tmp_path / "full", epochs=2))
    with monkeypatch.context() as m:
        disk_full_at_checkpoint(m, failing_epoch)
        kept = ("its checkpoint of epoch 1 is intact" if failing_epoch == 2
                else "no epoch was saved yet: it starts again from its config.json")
        with pytest.raises(TrainingError, match=f"could not save epoch {failing_epoch} in .*No space left.*{kept}"):
            train(small_config(tiny_csv, tmp_path / "run", epochs=2))
    run_dir = tmp_path / "run" / "run"
    assert not list(run_dir.glob("*.tmp*"))  # the partial temporary file is removed
    if failing_epoch == 2:
        assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train(resume=run_dir)
    assert without_timing(resumed.history) == without_timing(full.history)


@pytest.mark.parametrize("damage, message", [
    ({"checkpoint.pt": b""}, "checkpoint.pt or metrics.csv is damaged"),
    ({"checkpoint.pt": b"not a checkpoint at all"}, "checkpoint.pt or metrics.csv is damaged"),
    ({"metrics.csv": b"epoch,step\nx,y\n"}, "checkpoint.pt or metrics.csv is damaged"),
    # A file cut to its header (or emptied) resumed before, dropping the trained epochs from the run's record.
    ({"metrics.csv": b"epoch,step,lr,train_loss,train_acc,val_loss,val_acc\n"},
     r"checkpoint.pt or metrics.csv is damaged \(metrics.csv holds epochs \[\] where checkpoint.pt has trained 1\)"),
    ({"metrics.csv": b""}, "checkpoint.pt or metrics.csv is damaged"),
    ({"config.json": b"{\"epochs\": 2,"}, "config.json is missing or damaged"),
    ({"config.json": b"{\"epochz\": 2}"}, "config.json is missing or damaged"),
    ({"config.json": b"{\"epochs\": \"two\"}"}, "config.json is missing or damaged"),
])
def test_resuming_a_damaged_run_is_a_clear_error(tiny_csv: Path, tmp_path: Path, damage: dict[str, bytes],
                                                  message: str) -> None:
    run_dir = train(small_config(tiny_csv, tmp_path, epochs=2), stop_after_epochs=1).run_dir
    for name, content in damage.items():
        (run_dir / name).write_bytes(content)
    with pytest.raises(TrainingError, match=f"cannot resume {run_dir}: its {message}"):
        train(resume=run_dir)
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--no-progress"])
    assert result.exit_code == 2 and f"error: cannot resume {run_dir}" in result.output


# ---- item 2: divergence ---------------------------------------------------------------------------------------


def test_a_diverged_run_stops_before_saving_non_finite_weights(tiny_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"training diverged in epoch 1: the training loss became NaN or "
                                            r"infinite \(step.*\).*lower lr \(it is 1e\+06\) or gradient clipping"):
        train(small_config(tiny_csv, tmp_path, epochs=2, lr=1e6, save_every=1))
    run_dir = tmp_path / "run"
    assert not any((run_dir / f).exists() for f in ("best.safetensors", "last.safetensors", "checkpoint.pt"))
    for snapshot in (run_dir / "snapshots").glob("*.safetensors"):  # any kept snapshot is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(snapshot)).values()), snapshot.name


def test_non_finite_weights_are_caught_even_with_a_finite_loss() -> None:
    from ferkit.training import TrainConfig
    from ferkit.training.trainer import _require_finite

    model = torch.nn.Linear(2, 2)
    assert _require_finite(TrainConfig(), 0, 0, 5, torch.tensor(3.0), model) == 5
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert _require_finite(TrainConfig(), 0, 0, 5, torch.tensor(3.0)) == 5  # the loss alone is checked
    with pytest.raises(TrainingError, match=r"in epoch 1: the weights became NaN or infinite \(steps 1-5\)"):
        _require_finite(TrainConfig(grad_clip=1.0), 0, 0, 5, torch.tensor(3.0), model)


def test_cli_train_with_a_huge_lr_fails_clearly(tiny_csv: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_csv), "--model", SMALL_MODEL, "--epochs", "1",
                                      "--out", str(tmp_path), "--lr", "1e6", "--no-progress", "precision=\"fp32\""])
    # Two steps whose loss stays finite leave weights too large to compute with: validation finds it.
    assert result.exit_code == 2 and "error: training diverged in epoch 1" in result.output, result.output
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("checkpoint.pt"))


# ---- item 13: shipped names as teacher= and init_weights= ------------------------------------------------------


CONV = "blocks.0.body.0.0.weight"  # a convolution of mini_xception: lr 0 leaves it as loaded


def test_shipped_names_work_as_teacher_and_init_weights(tiny_csv: Path, tmp_path: Path) -> None:
    taught = train(small_config(tiny_csv, tmp_path / "kd", epochs=1, teacher="default"))
    fast = load_file(str(shipped_weights_path("fast")))
    kwargs = {"stem": 16, "stem_stride": 2, "widths": [32, 64, 128, 256]}
    started = train(small_config(tiny_csv, tmp_path / "ft", epochs=1, model="mini_xception", model_kwargs=kwargs,
                                 init_weights="fast", lr=0.0, weight_decay=0.0))
    assert torch.equal(load_file(str(started.run_dir / "best.safetensors"))[CONV], fast[CONV])
    for run, key, name in ((taught, "teacher", "default"), (started, "init_weights", "fast")):
        manifest = json.loads((run.run_dir / "manifest.json").read_text())
        assert manifest[key] == {"path": name, "sha256": file_sha256(shipped_weights_path(name))}


@pytest.mark.parametrize("setting, message", [
    ({"teacher": "nope.safetensors"}, "teacher nope.safetensors: no such weights file .nor a shipped model"),
    ({"init_weights": "defualt"}, "init_weights defualt: no such weights file"),
    ({"init_weights": "default"}, "init_weights default holds model ferkit_vgg_s"),
    ({"model": "nope"}, "unknown model 'nope'"),
    ({"model_kwargs": {"depth": 3}}, "model_kwargs {'depth': 3} do not fit model sixclass_cnn4"),
    # Numeric settings a run cannot use: torch crashed on these (a segfault at a million threads), trained nothing
    # and reported success (early_stopping=-1), divided by zero, or wrote NaN into config.json (not JSON).
    ({"threads": -1}, r"threads must be a number of CPU threads, 1 to 1024 \(0 = torch's default\), got -1"),
    ({"threads": 1_000_000}, "threads must be .*got 1000000"),
    ({"early_stopping": -1}, r"early_stopping must be epochs >= 0 \(0 = off\), got -1"),
    ({"step_every": 0}, "step_every must be optimizer steps >= 1, got 0"),
    ({"step_every": -1}, "step_every must be .*got -1"),
    ({"time_limit": math.nan}, "time_limit must be .*got nan"),
    ({"grad_clip": math.inf}, "grad_clip must be .*got inf"),
    ({"weight_decay": math.nan}, "weight_decay must be .*got nan"),
    ({"lr": -0.1}, "lr must be a learning rate >= 0"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
    ({"seed": -1}, r"seed must be a whole number in \[0, 2\^32\), got -1"),
    ({"warmup_epochs": math.inf}, "warmup_epochs must be .*got inf"),
    ({"plateau_factor": 1.5}, "plateau_factor must be a factor in .0, 1.. got 1.5"),
    ({"backbone_lr_scale": math.nan}, "backbone_lr_scale must be >= 0"),
    ({"threads": "2"}, "threads must be int, got '2'"),
    ({"lr": "abc"}, "lr must be int or float, got 'abc'"),
    ({"nesterov": 1}, "nesterov must be bool, got 1"),
    ({"model_kwargs": "x"}, "model_kwargs must be dict, got 'x'"),
    ({"augment": AugmentConfig(rotation=math.nan)}, "augment.rotation must be a finite number >= 0"),
    ({"augment": AugmentConfig(hflip=1.5)}, r"augment.hflip must be a probability in \[0, 1\], got 1.5"),
    ({"augment": AugmentConfig(crop_scale=(1.0, 0.5))}, "augment.crop_scale must be a range .lo, hi. with 0 < lo"),
    ({"augment": AugmentConfig(erasing_scale=(0.0, 0.2))}, "augment.erasing_scale must be a range"),
    ({"run_name": "../escape"}, r"run name '../escape' must be a folder inside the output folder \(no absolute"),
    ({"run_name": "exp/../../escape"}, "run name 'exp/../../escape' must be a folder inside"),
    ({"run_name": "/tmp/escape"}, "run name '/tmp/escape' must be a folder inside"),
])
def test_bad_settings_fail_before_any_run_directory(tiny_csv: Path, tmp_path: Path, setting: dict,
                                                    message: str) -> None:
    # A run directory left by a typo would hold its name: `--name X` again would be refused.
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train(small_config(tiny_csv, tmp_path / "runs", **setting))
    assert not (tmp_path / "runs").exists()


def test_a_run_name_may_be_a_folder_inside_the_output_folder(tiny_csv: Path, tmp_path: Path) -> None:
    run = train(small_config(tiny_csv, tmp_path / "runs", epochs=1, run_name="exp/seed0")).run_dir
    assert run == tmp_path / "runs" / "exp" / "seed0" and (run / "best.safetensors").is_file()
    train(resume=run)  # finished: resumes without training


def test_every_float_setting_refuses_nan_naming_it() -> None:
    # NaN passes every `<` test: each float setting needs a check of its own, or it reaches config.json (where it
    # is not JSON) and the run.
    floats = [f.name for f in dataclasses.fields(TrainConfig) if isinstance(getattr(TrainConfig(), f.name), float)]
    assert len(floats) > 15
    for name in floats:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            TrainConfig(**{name: math.nan}).validate()


def test_an_out_folder_that_is_a_file_is_refused_and_kept(tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    out.write_text("someone's notes")
    with pytest.raises(ValueError, match=r"out_dir \(--out\) .*results.txt is a file, not a folder"):
        train(small_config(tiny_csv, out))
    assert out.read_text() == "someone's notes"


@pytest.mark.parametrize("key, value, message", [
    ("threads", "2", "threads must be int, got '2'"),
    ("lr", "abc", "lr must be int or float, got 'abc'"),
    ("model_kwargs", "x", "model_kwargs must be dict, got 'x'"),
    ("threads", -1, "threads must be a number of CPU threads"),
    ("augment", "x", "augment must be a mapping"),
])
def test_resuming_a_config_json_with_bad_values_is_refused_naming_the_setting(
        tiny_csv: Path, tmp_path: Path, key: str, value: object, message: str) -> None:
    run = train(small_config(tiny_csv, tmp_path, epochs=2), stop_after_epochs=1).run_dir
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(TrainingError, match=f"cannot resume .*config.json is missing or damaged .{message}"):
        train(resume=run)
    # A resume's own bad run setting is refused before it is saved, so the next plain resume still works.
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="threads must be"):
        train(resume=run, changes=TrainConfig().resume_changes(["threads=-1"]))
    assert json.loads((run / "config.json").read_text())["threads"] == config["threads"]


# ---- review: a new run that fails before its first checkpoint frees its name -----------------------------------


@pytest.fixture
def bad_row_csv(tmp_path: Path, cache_dir: Path) -> Path:
    """tiny_csv's faces with one row whose pixels are cut short: a DataError unless skip_bad_rows."""
    rows = synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35})
    rows[3] = (rows[3][0], " ".join(rows[3][1].split()[:100]), rows[3][2])
    return write_csv(tmp_path / "bad.csv", rows)


def test_a_new_run_failing_before_its_first_checkpoint_leaves_no_directory(bad_row_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError):
        train(small_config(bad_row_csv, tmp_path / "runs", epochs=1))
    assert not (tmp_path / "runs" / "run").exists()
    # the same name, with the setting that was missing: a new run (not "holds a run: continue it with --resume")
    result = train(small_config(bad_row_csv, tmp_path / "runs", epochs=1, skip_bad_rows=True))
    assert result.run_dir == tmp_path / "runs" / "run" and (result.run_dir / "checkpoint.pt").is_file()


def test_cli_train_retries_a_failed_new_run_under_its_name(bad_row_csv: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(bad_row_csv), "--model", SMALL_MODEL, "--epochs", "1", "--out", str(tmp_path),
            "--name", "x", "--no-progress", "precision=\"fp32\"", "batch_size=16"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 2 and "line 5" in first.output, first.output
    again = CliRunner().invoke(app, [*args, "skip_bad_rows=true"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "x" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("case", ["no PublicTest rows", "diverged"])
def test_other_failures_of_a_new_run_free_its_name(tiny_csv: Path, tmp_path: Path, case: str) -> None:
    if case == "no PublicTest rows":
        train_only = write_csv(tmp_path / "train_only.csv", synthetic_rows({"Training": 20}))
        cfg, error = small_config(train_only, tmp_path / "runs", epochs=1), ValueError
    else:
        cfg, error = small_config(tiny_csv, tmp_path / "runs", epochs=1, lr=1e6), TrainingError
    with pytest.raises(error):
        train(cfg)
    assert not (tmp_path / "runs" / "run").exists()


def test_a_failed_new_run_holding_other_files_or_interrupted_is_kept(bad_row_csv: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import ferkit.training.trainer as trainer

    real_create = trainer.create_run

    def create_with_a_file(cfg):  # someone put a file in the directory while the run started
        run_dir = real_create(cfg)
        (run_dir / "notes.txt").write_text("mine")
        return run_dir

    with monkeypatch.context() as m:
        m.setattr(trainer, "create_run", create_with_a_file)
        with pytest.raises(DataError):
            train(small_config(bad_row_csv, tmp_path / "a", epochs=1))
    assert sorted(p.name for p in (tmp_path / "a" / "run").iterdir()) == ["config.json", "notes.txt"]

    def interrupted(*args, **kwargs):  # Ctrl-C while the data loads: the run stays, to resume
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer, "load_dataset", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(small_config(bad_row_csv, tmp_path / "b", epochs=1, skip_bad_rows=True))
    run_dir = tmp_path / "b" / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    assert train(resume=run_dir).epochs_run == 1
    # a resumed run that fails is never removed
    (run_dir / "checkpoint.pt").unlink()
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(config | {"skip_bad_rows": False}))
    for name in ("best.safetensors", "last.safetensors", "metrics.csv", "curves.png", "manifest.json"):
        (run_dir / name).unlink()
    with pytest.raises(DataError):
        train(resume=run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_reproduce_retries_a_failed_new_run(bad_row_csv: Path, tmp_path: Path) -> None:
    from ferkit.reproduce import reproduce

    where = {"runs_dir": tmp_path / "runs", "results_dir": tmp_path / "results", "progress": False}
    with pytest.raises(DataError):
        reproduce("sixclass_cnn4", bad_row_csv, extra=["epochs=1", "precision=fp32"], **where)
    assert not (tmp_path / "runs" / "repro-sixclass_cnn4").exists()
    # other overrides for the same system: a new run (not "was started with overrides ...")
    row = reproduce("sixclass_cnn4", bad_row_csv, extra=["epochs=1", "precision=fp32", "skip_bad_rows=true"], **where)
    assert row["epochs"] == "1" and row["command"].endswith("skip_bad_rows=true")


def test_a_two_process_run_with_settings_it_cannot_share_frees_its_name(tiny_csv: Path, tmp_path: Path) -> None:
    from test_distributed import torchrun

    out = torchrun(2, ["-m", "ferkit", "train", "--data", str(tiny_csv), "--out", str(tmp_path / "runs"),
                       "--name", "x", "--model", SMALL_MODEL, "--epochs", "1", "--no-progress", "batch_size=15",
                       "precision=\"fp32\"", "threads=1"], cwd=tmp_path)
    assert out.returncode != 0 and "make it a multiple of 2" in out.stdout, out.stdout[-3000:]
    assert not (tmp_path / "runs" / "x").exists()


# ---- review: resume does not need the initial weights' file again --------------------------------------------


def test_resume_records_the_initial_weights_the_run_started_from(tiny_csv: Path, tmp_path: Path) -> None:
    source = train(small_config(tiny_csv, tmp_path / "source", epochs=1)).run_dir / "last.safetensors"
    init = tmp_path / "init.safetensors"
    init.write_bytes(source.read_bytes())
    started = {"path": str(init), "sha256": file_sha256(init)}
    run_dir = train(small_config(tiny_csv, tmp_path / "runs", epochs=3, init_weights=str(init)),
                    stop_after_epochs=1).run_dir
    assert json.loads((run_dir / "manifest.json").read_text())["init_weights"] == started
    init.unlink()  # gone: the checkpoint holds what the run learned from it
    train(resume=run_dir, stop_after_epochs=1)
    assert json.loads((run_dir / "manifest.json").read_text())["init_weights"] == started
    # replaced by other weights: the record stays the file the run started from
    other = train(small_config(tiny_csv, tmp_path / "other", epochs=1, seed=5)).run_dir / "last.safetensors"
    init.write_bytes(other.read_bytes())
    assert train(resume=run_dir).epochs_run == 3
    assert json.loads((run_dir / "manifest.json").read_text())["init_weights"] == started


def test_resume_goes_on_when_the_initial_weights_and_their_record_are_both_gone(tiny_csv: Path,
                                                                                 tmp_path: Path) -> None:
    source = train(small_config(tiny_csv, tmp_path / "source", epochs=1)).run_dir / "last.safetensors"
    init = tmp_path / "init.safetensors"
    init.write_bytes(source.read_bytes())
    run_dir = train(small_config(tiny_csv, tmp_path / "runs", epochs=2, init_weights=str(init)),
                    stop_after_epochs=1).run_dir
    init.unlink()
    (run_dir / "manifest.json").write_text("{not json")
    assert train(resume=run_dir).epochs_run == 2  # the checkpoint holds what the run learned from the file
    record = json.loads((run_dir / "manifest.json").read_text())["init_weights"]
    assert record["path"] == str(init) and record["sha256"] is None and "file gone" in record["note"]
