"""Trainer: run-directory contents, determinism, resume equality, config overrides, option coverage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ferkit.data.augment import AugmentConfig
from ferkit.models.weights import load_model
from ferkit.training import TrainConfig, train

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


def test_resume_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        train(resume=tmp_path)


@pytest.mark.parametrize("option", [
    dict(optimizer="adamw", lr=1e-3), dict(optimizer="rmsprop", lr=1e-3), dict(optimizer="sgd", nesterov=False),
    dict(class_weights="balanced", label_smoothing=0.1, grad_clip=1.0), dict(schedule="none"),
    dict(precision="bf16", channels_last=True), dict(normalize="per_image"),
])
def test_training_options_run(tiny_csv: Path, tmp_path: Path, option: dict) -> None:
    result = train(small_config(tiny_csv, tmp_path, epochs=1, **option))
    assert np.isfinite(result.history[0]["train_loss"])


def test_early_stopping_and_snapshots(tiny_csv: Path, tmp_path: Path) -> None:
    # lr=0 cannot improve after the first epoch, so patience 1 stops at epoch 2.
    result = train(small_config(tiny_csv, tmp_path, epochs=6, lr=0.0, early_stopping=1, save_every=2))
    assert result.epochs_run == 2
    snapshots = sorted((result.run_dir / "snapshots").glob("step*.safetensors"))
    assert len(snapshots) == 5  # 70 faces / batch 16 = 5 steps per epoch; a snapshot every 2 steps


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


def test_config_round_trips_through_json() -> None:
    cfg = TrainConfig(epochs=7, augment=AugmentConfig(rotation=3.0))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
