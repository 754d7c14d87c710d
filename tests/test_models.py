"""Model zoo: every registered architecture builds, runs forward and backward, and reports its cost; the
registry rejects unknown and duplicate names; tan_pca's fitted PCA stage survives a state-dict round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ferkit.models import count_flops, create_model, get_spec, list_models, register_model, registry
from ferkit.models.weights import load_model, save_weights

NAMES = list_models()
EXPECTED = {"bokanyi_shallow", "bokanyi_deep", "agrawal_mittal", "mini_xception", "resnet18", "resnet34",
            "sixclass_cnn4", "sixclass_cnn5", "tan_mlp", "tan_default", "tan_improved", "tan_dropout",
            "tan_more_dropout", "tan_swish", "tan_pca"} | {f"frivas_cnn{i}" for i in range(1, 7)}


def batch(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    size = get_spec(name).input_size
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_zoo_registers_every_published_architecture() -> None:
    assert EXPECTED <= set(NAMES)
    assert get_spec("agrawal_mittal").input_size == 64
    assert get_spec("sixclass_cnn4").default_classes == get_spec("sixclass_cnn5").default_classes == 6


@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name: str) -> None:
    spec = get_spec(name)
    for num_classes in (None, 6):
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes).eval()
        assert model.input_size == spec.input_size
        with torch.no_grad():
            out = model(batch(name))
        assert out.shape == (2, num_classes or spec.default_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_training_step(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    y = torch.tensor([0, 1])
    loss = F.cross_entropy(model(batch(name)), y)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_strided_pointwise_conv_matches_conv2d_and_survives_odd_channels_last_batches() -> None:
    # mini-Xception's shortcut avoids a oneDNN kernel that corrupts the heap on AVX-512 CPUs (see its docstring):
    # the replacement must compute exactly nn.Conv2d(stride=2), and train on the shapes that crashed.
    from ferkit.models.zoo.xception import StridedPointwiseConv

    torch.manual_seed(0)
    conv = StridedPointwiseConv(8, 16, 1, stride=2, bias=False)
    reference = nn.Conv2d(8, 16, 1, stride=2, bias=False)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(3, 8, 44, 43)
    assert torch.equal(conv(x), reference(x))
    with torch.no_grad():  # inference takes the native strided conv: same function, maybe another kernel
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-6)
    model = create_model("mini_xception").to(memory_format=torch.channels_last).train()
    for n in (37, 5):  # the last batch of a FER2013 epoch at batch size 64 is 37 faces
        x = batch("mini_xception", n).contiguous(memory_format=torch.channels_last)
        F.cross_entropy(model(x), torch.zeros(n, dtype=torch.long)).backward()


def test_mini_xception_stem_options_downsample_and_train() -> None:
    # stem / stem_stride (model_kwargs) make a cheaper student: the modules run at 22x22 instead of 44x44.
    published = create_model("mini_xception")
    strided = create_model("mini_xception", stem=16, stem_stride=2)
    x = batch("mini_xception", 37)
    assert published.stem(x).shape[1:] == (8, 44, 44)
    assert strided.stem(x).shape[1:] == (16, 22, 22)
    assert count_flops(strided, 48) < count_flops(published, 48) / 2
    wide = create_model("mini_xception", stem=16, stem_stride=2, widths=(32, 64, 128, 256)).to(
        memory_format=torch.channels_last).train()
    logits = wide(x.contiguous(memory_format=torch.channels_last))
    assert logits.shape == (37, 7)
    F.cross_entropy(logits, torch.zeros(37, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in wide.parameters())


def test_ferkit_vgg_s_width_and_depth() -> None:
    # model_kwargs width / depth (the state-of-the-art issue's width/depth lever); the defaults are the shipped
    # network, whose weights load into it unchanged.
    shipped, _ = load_model("default")
    assert {k: v.shape for k, v in create_model("ferkit_vgg_s").state_dict().items()} == {
        k: v.shape for k, v in shipped.state_dict().items()}
    wide, deep = create_model("ferkit_vgg_s", width=1.5), create_model("ferkit_vgg_s", depth=3)
    assert [m.out_channels for m in wide.features if isinstance(m, nn.Conv2d)] == [48, 48, 96, 96, 192, 192, 384, 384]
    assert sum(isinstance(m, nn.Conv2d) for m in deep.features) == 12
    for model in (wide, deep):
        assert model(batch("ferkit_vgg_s", 3)).shape == (3, 7)
    base = count_flops(create_model("ferkit_vgg_s"), 48)
    assert 2.1 < count_flops(wide, 48) / base < 2.4 and 1.6 < count_flops(deep, 48) / base < 1.8


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"width": -1.0}, {"width": float("nan")}, {"width": float("inf")},
                                    {"width": "wide"}, {"width": True}, {"width": 100}, {"depth": 0}, {"depth": 2.5},
                                    {"depth": "2"}, {"depth": 7}])
def test_ferkit_vgg_s_refuses_bad_width_and_depth(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"ferkit_vgg_s: {next(iter(kwargs))} must be"):
        create_model("ferkit_vgg_s", **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_count_flops(name: str) -> None:
    model = create_model(name)
    assert count_flops(model, get_spec(name).input_size) > 0
    assert model.training  # count_flops restores the mode


def test_unknown_model_names_it() -> None:
    with pytest.raises(ValueError, match="nope"):
        create_model("nope")


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave the real registry untouched

    def builder(num_classes: int = 7) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, num_classes))

    register_model("test_dummy", source="test", reported="-")(builder)
    with pytest.raises(ValueError, match="test_dummy"):
        register_model("test_dummy", source="test", reported="-")(builder)
    with pytest.raises(ValueError, match="resnet18"):
        register_model("resnet18", source="test", reported="-")(builder)


def test_architecture_geometry() -> None:
    am = create_model("agrawal_mittal")
    assert am.final_kernel == 7  # 64 -> 32 -> 16 -> 8 -> 7, then the 7x7 conv covers the whole map
    convs = [m for m in am.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32] * 6 + [16] * 6 + [8] * 3 + [7]
    assert all(c.kernel_size == (8, 8) for c in convs[:-1])
    assert not any(isinstance(m, (nn.Linear, nn.MaxPool2d, nn.AvgPool2d)) for m in am.modules())
    f6 = create_model("frivas_cnn6")
    assert f6.classifier[1].in_features == 128 * 4 * 4  # 48 -> 46 -> 23 -> 21 -> 10 -> 8 -> 4
    assert create_model("frivas_cnn3").classifier[1].in_features == 256 * 6 * 6


def low_rank_faces(n: int = 40, rank: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, 48 * 48, generator=g)
    x = torch.randn(n, rank, generator=g) @ basis + 0.01 * torch.randn(n, 48 * 48, generator=g)
    return x.view(n, 1, 48, 48)


def test_tan_pca_fit_and_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("tan_pca")
    fresh = create_model("tan_pca")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    x = low_rank_faces()
    k = model.fit_preprocessing(x)
    assert 1 <= k <= 5 and int(model.pca_k) == k  # 98 % of the variance lives in the 5 planted directions
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # fixed shapes, whatever k is

    # The projection is idempotent and keeps the planted structure.
    faces = x[:4]
    projected = model.project(faces)
    assert torch.allclose(model.project(projected), projected, atol=1e-3)
    assert (projected - faces).norm() < 0.05 * faces.norm()

    model.eval()
    fresh.eval()
    with torch.no_grad():
        expected = model(faces)
        assert not torch.allclose(fresh(faces), expected)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(faces), expected)

    path = tmp_path / "tan_pca.safetensors"
    save_weights(model, path, {"model": "tan_pca", "num_classes": 7})
    loaded, _ = load_model(path)
    with torch.no_grad():
        # load_model returns channels_last: other conv kernels, the same function up to rounding.
        assert torch.allclose(loaded(faces), expected, atol=1e-6)


def test_tan_pca_subsamples_rows() -> None:
    model = create_model("tan_pca", max_rows=8)
    k = model.fit_preprocessing(low_rank_faces(n=30))
    assert 1 <= k <= 8
    assert model.pca_components[8:].abs().sum() == 0  # only 8 rows went into the SVD


def test_weights_arguments_resolve_shipped_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit.models.weights import SHIPPED_MODELS, default_weights_path, resolve_weights, shipped_weights_path

    assert resolve_weights(None) == default_weights_path() == shipped_weights_path("default")
    for name, stem in SHIPPED_MODELS.items():
        assert resolve_weights(name) == shipped_weights_path(name)
        assert shipped_weights_path(name).name == f"{stem}.safetensors"
    assert len({shipped_weights_path(name) for name in SHIPPED_MODELS}) == len(SHIPPED_MODELS)
    assert resolve_weights("runs/x/best.safetensors") == Path("runs/x/best.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_bytes(b"")  # a file the user named "default" wins over the shipped name
    assert resolve_weights(Path("default")) == Path("default")
    with pytest.raises(ValueError, match="no shipped model called 'tiny'"):
        shipped_weights_path("tiny")


def test_crop_views_feed_input_size_windows_of_larger_faces() -> None:
    from ferkit.data.augment import center_crop, ten_crop
    from ferkit.models.predict import predict_proba, preprocess

    model = create_model("sixclass_cnn4", num_classes=6).eval()
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    larger = preprocess(faces, 58, "dataset")  # crop views cut 48-pixel windows from faces at 48 * 48 / 40
    with torch.no_grad():
        centre = model(center_crop(larger, 48)).softmax(-1).numpy()
        ten = torch.stack([model(v).softmax(-1) for v in ten_crop(larger, 48)]).mean(0).numpy()
    assert torch.allclose(torch.from_numpy(predict_proba(model, faces, input_size=48, tta="center")),
                          torch.from_numpy(centre), atol=1e-5)
    assert torch.allclose(torch.from_numpy(predict_proba(model, faces, input_size=48, tta="tencrop")),
                          torch.from_numpy(ten), atol=1e-5)


def test_shift_views_are_the_face_and_four_two_pixel_translations() -> None:
    from ferkit.models.predict import predict_proba, preprocess, shifted, tta_views

    x = torch.arange(2 * 48 * 48, dtype=torch.float32).view(2, 1, 48, 48)
    views = tta_views(x, "shift")
    assert views.shape == (5, 2, 1, 48, 48) and torch.equal(views[0], x)
    right = views[1]  # content moved 2 pixels right; the two left columns repeat the first column
    assert torch.equal(right[..., 2:], x[..., :-2]) and torch.equal(right[..., :2], x[..., :1].expand(-1, -1, -1, 2))
    assert torch.equal(views[2][..., :-2], x[..., 2:])  # moved left
    assert torch.equal(views[3][..., 2:, :], x[..., :-2, :]) and torch.equal(views[4][..., :-2, :], x[..., 2:, :])
    assert torch.equal(shifted(x, 0, 0), x)
    model = create_model("sixclass_cnn4", num_classes=6).eval()
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(-1) for v in tta_views(preprocess(faces, 48, "dataset"), "shift")])
    assert torch.allclose(torch.from_numpy(predict_proba(model, faces, input_size=48, tta="shift")),
                          expected.mean(0), atol=1e-5)


def test_model_tta_picks_the_selection_view_of_the_weights() -> None:
    from ferkit.models.predict import TTA_MODES, model_tta

    assert model_tta("auto", {"train_view": "crop"}) == "center"
    assert model_tta("auto", {"train_view": "resize"}) == "none"
    assert model_tta("auto", {}) == "none"  # weights written before the view was recorded, or by other tools
    # a saved ensemble runs under the mode its weights were fitted with
    assert model_tta("auto", {"ensemble": True, "tta": "flip"}) == "flip"
    assert model_tta("auto", {"ensemble": True, "tta": "center", "train_view": "resize"}) == "center"
    for mode in TTA_MODES:
        assert model_tta(mode, {"train_view": "crop"}) == mode  # an explicit mode is honoured
    with pytest.raises(ValueError, match="auto, none, flip"):
        model_tta("mirror", {})
