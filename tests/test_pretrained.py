"""init_weights= with a user's timm/torchvision state dict (#28): RGB stem kernels summed to grayscale, a new head,
a report of what was loaded, reshaped, replaced or skipped; every bad file a clear error before any run directory.
The "pretrained" weights are tiny fakes made here (an RGB, 1000-class copy of the architecture)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ferkit.models import create_model
from ferkit.models.pretrained import (
    PretrainedError,
    head_tensor_names,
    is_ferkit_weights,
    load_pretrained,
    read_state_dict,
)
from ferkit.training import TrainConfig, train

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm extra not installed")


def fake_rgb_frivas() -> dict[str, torch.Tensor]:
    """What an ImageNet-style checkpoint of frivas_cnn1 would hold: 3 input channels, 1000 classes."""
    torch.manual_seed(1)
    return create_model("frivas_cnn1", num_classes=1000, in_chans=3).state_dict()


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_rgb_state_dict_maps_onto_a_grayscale_model(tmp_path: Path, suffix: str) -> None:
    state = fake_rgb_frivas()
    path = save(state, tmp_path / f"rgb{suffix}")
    assert not is_ferkit_weights(path)
    model = create_model("frivas_cnn1", num_classes=7)
    head = head_tensor_names(model)
    fresh_head = {k: model.state_dict()[k].clone() for k in head}
    report = load_pretrained(model, path)
    loaded = model.state_dict()
    stem = "features.0.weight"
    assert report.reshaped == [stem]
    assert torch.allclose(loaded[stem], state[stem].sum(dim=1, keepdim=True))
    assert sorted(report.replaced) == sorted(head) and all(torch.equal(loaded[k], fresh_head[k]) for k in head)
    assert report.skipped == [] and len(report.loaded) == len(loaded) - len(head) - 1
    assert all(torch.equal(loaded[k], state[k]) for k in report.loaded)
    assert "1 reshaped (RGB -> gray): features.0.weight" in report.summary()


def test_checkpoint_wrappers_and_ddp_prefix_are_unwrapped(tmp_path: Path) -> None:
    state = fake_rgb_frivas()
    wrapped = {"epoch": torch.tensor(90), "state_dict": {f"module.{k}": v for k, v in state.items()},
               "extra.aux.weight": torch.zeros(3)}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    assert set(read_state_dict(tmp_path / "ckpt.pth")) == set(state)
    state["aux_head.weight"] = torch.zeros(2, 2)  # a tensor the model has no place for
    report = load_pretrained(create_model("frivas_cnn1"), save(state, tmp_path / "aux.safetensors"))
    assert report.skipped == ["aux_head.weight"]


class Pickled(nn.Module):  # a checkpoint that pickles a module: weights_only=True refuses it
    pass


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(b"not a zip and not a pickle"), "not a readable PyTorch weights file"),
    (lambda p: torch.save({"model": nn.Linear(2, 2)}, p), r"refused, torch.load\(weights_only=True\) will not"),
    (lambda p: torch.save([1, 2, 3], p), "holds no state dict"),
    (lambda p: torch.save({}, p), "holds no state dict"),
    (lambda p: torch.save({"a.weight": torch.zeros(2), "lr": 0.1}, p), "entry 'lr' is a float, not a tensor"),
])
def test_bad_pth_files_are_clear_errors(tmp_path: Path, write, message: str) -> None:
    path = tmp_path / "bad.pth"
    write(path)
    with pytest.raises(PretrainedError, match=message) as e:
        load_pretrained(create_model("frivas_cnn1"), path)
    assert str(path) in str(e.value)


def test_bad_safetensors_and_tensors_are_clear_errors(tmp_path: Path) -> None:
    model = create_model("frivas_cnn1")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(PretrainedError, match="empty.safetensors: the file is empty"):
        load_pretrained(model, tmp_path / "empty.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        load_pretrained(model, tmp_path / "junk.safetensors")
    state = fake_rgb_frivas()
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(PretrainedError, match="tensor features.3.weight holds NaN or infinite values"):
        load_pretrained(model, save(state, tmp_path / "nan.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(model, tmp_path / "missing.pth")


def test_state_dicts_of_another_architecture_are_refused(tmp_path: Path) -> None:
    model = create_model("frivas_cnn1")
    wider = create_model("frivas_cnn1", widths=[16, 32, 64], num_classes=1000, in_chans=3).state_dict()
    with pytest.raises(PretrainedError, match=r"tensors do not fit this model's shapes .*features.0.weight is "
                                              r"\[16, 3, 3, 3\] in the file, \[32, 1, 3, 3\] in the model"):
        load_pretrained(model, save(wider, tmp_path / "wider.pth"))
    shallower = {k: v for k, v in fake_rgb_frivas().items() if not k.startswith("features.1")}
    with pytest.raises(PretrainedError, match="the file lacks .* of the model's tensors"):
        load_pretrained(model, save(shallower, tmp_path / "shallower.pth"))
    unrelated = {"encoder.layer.0.weight": torch.zeros(4, 4)}
    with pytest.raises(PretrainedError, match="none of its 1 tensors fits this model"):
        load_pretrained(model, save(unrelated, tmp_path / "unrelated.safetensors"))


def small(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="frivas_cnn1", data=str(data), out_dir=str(out), run_name="run", epochs=1, batch_size=16,
                precision="fp32", progress=False)
    return TrainConfig(**(base | kw))


def test_training_starts_from_a_users_state_dict(tiny_csv: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    state = fake_rgb_frivas()
    path = save(state, tmp_path / "imagenet.pth")
    result = train(small(tiny_csv, tmp_path / "runs", init_weights=str(path), freeze="stem"))
    assert "features.0.weight" in capsys.readouterr().out
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    record = manifest["init_weights"]
    assert record["path"] == str(path) and record["state_dict"]["reshaped"] == ["features.0.weight"]
    assert sorted(record["state_dict"]["replaced"]) == ["classifier.4.bias", "classifier.4.weight"]
    trained = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"]
    # The stem was frozen: still the summed RGB kernel after an epoch.
    assert torch.allclose(trained["features.0.weight"], state["features.0.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({"model": nn.Linear(2, 2)}, p), "weights_only=True"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: torch.save(create_model("frivas_cnn3", in_chans=3).state_dict(), p), "lacks|do not fit"),
])
def test_bad_init_weights_fail_before_any_run_directory(tiny_csv: Path, tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "init.pth"
    make(path)
    with pytest.raises(ValueError, match=message):
        train(small(tiny_csv, tmp_path / "runs", init_weights=str(path)))
    assert not (tmp_path / "runs").exists()


@needs_timm
def test_timm_resnet_state_dict_into_timm_model(tiny_csv: Path, tmp_path: Path) -> None:
    from ferkit.models.timm_bridge import import_timm

    torch.manual_seed(2)
    imagenet = import_timm().create_model("test_resnet", pretrained=False, in_chans=3, num_classes=1000).state_dict()
    path = save(imagenet, tmp_path / "test_resnet.safetensors")
    result = train(small(tiny_csv, tmp_path / "runs", model="timm:test_resnet", init_weights=str(path),
                         backbone_lr_scale=0.1, model_kwargs={"input_size": 64}))
    record = json.loads((result.run_dir / "manifest.json").read_text())["init_weights"]["state_dict"]
    assert record["reshaped"] == ["conv1.0.weight"] and record["replaced"] == ["fc.weight", "fc.bias"]
    # A torchvision-named ResNet checkpoint for another depth is refused, naming what is missing.
    deeper = create_model("timm:test_resnet", num_classes=1000)  # same names; drop a block
    partial = {k: v for k, v in deeper.state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match="lacks .* layer4"):
        train(small(tiny_csv, tmp_path / "runs2", model="timm:test_resnet", init_weights=str(
            save(partial, tmp_path / "partial.pth"))))
