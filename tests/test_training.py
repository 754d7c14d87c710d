"""Trainer: run-directory contents, determinism, resume equality, config overrides, option coverage."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file

from ferkit.data.augment import AugmentConfig
from ferkit.data.labels import FER2013_NAMES
from ferkit.models.weights import load_model
from ferkit.training import TrainConfig, train
from ferkit.training.distill import distillation_loss

SMALL_MODEL = "sixclass_cnn4"  # the cheapest CNN in the registry keeps these tests fast


def small_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=SMALL_MODEL, data=str(data), out_dir=str(out), run_name="run", epochs=3, batch_size=16,
                lr=0.05, precision="fp32", progress=False, seed=0)
    return TrainConfig(**(base | kw))


def test_run_directory_has_every_artifact(tiny_csv: Path, tmp_path: Path) -> None:
    result = train(small_config(tiny_csv, tmp_path, epochs=2))
    run = result.run_dir
    for name in ("config.json", "metrics.csv", "curves.png", "best.safetensors", "last.safetensors",
                 "checkpoint.pt", "manifest.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["sha256"] and len(manifest["data"]["sha256"]) == 64
    assert manifest["config"]["model"] == SMALL_MODEL
    assert manifest["epochs_done"] == 2 and "torch" in manifest["versions"] and manifest["hardware"]["cpu_count"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # The best weights rebuild into a working model that carries the label set and preprocessing.
    model, meta = load_model(run / "best.safetensors")
    assert meta["classes"][0] == "angry" and meta["num_classes"] == 7 and meta["input_size"] == 48
    assert model(torch.zeros(1, 1, 48, 48)).shape == (1, 7)


def test_learns_the_synthetic_task(tiny_csv: Path, tmp_path: Path) -> None:
    # Each synthetic class is a distinct bright stripe: a working trainer must beat chance (1/7) by far.
    result = train(small_config(tiny_csv, tmp_path, epochs=8, optimizer="adam", lr=3e-3,
                                augment=AugmentConfig.off()))
    assert result.best_val_acc > 0.6


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_same_seed_same_result(tiny_csv: Path, tmp_path: Path) -> None:
    a = train(small_config(tiny_csv, tmp_path / "a", epochs=2))
    b = train(small_config(tiny_csv, tmp_path / "b", epochs=2))
    c = train(small_config(tiny_csv, tmp_path / "c", epochs=2, seed=1))
    assert without_timing(a.history) == without_timing(b.history)
    assert without_timing(a.history) != without_timing(c.history)


@pytest.mark.parametrize("schedule", ["cosine", "plateau", "step", "onecycle"])
def test_resume_after_kill_matches_uninterrupted_run(tiny_csv: Path, tmp_path: Path, schedule: str) -> None:
    cfg = dict(epochs=3, schedule=schedule, step_every=3, gamma=0.5, plateau_patience=0)
    full = train(small_config(tiny_csv, tmp_path / "full", **cfg))
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **cfg), stop_after_epochs=1)
    assert killed.epochs_run == 1
    resumed = train(resume=killed.run_dir)
    assert without_timing(resumed.history) == without_timing(full.history)
    final_full = load_file(str(full.run_dir / "last.safetensors"))
    final_resumed = load_file(str(resumed.run_dir / "last.safetensors"))
    for k, v in final_full.items():
        assert torch.equal(v, final_resumed[k]), k
    manifest = json.loads((resumed.run_dir / "manifest.json").read_text())
    assert manifest["epochs_done"] == 3
    # metrics.csv is rewritten from the rows read back on resume: same text as the uninterrupted run's
    # (epoch and step stay integers), apart from the timings.
    assert metrics_without_timing(resumed.run_dir) == metrics_without_timing(full.run_dir)


def test_a_resumed_run_takes_no_new_config(tiny_csv: Path, tmp_path: Path) -> None:
    killed = train(small_config(tiny_csv, tmp_path, epochs=2), stop_after_epochs=1)
    with pytest.raises(ValueError, match="pass resume= alone, and changes= for its run settings"):
        train(small_config(tiny_csv, tmp_path, epochs=2, lr=0.5), resume=killed.run_dir)


def test_each_stretch_of_a_resumed_run_is_in_its_manifest(tiny_csv: Path, tmp_path: Path) -> None:
    killed = train(small_config(tiny_csv, tmp_path, epochs=5), stop_after_epochs=1)
    manifest_path = killed.run_dir / "manifest.json"
    [first] = json.loads(manifest_path.read_text())["stretches"]
    assert (first["first_epoch"], first["last_epoch"], first["precision"], first["world_size"]) == (1, 1, "fp32", 1)
    assert first["commit"] and first["hardware"]["cpu_count"] and first["device"] == "cpu" and first["seconds"] >= 0
    train(resume=killed.run_dir, stop_after_epochs=2, changes={"threads": 1})
    manifest = json.loads(manifest_path.read_text())
    assert [(s["first_epoch"], s["last_epoch"]) for s in manifest["stretches"]] == [(1, 1), (2, 3)]
    assert manifest["stretches"][0] == first and manifest["stretches"][1]["started"] > first["started"]
    assert sum(s["seconds"] for s in manifest["stretches"]) == pytest.approx(manifest["train_seconds"], abs=0.2)
    # A manifest whose lists were mangled (by hand, or written before they existed) does not stop the run: what is
    # intact is kept, and this call's stretch follows.
    manifest |= {"stretches": [{"junk": 1}, "text", 7], "commands": "not a list", "git_commits": None}
    manifest_path.write_text(json.dumps(manifest))
    train(resume=killed.run_dir, stop_after_epochs=1)
    manifest = json.loads(manifest_path.read_text())
    assert [s.get("first_epoch") for s in manifest["stretches"]] == [None, 4]
    assert manifest["epochs_done"] == 4 and len(manifest["commands"]) == 1 and len(manifest["git_commits"]) == 1
    manifest_path.write_text('{"stretches": [')  # not JSON: the record starts again from this call
    train(resume=killed.run_dir)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["epochs_done"] == 5 and [s["first_epoch"] for s in manifest["stretches"]] == [5]


def metrics_without_timing(run_dir: Path) -> list[str]:
    return [line.rsplit(",", 1)[0] for line in (run_dir / "metrics.csv").read_text().splitlines()]


def test_resume_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        train(resume=tmp_path)


@pytest.mark.parametrize("option", [
    dict(optimizer="adamw", lr=1e-3), dict(optimizer="rmsprop", lr=1e-3), dict(optimizer="sgd", nesterov=False),
    dict(class_weights="balanced", label_smoothing=0.1, grad_clip=1.0), dict(schedule="none"),
    dict(precision="bf16", channels_last=True), dict(normalize="per_image"), dict(train_view="crop"),
])
def test_training_options_run(tiny_csv: Path, tmp_path: Path, option: dict) -> None:
    result = train(small_config(tiny_csv, tmp_path, epochs=1, **option))
    assert np.isfinite(result.history[0]["train_loss"])


def test_crop_view_trains_on_crops_and_selects_on_the_centre_crop(tiny_csv: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import ferkit.training.trainer as trainer

    seen_sizes, val_modes = set(), set()
    real_augment, real_predict = trainer.augment, trainer.predict_proba

    def spy_augment(x, cfg, gen, crop=0):
        seen_sizes.add((x.shape[-1], crop))
        return real_augment(x, cfg, gen, crop=crop)

    def spy_predict(*args, **kw):
        val_modes.add(kw.get("tta"))
        return real_predict(*args, **kw)

    monkeypatch.setattr(trainer, "augment", spy_augment)
    monkeypatch.setattr(trainer, "predict_proba", spy_predict)
    crop_run = train(small_config(tiny_csv, tmp_path / "crop", epochs=1, train_view="crop"))
    assert seen_sizes == {(58, 48)} and val_modes == {"center"}  # 48-pixel crops of faces at 58 = 48 * 48 / 40
    seen_sizes.clear()
    val_modes.clear()
    resize_run = train(small_config(tiny_csv, tmp_path / "resize", epochs=1))
    assert seen_sizes == {(48, 0)} and val_modes == {"none"}
    # The weights record their training view, so evaluation (tta "auto") and the Recognizer default to the view
    # the weights were selected on and reproduce the trainer's PublicTest accuracy.
    monkeypatch.undo()
    from ferkit.data import load_dataset
    from ferkit.evaluation import evaluate
    from ferkit.inference import Recognizer

    data = load_dataset(str(tiny_csv))
    for run, view, tta in ((crop_run, "crop", "center"), (resize_run, "resize", "none")):
        model, meta = load_model(run.run_dir / "best.safetensors")
        assert meta["train_view"] == view
        result = evaluate(model, meta, data, "PublicTest", device="cpu", precision="fp32")
        assert result.tta == tta and result.accuracy == pytest.approx(run.best_val_acc)
        assert Recognizer(run.run_dir / "best.safetensors", detector="none", device="cpu").tta == tta
        assert Recognizer(run.run_dir / "best.safetensors", detector="none", device="cpu", tta="flip").tta == "flip"
    with pytest.raises(ValueError, match="train_view"):
        small_config(tiny_csv, tmp_path, train_view="tencrop").validate()


def test_early_stopping_and_snapshots(tiny_csv: Path, tmp_path: Path) -> None:
    # lr=0 cannot improve after the first epoch, so patience 1 stops at epoch 2.
    result = train(small_config(tiny_csv, tmp_path, epochs=6, lr=0.0, early_stopping=1, save_every=2))
    assert result.epochs_run == 2
    snapshots = sorted((result.run_dir / "snapshots").glob("step*.safetensors"))
    assert len(snapshots) == 5  # 70 faces / batch 16 = 5 steps per epoch; a snapshot every 2 steps
    # Resuming a run that stopped early (as `ferkit reproduce` does to re-report it) trains nothing more.
    resumed = train(resume=result.run_dir)
    assert resumed.epochs_run == 2 and len(resumed.history) == 2
    # More patience continues it, with the epochs a run started with that patience trains.
    patient = train(resume=result.run_dir, changes={"early_stopping": 3})
    fresh = train(small_config(tiny_csv, tmp_path / "fresh", epochs=6, lr=0.0, early_stopping=3, save_every=2))
    assert patient.epochs_run == fresh.epochs_run == 4
    assert without_timing(patient.history) == without_timing(fresh.history)


def test_time_limit_ends_the_run_after_the_epoch_that_reaches_it(tiny_csv: Path, tmp_path: Path) -> None:
    # Any epoch takes longer than a microsecond: the limit is reached by the first epoch, which still completes.
    result = train(small_config(tiny_csv, tmp_path, epochs=4, time_limit=1e-8))
    assert result.epochs_run == 1 and (result.run_dir / "best.safetensors").is_file()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["epochs_done"] == 1 and manifest["stopped_by"].startswith("time limit")
    # The run is finished: resuming it (to re-report it) trains nothing more.
    resumed = train(resume=result.run_dir)
    assert resumed.epochs_run == 1
    # A run that completes its epochs inside the limit records no stop reason.
    full = train(small_config(tiny_csv, tmp_path / "full", epochs=2, time_limit=60))
    assert full.epochs_run == 2 and "stopped_by" not in json.loads((full.run_dir / "manifest.json").read_text())
    with pytest.raises(ValueError, match="time_limit"):
        TrainConfig(time_limit=-1).validate()


def test_resume_may_change_run_settings_only(tiny_csv: Path, tmp_path: Path) -> None:
    # A run that used up its time limit goes on when resumed with a longer one, and ends where an unlimited
    # run of the same config ends: the limit and the thread count change how it runs, not what it learns.
    full = train(small_config(tiny_csv, tmp_path / "full", epochs=3))
    cut = train(small_config(tiny_csv, tmp_path / "cut", epochs=3, time_limit=1e-8))
    assert cut.epochs_run == 1
    resumed = train(resume=cut.run_dir, changes=TrainConfig().resume_changes(["time_limit=0", "threads=1"]))
    assert without_timing(resumed.history) == without_timing(full.history)
    saved = json.loads((cut.run_dir / "config.json").read_text())
    assert saved["time_limit"] == 0 and saved["threads"] == 1 and saved["epochs"] == 3
    assert "stopped_by" not in json.loads((cut.run_dir / "manifest.json").read_text())
    with pytest.raises(ValueError, match="only threads, time_limit, early_stopping, progress can change .got lr"):
        TrainConfig().resume_changes(["lr=0.1", "threads=2"])
    with pytest.raises(ValueError, match="time_limit must be"):
        TrainConfig().resume_changes(["time_limit=-5"])
    with pytest.raises(ValueError, match="cannot change epochs"):
        train(resume=cut.run_dir, changes={"epochs": 9})
    with pytest.raises(ValueError, match="resumed run"):
        train(small_config(tiny_csv, tmp_path / "new"), changes={"threads": 1})


def test_config_overrides() -> None:
    cfg = TrainConfig().override(["epochs=5", "augment.rotation=15", "model=resnet18", "augment.crop_scale=[0.7,1]"])
    assert cfg.epochs == 5 and cfg.augment.rotation == 15 and cfg.model == "resnet18"
    assert cfg.augment.crop_scale == (0.7, 1)
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig().override(["epoch=5"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig().override(["epochs"])
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion").validate()
    # Values must fit the setting's type; the error names the key (a typo used to end in a TypeError later).
    for bad, expected in [("time_limit=2h", "time_limit=2h: expected a number"),
                          ("batch_size=64x", "batch_size=64x: expected a whole number"),
                          ("batch_size=6.5", "expected a whole number"), ("nesterov=yes", "true or false"),
                          ("augment.crop_scale=0.9", "a list of 2 numbers"),
                          ("model_kwargs=3", "a JSON object")]:
        with pytest.raises(ValueError, match=expected):
            TrainConfig().override([bad])
    cfg = TrainConfig().override(["lr=1", "batch_size=32.0", "run_name=2024", "model_kwargs.dropout=0.2"])
    assert (cfg.lr, cfg.batch_size, cfg.run_name) == (1.0, 32, "2024") and cfg.model_kwargs == {"dropout": 0.2}
    assert type(cfg.lr) is float and type(cfg.batch_size) is int


def test_config_round_trips_through_json() -> None:
    cfg = TrainConfig(epochs=7, augment=AugmentConfig(rotation=3.0))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_distillation_loss_matches_its_definition() -> None:
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # A student whose logits are the teacher's log-probabilities agrees with it at every temperature.
    assert distillation_loss(teacher.log(), teacher, 4.0).abs() < 1e-6
    student = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    t = 2.0
    p = (teacher ** (1 / t)) / (teacher ** (1 / t)).sum(1, keepdim=True)
    q = torch.softmax(student / t, 1)
    expected = (p * (p / q).log()).sum(1).mean() * t * t
    assert torch.allclose(distillation_loss(student, teacher, t), expected, atol=1e-6)


def test_distillation_teaches_what_the_labels_do_not(tmp_path: Path, cache_dir: Path) -> None:
    # A teacher learns the synthetic task; the student's training labels are then all "angry", so
    # only the teacher's soft targets carry the classes. Distilled, the student still learns them;
    # from the labels alone it cannot beat predicting one class.
    teacher = train(small_config(write_csv(tmp_path / "good.csv", synthetic_rows(
        {"Training": 70, "PublicTest": 35, "PrivateTest": 35})), tmp_path / "teacher", epochs=8,
        optimizer="adam", lr=3e-3, augment=AugmentConfig.off()))
    assert teacher.best_val_acc > 0.6
    rows = synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35})
    rows = [(0 if usage == "Training" else label, pixels, usage) for label, pixels, usage in rows]
    bad = write_csv(tmp_path / "bad.csv", rows)
    common = dict(epochs=8, optimizer="adam", lr=3e-3, augment=AugmentConfig.off())
    teacher_weights = str(teacher.run_dir / "best.safetensors")
    distilled = train(small_config(bad, tmp_path / "kd", teacher=teacher_weights, distill_weight=1.0, **common))
    labels_only = train(small_config(bad, tmp_path / "ce", **common))
    assert distilled.best_val_acc > 0.6
    assert labels_only.best_val_acc < 0.3
    manifest = json.loads((distilled.run_dir / "manifest.json").read_text())
    assert manifest["teacher"]["path"] == teacher_weights and len(manifest["teacher"]["sha256"]) == 64


def test_distillation_refuses_a_teacher_with_other_classes(tmp_path: Path, cache_dir: Path) -> None:
    six = write_csv(tmp_path / "six.csv", synthetic_rows({"Training": 60, "PublicTest": 30, "PrivateTest": 30},
                                                         num_classes=6))
    teacher = train(small_config(six, tmp_path / "t", epochs=1, label_set="fer6"))
    seven = write_csv(tmp_path / "seven.csv", synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35}))
    with pytest.raises(ValueError, match="teacher .* predicts"):
        train(small_config(seven, tmp_path / "s", epochs=1, teacher=str(teacher.run_dir / "best.safetensors")))


def test_init_weights_starts_from_a_trained_model(tiny_csv: Path, tmp_path: Path) -> None:
    # A trained model continued with a zero learning rate keeps its accuracy from the first epoch on;
    # the same run from a random init stays near chance. The manifest names the starting weights.
    trained = train(small_config(tiny_csv, tmp_path / "a", epochs=8, optimizer="adam", lr=3e-3,
                                 augment=AugmentConfig.off()))
    assert trained.best_val_acc > 0.6
    start = str(trained.run_dir / "best.safetensors")
    frozen = dict(epochs=1, optimizer="sgd", lr=0.0, weight_decay=0.0, augment=AugmentConfig.off())
    continued = train(small_config(tiny_csv, tmp_path / "b", init_weights=start, **frozen))
    scratch = train(small_config(tiny_csv, tmp_path / "c", **frozen))
    assert continued.best_val_acc == pytest.approx(trained.best_val_acc, abs=0.03)
    assert scratch.best_val_acc < 0.4
    manifest = json.loads((continued.run_dir / "manifest.json").read_text())
    assert manifest["init_weights"]["path"] == start and len(manifest["init_weights"]["sha256"]) == 64


def test_init_weights_refuses_another_model(tiny_csv: Path, tmp_path: Path) -> None:
    other = train(small_config(tiny_csv, tmp_path / "a", epochs=1, model="bokanyi_shallow"))
    with pytest.raises(ValueError, match="init_weights .* holds model bokanyi_shallow"):
        train(small_config(tiny_csv, tmp_path / "b", epochs=1, init_weights=str(other.run_dir / "best.safetensors")))


def test_git_commit_outside_git_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit.training.report import git_commit

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path is not inside any repository
    monkeypatch.setenv("FERKIT_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"
    monkeypatch.delenv("FERKIT_GIT_COMMIT")
    assert git_commit(tmp_path) == ""
    assert len(git_commit().removesuffix("-dirty")) in (0, 40)  # this checkout: its HEAD (or '' without git)


@pytest.mark.parametrize(("text", "error"), [
    ('{"epochs": 3}', None),
    ("", ValueError),  # empty (a kill before the first write)
    ('{"epochs": 3', ValueError),  # truncated
    ("[1, 2]", ValueError),  # JSON, but not a record
    ("NaN", ValueError),
    ('"config"', ValueError),
])
def test_read_json_takes_only_a_json_object(tmp_path: Path, text: str, error: type[Exception] | None) -> None:
    from ferkit.training.report import read_json

    path = tmp_path / "manifest.json"
    path.write_text(text)
    if error is None:
        assert read_json(path) == {"epochs": 3}
    else:
        with pytest.raises(error):
            read_json(path)
    with pytest.raises(OSError):
        read_json(tmp_path / "missing.json")


def test_unknown_device_is_a_clear_error_before_any_run_directory(tiny_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("unknown device 'gpu'; use auto | cpu | cuda | cuda:N")):
        train(small_config(tiny_csv, tmp_path / "runs", device="gpu"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("train_view, tta", [("crop", "center"), ("resize", "flip")])
def test_teacher_targets_use_the_teachers_view(tiny_csv: Path, tmp_path: Path, train_view: str, tta: str) -> None:
    from ferkit.data import load_dataset
    from ferkit.models import create_model
    from ferkit.models.predict import predict_proba
    from ferkit.models.weights import save_weights
    from ferkit.training.distill import teacher_probabilities

    torch.manual_seed(0)
    meta = {"model": SMALL_MODEL, "num_classes": 7, "classes": list(FER2013_NAMES), "label_set": "fer7",
            "input_size": 48, "normalize": "dataset", "model_kwargs": {}, "train_view": train_view}
    model = create_model(SMALL_MODEL, num_classes=7).eval()
    save_weights(model, tmp_path / "teacher.safetensors", meta)
    faces = load_dataset(str(tiny_csv)).split("Training")
    got = teacher_probabilities(TrainConfig(teacher=str(tmp_path / "teacher.safetensors")), faces,
                                 torch.device("cpu"))
    assert np.allclose(got.numpy(), predict_proba(model, faces.images, input_size=48, tta=tta), atol=1e-6)
