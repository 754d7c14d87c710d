"""Fine-tuning options (#28): freeze= (stem, backbone, head, name prefixes) and backbone_lr_scale= (discriminative
learning rates), checked before a run directory exists, and a run with them resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ferkit.models import create_model
from ferkit.models.finetune import parameter_groups, stem_parameter_names
from ferkit.training import TrainConfig, train
from ferkit.training.trainer import _make_optimizer, _make_scheduler


def test_defaults_keep_one_group_of_every_parameter() -> None:
    model = create_model("frivas_cnn1")
    params = parameter_groups(model)
    assert params == list(model.parameters()) and all(p.requires_grad for p in params)


def test_freeze_stem_and_prefixes() -> None:
    model = create_model("frivas_cnn1")
    assert stem_parameter_names(model) == ["features.0.weight", "features.0.bias", "features.2.weight",
                                           "features.2.bias"]
    groups = parameter_groups(model, freeze="stem,features.3", lr=0.1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
                      "features.3.weight", "features.3.bias"}
    trained = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in trained for n, p in model.named_parameters() if n in frozen)
    resnet = create_model("resnet18")  # a module called stem
    parameter_groups(resnet, freeze="stem")
    assert {n for n, p in resnet.named_parameters() if not p.requires_grad} == {
        n for n, _ in resnet.named_parameters() if n.startswith("stem.")}


def test_backbone_lr_scale_gives_the_head_full_rate() -> None:
    model = create_model("frivas_cnn1")
    head, body = parameter_groups(model, backbone_lr_scale=0.1, lr=0.01)
    assert head["lr"] == 0.01 and body["lr"] == pytest.approx(0.001)
    assert {id(p) for p in head["params"]} == {id(model.classifier[4].weight), id(model.classifier[4].bias)}
    (only_head,) = parameter_groups(model, freeze="backbone", lr=0.01)
    assert len(only_head["params"]) == 2
    (also_head,) = parameter_groups(model, backbone_lr_scale=0, lr=0.01)  # 0 = backbone frozen
    assert len(also_head["params"]) == 2 and not model.features[0].weight.requires_grad


def test_schedules_keep_the_rate_ratio() -> None:
    cfg = TrainConfig(model="frivas_cnn1", lr=0.01, backbone_lr_scale=0.1, schedule="onecycle", epochs=2)
    optimizer = _make_optimizer(cfg, create_model("frivas_cnn1"))
    scheduler = _make_scheduler(cfg, optimizer, steps_per_epoch=5)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        head, body = (g["lr"] for g in optimizer.param_groups)
        assert body == pytest.approx(head * 0.1)


@pytest.mark.parametrize("freeze, scale, message", [
    ("blocks.0", 1.0, r"freeze=blocks.0: 'blocks.0' names no parameter of frivas_cnn1 \(use stem, backbone, head"),
    ("backbone,head", 1.0, "leave no parameter to train"),
    ("head", 0.0, "leave no parameter to train"),
    ("", -0.5, "backbone_lr_scale must be >= 0"),
    ("", float("nan"), "backbone_lr_scale must be >= 0"),
])
def test_bad_fine_tuning_settings_fail_before_any_run_directory(tiny_csv: Path, tmp_path: Path, freeze: str,
                                                                 scale: float, message: str) -> None:
    cfg = TrainConfig(model="frivas_cnn1", data=str(tiny_csv), out_dir=str(tmp_path / "runs"), epochs=1,
                      progress=False, freeze=freeze, backbone_lr_scale=scale)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_fine_tuning_run_resumes_exactly(tiny_csv: Path, tmp_path: Path) -> None:
    def config(out: Path) -> TrainConfig:
        return TrainConfig(model="frivas_cnn1", data=str(tiny_csv), out_dir=str(out), run_name="run", epochs=2,
                           batch_size=16, precision="fp32", progress=False, freeze="stem", backbone_lr_scale=0.1,
                           schedule="cosine", lr=0.01)

    whole = train(config(tmp_path / "a"))
    killed = train(config(tmp_path / "b"), stop_after_epochs=1)
    resumed = train(resume=killed.run_dir)
    assert resumed.history[-1]["val_acc"] == whole.history[-1]["val_acc"]
    a = torch.load(whole.run_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    config_saved = json.loads((whole.run_dir / "config.json").read_text())
    assert config_saved["freeze"] == "stem" and config_saved["backbone_lr_scale"] == 0.1
