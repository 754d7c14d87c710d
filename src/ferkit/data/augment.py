"""Batch augmentation and preprocessing with torch ops (no per-image Python loops).

All geometric augmentations (random resized crop, rotation, translation, horizontal flip) are
composed into one affine warp per image and applied with a single `grid_sample`, which is both
fast on CPU and exact about what each knob does. Randomness comes only from the `generator`
passed in, so a seeded run (and a resumed one) sees the same augmented batches. The random numbers
are drawn on the CPU (a torch.Generator lives on one device) and moved to the batch's device, so a
batch on a GPU is augmented there with the same draws a CPU run would make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Mean and std of FER2013 Training pixels (scaled to [0, 1]); measured on the real file.
FER2013_MEAN = 0.5077
FER2013_STD = 0.2550
NORMALIZATIONS = ("dataset", "per_image", "none")


@dataclass
class AugmentConfig:
    """Each augmentation is off when its strength (or probability) is 0."""

    crop_scale: tuple[float, float] = (0.8, 1.0)  # random resized crop: fraction of the area kept
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect ratio range of the crop
    hflip: float = 0.5  # probability of a horizontal flip
    rotation: float = 10.0  # max degrees, uniform in [-rotation, rotation]
    translate: float = 0.1  # max shift as a fraction of the side
    erasing: float = 0.5  # probability of one random-erasing rectangle
    erasing_scale: tuple[float, float] = (0.02, 0.2)  # its area as a fraction of the image

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, rotation=0.0, translate=0.0,
                   erasing=0.0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) uint8 -> (B, 1, H, W) float32 in [0, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    # Out of place: with a float input, `.float()` is the input itself and an in-place divide would
    # rescale the caller's tensor.
    return images.div(255.0).float()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize (bilinear, antialiased when shrinking); a no-op at the same size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


def normalize(x: torch.Tensor, mode: str = "dataset") -> torch.Tensor:
    """'dataset': FER2013 mean/std; 'per_image': zero mean, unit std per face; 'none': as is."""
    if mode == "dataset":
        return (x - FER2013_MEAN) / FER2013_STD
    if mode == "per_image":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return (x - mean) / std
    if mode == "none":
        return x
    raise ValueError(f"unknown normalization {mode!r}; choose one of {NORMALIZATIONS}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def random_affine(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop + rotation + translation + flip as one affine warp per image."""
    b = x.shape[0]
    g = generator
    # Crop: area fraction s and aspect r give the crop's width/height as fractions of the image.
    area = _uniform(b, *cfg.crop_scale, g)
    log_r = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g)
    ratio = torch.exp(log_r)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    # The crop centre may move as far as the crop stays inside, plus the extra translation.
    tx = (_uniform(b, -1, 1, g) * (1 - sx)) + _uniform(b, -cfg.translate, cfg.translate, g) * 2
    ty = (_uniform(b, -1, 1, g) * (1 - sy)) + _uniform(b, -cfg.translate, cfg.translate, g) * 2
    angle = _uniform(b, -cfg.rotation, cfg.rotation, g) * (math.pi / 180)
    flip = torch.where(torch.rand(b, generator=g) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
        torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
    ], dim=1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_erasing(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill one random rectangle per selected image with noise (Zhong et al. 2017)."""
    b, _, h, w = x.shape
    g = generator
    apply = torch.rand(b, generator=g) < cfg.erasing
    area = _uniform(b, *cfg.erasing_scale, g) * h * w
    ratio = torch.exp(_uniform(b, math.log(0.3), math.log(3.3), g))
    eh = torch.sqrt(area * ratio).clamp(1, h)
    ew = torch.sqrt(area / ratio).clamp(1, w)
    y0 = torch.rand(b, generator=g) * (h - eh)
    x0 = torch.rand(b, generator=g) * (w - ew)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = ((rows >= y0.view(b, 1, 1)) & (rows < (y0 + eh).view(b, 1, 1))
            & (cols >= x0.view(b, 1, 1)) & (cols < (x0 + ew).view(b, 1, 1)) & apply.view(b, 1, 1))
    noise = torch.rand(x.shape, generator=g, dtype=x.dtype)
    return torch.where(mask.unsqueeze(1).to(x.device), noise.to(x.device), x)


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A size x size window of each image at a uniformly random whole-pixel offset: (B, C, H, W) -> (B, C, size, size).

    The training view of ten-crop recipes (Khaireddin & Chen train on 40-pixel crops of 48-pixel faces): the
    crop keeps the face's scale, so the ten crops at test time show faces at the scale seen in training.
    """
    b = x.shape[0]
    h, w, _, _ = _crop_corners(x, size)
    offsets = torch.arange(size)
    rows = (torch.randint(0, h - size + 1, (b, 1), generator=generator) + offsets).to(x.device)
    cols = (torch.randint(0, w - size + 1, (b, 1), generator=generator) + offsets).to(x.device)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    # Channels last for the gather, so the three index tensors are adjacent and their (B, size, size) shape leads.
    return x.permute(0, 2, 3, 1)[batch, rows.view(b, size, 1), cols.view(b, 1, size)].permute(0, 3, 1, 2)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
            crop: int = 0) -> torch.Tensor:
    """Apply the configured augmentations to a float batch (B, 1, H, W) in [0, 1].

    crop: when > 0, cut a random crop x crop window out of each warped image (`random_crop`) before random
    erasing, which then falls inside the crop, as in a ten-crop recipe that erases each crop.
    """
    geometric = (tuple(cfg.crop_scale) != (1.0, 1.0) or tuple(cfg.crop_ratio) != (1.0, 1.0) or cfg.rotation > 0
                 or cfg.translate > 0 or cfg.hflip > 0)
    if geometric:
        x = random_affine(x, cfg, generator)
    if crop:
        x = random_crop(x, crop, generator)
    if cfg.erasing > 0:
        x = random_erasing(x, cfg, generator)
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _crop_corners(x: torch.Tensor, size: int) -> tuple[int, int, int, int]:
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the image {h}x{w}")
    return h, w, (h - size) // 2, (w - size) // 2


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window: (B, 1, H, W) -> (B, 1, size, size); ten-crop's fifth view."""
    _, _, c0, c1 = _crop_corners(x, size)
    return x[..., c0:c0 + size, c1:c1 + size]


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Four corners + centre, and their mirror images: (B, 1, H, W) -> (10, B, 1, size, size)."""
    h, w, c0, c1 = _crop_corners(x, size)
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (c0, c1)]
    crops = [x[..., r:r + size, c:c + size] for r, c in corners]
    return torch.stack(crops + [hflip(c) for c in crops])
