"""Saliency maps, Grad-CAM and `ferkit explain` (on untrained models: the maps' properties, not their meaning)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data.labels import FER2013_NAMES
from ferkit.ensembles.artifact import EnsembleModel
from ferkit.ensembles.combine import EnsembleWeights
from ferkit.explain import (
    explain_faces,
    find_last_conv,
    grad_cam,
    gradcam_layer,
    plot_explanation,
    saliency_map,
)
from ferkit.inference.image_io import sample_image_path
from ferkit.models.registry import create_model

CLASSES = list(FER2013_NAMES)
runner = CliRunner()


def tiny_cnn(classes: int = 3, seed: int = 0) -> nn.Module:
    """Conv-ReLU(inplace)-Conv-ReLU(inplace)-GAP-Linear: a CAM-style net with in-place activations."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return create_model("ferkit_vgg_s")


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(1))


def test_saliency_shape_sign_and_no_side_effects(vgg: nn.Module, faces: torch.Tensor) -> None:
    vgg.train()
    sal = saliency_map(vgg, faces)
    assert sal.shape == (3, 48, 48) and sal.dtype == torch.float32
    assert torch.isfinite(sal).all() and (sal >= 0).all() and sal.sum() > 0
    assert vgg.training  # the training flag is restored
    assert all(p.grad is None for p in vgg.parameters())  # only the input's gradient was taken
    vgg.eval()


def test_saliency_depends_on_target_and_input(vgg: nn.Module, faces: torch.Tensor) -> None:
    a, b = saliency_map(vgg, faces, target=0), saliency_map(vgg, faces, target=3)
    assert not torch.allclose(a, b)
    other = saliency_map(vgg, faces.flip(-1), target=0)
    assert not torch.allclose(a, other)
    # the default target is the predicted class
    with torch.no_grad():
        pred = vgg.eval()(faces).argmax(-1)
    assert torch.allclose(saliency_map(vgg, faces), saliency_map(vgg, faces, pred))
    # per-face targets
    assert torch.allclose(saliency_map(vgg, faces, [0, 3, 0])[1], b[1])
    with pytest.raises(ValueError, match="out of range"):
        saliency_map(vgg, faces, target=7)


def test_saliency_is_the_input_gradient() -> None:
    """For a linear model the input gradient is the weight row of the target class."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.randn(1, 1, 4, 4)
    sal = saliency_map(lin, x, target=1)
    assert torch.allclose(sal[0], lin[1].weight[1].abs().view(4, 4))


def test_grad_cam_shape_range_and_targets(vgg: nn.Module, faces: torch.Tensor) -> None:
    cam = grad_cam(vgg, faces)
    assert cam.shape == (3, 48, 48) and torch.isfinite(cam).all()
    assert (cam >= 0).all() and (cam <= 1 + 1e-6).all()
    maps = [grad_cam(vgg, faces, target=t) for t in range(7)]
    assert any(not torch.allclose(maps[0], m) for m in maps[1:])
    raw = grad_cam(vgg, faces, normalize=False)
    assert (raw >= 0).all() and torch.isfinite(raw).all()


def test_grad_cam_layer_is_found_generically() -> None:
    net = tiny_cnn()
    assert find_last_conv(net) is net[2]
    assert gradcam_layer(net) is net[3]  # read after the ReLU that follows the last conv
    vgg = create_model("frivas_cnn3")
    assert isinstance(find_last_conv(vgg), nn.Conv2d)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        find_last_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_grad_cam_equals_cam_for_a_global_average_pooling_net() -> None:
    """With conv -> ReLU -> GAP -> linear, Grad-CAM is Zhou et al.'s CAM: ReLU(sum_k w_ck A_k), rescaled."""
    net = tiny_cnn(classes=3).eval()
    x = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        acts = net[:4](x)
    for t in range(3):
        cam = grad_cam(net, x, target=t)
        ref = torch.relu(torch.einsum("k,bkhw->bhw", net[6].weight[t].detach(), acts))
        ref = ref / ref.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        assert torch.allclose(cam, ref, atol=1e-5)
    # an explicit layer is used as given (here the raw conv output)
    assert grad_cam(net, x, layer=net[2]).shape == (2, 10, 10)


def test_grad_cam_upsamples_to_other_input_sizes() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 20 * 20, 5))
    x = torch.randn(2, 1, 40, 40)
    assert grad_cam(net, x).shape == (2, 40, 40) and saliency_map(net, x).shape == (2, 40, 40)


def test_ensemble_grad_cam_averages_member_maps(faces: torch.Tensor) -> None:
    m0, m1 = create_model("frivas_cnn3").eval(), create_model("frivas_cnn3").eval()
    only_first = EnsembleModel([m0, m1], EnsembleWeights("mean", "mean", np.array([1.0, 0.0])))
    assert torch.allclose(grad_cam(only_first, faces, target=2), grad_cam(m0, faces, target=2), atol=1e-6)
    both = EnsembleModel([m0, m1], EnsembleWeights("mean", "mean", np.array([0.5, 0.5])))
    cam = grad_cam(both, faces, target=2, normalize=False)
    expected = 0.5 * grad_cam(m0, faces, target=2) + 0.5 * grad_cam(m1, faces, target=2)
    assert torch.allclose(cam, expected, atol=1e-6)
    sal = saliency_map(both, faces)
    assert sal.shape == (3, 48, 48) and (sal >= 0).all() and torch.isfinite(sal).all()


def test_explain_faces_and_plot(vgg: nn.Module, tmp_path: Path) -> None:
    faces = np.random.default_rng(0).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    exps = explain_faces(vgg, {"input_size": 48, "normalize": "dataset"}, faces)
    assert len(exps) == 2
    for e in exps:
        assert e.probs.shape == (7,) and e.probs.sum() == pytest.approx(1, abs=1e-5)
        assert e.target == int(e.probs.argmax())
        assert e.saliency.shape == e.cam.shape == (48, 48)
    forced = explain_faces(vgg, {"input_size": 48, "normalize": "dataset"}, faces, target=5)
    assert [e.target for e in forced] == [5, 5]
    assert [name for name, _ in exps[0].top(CLASSES)] == [CLASSES[i] for i in np.argsort(-exps[0].probs)[:3]]
    out = plot_explanation(exps[0], CLASSES, tmp_path / "sub" / "e.png", title="x", truth="happy")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 3 * im.size[1] // 2


def test_explain_faces_uses_the_crop_view_of_crop_trained_weights() -> None:
    # Weights trained on 40-pixel crops of 48-pixel faces are explained on that view, as `--tta auto` runs them.
    from ferkit.models.predict import predict_proba

    model = tiny_cnn(7).eval()
    meta = {"input_size": 40, "normalize": "dataset", "train_view": "crop"}
    faces = np.random.default_rng(1).integers(0, 256, (3, 60, 60), dtype=np.uint8)
    exps = explain_faces(model, meta, faces)
    expected = predict_proba(model, faces, input_size=40, tta="center")
    assert np.allclose(np.stack([e.probs for e in exps]), expected, atol=1e-6)
    assert exps[0].saliency.shape == (40, 40) and exps[0].face.shape == (50, 50)  # the central 40/48 of 60
    assert np.array_equal(exps[0].face, faces[0][5:55, 5:55])
    plain = explain_faces(model, meta | {"train_view": "resize"}, faces)
    assert np.allclose(np.stack([e.probs for e in plain]), predict_proba(model, faces, input_size=40), atol=1e-6)
    assert plain[0].face.shape == (60, 60)


def test_cli_explain_image_and_fer2013_row(weights: Path, tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "ex"
    result = runner.invoke(app, ["explain", str(sample_image_path()), "--weights", str(weights), "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "astronaut_face1.png").is_file() and "wrote" in result.stdout
    result = runner.invoke(app, ["explain", "--data", str(tiny_csv), "--row", "3", "--weights", str(weights),
                                 "--out", str(out), "--device", "cpu", "--target", "happy"])
    assert result.exit_code == 0, result.output
    assert (out / "tiny_row3.png").is_file() and "true: happy" in result.stdout  # row 3 is class 3 (happy)


@pytest.mark.parametrize("args, message", [
    ([], "either an IMAGE"),
    (["--data", "x.csv"], "--row"),
    (["--row", "2", str(sample_image_path())], "--row needs --data"),
    ([str(sample_image_path()), "--target", "bored"], "--target"),
    ([str(sample_image_path()), "--weights", "missing.safetensors"], "not found"),
])
def test_cli_explain_usage_errors(weights: Path, args: list[str], message: str) -> None:
    base = ["explain", "--device", "cpu"]
    if "--weights" not in args:
        base += ["--weights", str(weights)]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_explain_row_out_of_range_and_no_face(weights: Path, tiny_csv: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["explain", "--data", str(tiny_csv), "--row", "100000", "--weights", str(weights),
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "row 100000" in result.output
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(blank)
    result = runner.invoke(app, ["explain", str(blank), "--weights", str(weights), "--device", "cpu",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no face" in result.output
