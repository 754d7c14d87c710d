"""timm:NAME models (#28): built offline for 1-channel faces at any input size, listed with params and FLOPs,
trained with `ferkit train --model timm:...` and rebuilt from their weights file by load_model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.models import create_model, list_models
from ferkit.models import timm_bridge as bridge
from ferkit.models.weights import load_model
from ferkit.training import TrainConfig, train

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm extra not installed")
runner = CliRunner()


@needs_timm
@pytest.mark.parametrize("arch, size", [("test_efficientnet", 48), ("test_efficientnet", 64), ("test_resnet", 96),
                                        ("test_vit", 48)])
def test_timm_model_takes_grayscale_faces_at_its_input_size(arch: str, size: int) -> None:
    model = create_model(f"timm:{arch}", num_classes=7, input_size=size).eval()
    assert model.input_size == size and model.ferkit_name == f"timm:{arch}"
    with torch.no_grad():
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 7)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1


@needs_timm
def test_timm_import_leaves_no_torchvision_standin_behind() -> None:
    bridge.import_timm()
    module = sys.modules.get("torchvision")
    assert module is None or not getattr(module, "_ferkit_standin", False)


@needs_timm
@pytest.mark.parametrize("name, message", [
    ("timm:efficientnet_b00", r"unknown timm model 'efficientnet_b00'; did you mean efficientnet_b0"),
    ("timm:zzzz_not_a_net", r"unknown timm model 'zzzz_not_a_net'"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", "hub names are not supported"),
    ("timm:", "give an architecture name"),
])
def test_unknown_timm_names_are_clear_errors(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name)


@needs_timm
@pytest.mark.parametrize("kwargs, error, message", [
    ({"pretrained": True}, TypeError, "may not set 'pretrained'"),
    ({"in_chans": 3}, TypeError, "may not set 'in_chans'"),
    ({"input_size": 0}, ValueError, "input_size 0"),
    ({"input_size": "64"}, ValueError, "input_size '64'"),
])
def test_bad_timm_model_kwargs(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        create_model("timm:test_efficientnet", **kwargs)


def test_without_timm_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(bridge, "_timm", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'ferkit\[timm\]'"):
        create_model("timm:efficientnet_b0")
    assert "timm:efficientnet_b0" not in list_models("*")  # the ferkit registry alone needs no timm


@needs_timm
def test_list_models_and_models_command_show_timm_params_and_flops() -> None:
    assert "timm:test_efficientnet" in list_models("timm:test_eff*")
    assert not any(n.startswith("timm:") for n in list_models("*"))
    out = runner.invoke(app, ["models", "timm:test_efficientnet", "--input-size", "64"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.startswith("timm:test_efficientnet"))
    size, params, mflops = row.split()[1:4]
    assert size == "64" and params == "0.10M" and float(mflops) > 0
    every = runner.invoke(app, ["models", "test_eff*", "--all", "--no-flops"])
    assert every.exit_code == 0 and "timm:test_efficientnet_gn" in every.output
    missing = runner.invoke(app, ["models", "timm:nope*"])
    assert missing.exit_code != 0 and "no model matches" in missing.output


@needs_timm
def test_train_timm_model_then_load_model_rebuilds_it(tiny_csv: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="timm:test_efficientnet", data=str(tiny_csv), out_dir=str(tmp_path), epochs=1,
                      batch_size=16, precision="fp32", progress=False, model_kwargs={"input_size": 64})
    result = train(cfg)
    assert ":" not in result.run_dir.name  # timm:NAME -> timm-NAME in default run directory names
    model, meta = load_model(result.run_dir / "best.safetensors")
    assert meta["model"] == "timm:test_efficientnet" and meta["input_size"] == 64
    assert meta["model_kwargs"] == {"input_size": 64} and model.input_size == 64
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64).to(memory_format=torch.channels_last)).shape == (1, 7)


@needs_timm
def test_ferkit_train_cli_efficientnet_b0(tiny_csv: Path, tmp_path: Path) -> None:
    out = runner.invoke(app, ["train", "--model", "timm:efficientnet_b0", "--data", str(tiny_csv), "--epochs", "1",
                              "--batch-size", "35", "--limit-train", "35", "--out", str(tmp_path), "--name", "b0",
                              "--no-progress", "precision=fp32"])
    assert out.exit_code == 0, out.output
    manifest = json.loads((tmp_path / "b0" / "manifest.json").read_text())
    assert manifest["config"]["model"] == "timm:efficientnet_b0" and manifest["epochs_done"] == 1
    assert load_model(tmp_path / "b0")[1]["model"] == "timm:efficientnet_b0"
    bad = runner.invoke(app, ["train", "--model", "timm:efficientnet_b9", "--data", str(tiny_csv), "--out",
                              str(tmp_path), "--no-progress"])
    assert bad.exit_code == 2 and "unknown timm model 'efficientnet_b9'" in bad.output
    assert "Traceback" not in bad.output


@needs_timm
@pytest.mark.parametrize("name, model, classes", [("efficientnet_b0", "timm:efficientnet_b0", 7),
                                                  ("resnet34", "timm:resnet34", 6)])
def test_reproduce_recipes_for_the_timm_rows(name: str, model: str, classes: int) -> None:
    from ferkit.data import get_label_set
    from ferkit.reproduce import RECIPES

    recipe = RECIPES[name]
    cfg = TrainConfig(model=recipe.model).override(list(recipe.overrides))
    cfg.validate()
    assert cfg.model == model and cfg.model_kwargs == {"input_size": 64}
    assert get_label_set(cfg.label_set).num_classes == classes and "From scratch" in recipe.notes
    with torch.device("meta"):
        built = create_model(cfg.model, num_classes=classes, **cfg.model_kwargs)
    assert built.input_size == 64
    listed = runner.invoke(app, ["reproduce", "--list"])
    assert listed.exit_code == 0 and name in listed.output
