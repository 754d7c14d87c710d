"""Batch augmentation and preprocessing: identities, flips, determinism, erasing, ten-crop, normalization."""

from __future__ import annotations

import pytest
import torch

from ferkit.data.augment import (
    FER2013_MEAN,
    FER2013_STD,
    AugmentConfig,
    augment,
    center_crop,
    normalize,
    random_affine,
    random_crop,
    random_erasing,
    resize,
    ten_crop,
    to_float,
)


@pytest.fixture
def batch() -> torch.Tensor:
    """(4, 1, 48, 48) float faces in [0, 1] with structure (so flips and crops are visible)."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 48).view(1, 1, 1, 48).expand(4, 1, 48, 48)
    return (0.7 * ramp + 0.3 * torch.rand(4, 1, 48, 48, generator=g)).contiguous()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_off_leaves_the_batch_unchanged(batch: torch.Tensor) -> None:
    cfg = AugmentConfig.off()
    assert torch.allclose(augment(batch, cfg, gen(0)), batch)
    # the warp itself is an identity too when every knob is off
    assert torch.allclose(random_affine(batch, cfg, gen(0)), batch, atol=1e-5)


def test_hflip_only_equals_flip(batch: torch.Tensor) -> None:
    cfg = AugmentConfig.off()
    cfg.hflip = 1.0
    out = augment(batch, cfg, gen(0))
    assert out.shape == batch.shape
    assert torch.allclose(out, batch.flip(-1), atol=1e-5)


def test_same_seed_same_output_different_seed_different(batch: torch.Tensor) -> None:
    cfg = AugmentConfig()
    a = augment(batch, cfg, gen(123))
    b = augment(batch, cfg, gen(123))
    c = augment(batch, cfg, gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, batch)  # the default config does augment


def test_random_erasing_changes_some_pixels(batch: torch.Tensor) -> None:
    cfg = AugmentConfig.off()
    cfg.erasing = 1.0
    out = random_erasing(batch, cfg, gen(1))
    assert out.shape == batch.shape
    changed = (out != batch).flatten(1).sum(dim=1)
    assert (changed > 0).all()  # every image got a rectangle
    assert (changed < 48 * 48 * cfg.erasing_scale[1] * 1.5).all()  # ... of bounded size
    assert torch.equal(augment(batch, cfg, gen(1)), out)  # geometric part off: augment == erasing alone
    cfg.erasing = 0.0
    assert torch.equal(random_erasing(batch, cfg, gen(1)), batch)


def test_each_geometric_setting_alone_augments(batch: torch.Tensor) -> None:
    for key, value in [("crop_scale", (0.8, 1.0)), ("crop_ratio", (0.8, 1.25)), ("rotation", 10.0),
                       ("translate", 0.1), ("hflip", 1.0)]:
        cfg = AugmentConfig.off()
        setattr(cfg, key, value)
        assert not torch.allclose(augment(batch, cfg, gen(1)), batch), key
    assert torch.equal(augment(batch, AugmentConfig.off(), gen(1)), batch)


def test_ten_crop_shape_and_centre(batch: torch.Tensor) -> None:
    size = 40
    crops = ten_crop(batch, size)
    assert crops.shape == (10, 4, 1, size, size)
    c = (48 - size) // 2
    assert torch.equal(crops[4], batch[..., c:c + size, c:c + size])
    assert torch.equal(crops[0], batch[..., :size, :size])
    assert torch.equal(crops[3], batch[..., -size:, -size:])
    for k in range(5):
        assert torch.equal(crops[5 + k], crops[k].flip(-1))
    assert ten_crop(batch, 48).shape == (10, 4, 1, 48, 48)
    with pytest.raises(ValueError, match="larger than the image"):
        ten_crop(batch, 49)


def test_random_crop_cuts_whole_pixel_windows_at_random_offsets(batch: torch.Tensor) -> None:
    size = 40
    out = random_crop(batch, size, gen(3))
    assert out.shape == (4, 1, size, size)
    offsets = []
    for img, crop in zip(batch, out, strict=True):
        # Each crop is exactly one window of its own image (no interpolation); find where.
        found = [(r, c) for r in range(48 - size + 1) for c in range(48 - size + 1)
                 if torch.equal(img[..., r:r + size, c:c + size], crop)]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # offsets differ between images
    assert torch.equal(random_crop(batch, size, gen(3)), out)  # the generator decides them
    two_channel = torch.cat([batch, 1 - batch], dim=1)
    both = random_crop(two_channel, size, gen(3))
    assert torch.equal(both[:, :1], out) and torch.equal(both[:, 1:], 1 - out)  # one window for all channels
    assert torch.equal(random_crop(batch, 48, gen(3)), batch)
    with pytest.raises(ValueError, match="larger than the image"):
        random_crop(batch, 49, gen(3))


def test_augment_crops_after_the_warp_and_erases_inside_the_crop(batch: torch.Tensor) -> None:
    cfg = AugmentConfig.off()
    assert torch.equal(augment(batch, cfg, gen(5), crop=40), random_crop(batch, 40, gen(5)))
    cfg.hflip = 1.0  # always flip: warp then crop == crop of the warped batch
    g = gen(5)
    expected = random_crop(random_affine(batch, cfg, g), 40, g)
    assert torch.allclose(augment(batch, cfg, gen(5), crop=40), expected)
    cfg = AugmentConfig.off()
    cfg.erasing = 1.0
    g = gen(5)
    expected = random_erasing(random_crop(batch, 40, g), cfg, g)
    assert torch.equal(augment(batch, cfg, gen(5), crop=40), expected)


def test_center_crop_is_ten_crops_centre(batch: torch.Tensor) -> None:
    assert torch.equal(center_crop(batch, 40), ten_crop(batch, 40)[4])
    assert center_crop(batch, 40).shape == (4, 1, 40, 40)
    with pytest.raises(ValueError, match="larger than the image"):
        center_crop(batch, 50)


def test_normalize_modes(batch: torch.Tensor) -> None:
    assert torch.allclose(normalize(batch, "dataset"), (batch - FER2013_MEAN) / FER2013_STD)
    per = normalize(batch, "per_image")
    assert torch.allclose(per.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(per.std(dim=(1, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.equal(normalize(batch, "none"), batch)
    flat = torch.full((2, 1, 8, 8), 0.5)
    assert torch.isfinite(normalize(flat, "per_image")).all()  # constant faces: std is clamped
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize(batch, "imagenet")


def test_to_float_range_and_shape() -> None:
    images = torch.tensor([[[0, 255], [128, 1]]], dtype=torch.uint8).expand(3, 2, 2)
    x = to_float(images)
    assert x.shape == (3, 1, 2, 2) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert x[0, 0, 1, 0].item() == pytest.approx(128 / 255)
    assert to_float(images.unsqueeze(1)).shape == (3, 1, 2, 2)
    assert images.dtype == torch.uint8 and int(images.max()) == 255  # the input is left alone
    floats = torch.rand(2, 1, 4, 4)
    before = floats.clone()
    assert torch.allclose(to_float(floats), before / 255) and torch.equal(floats, before)  # never in place


def test_resize(batch: torch.Tensor) -> None:
    assert resize(batch, 48) is batch
    assert resize(batch, 40).shape == (4, 1, 40, 40) and resize(batch, 64).shape == (4, 1, 64, 64)
