"""Run a model on uint8 faces: preprocessing, batching, optional test-time augmentation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferkit.data.augment import center_crop, hflip, normalize, resize, ten_crop, to_float
from ferkit.device import autocast

# none: the whole face; flip: it and its mirror image; tencrop: the four corner and the centre input-size crops of
# a face 48/40 larger, and their mirror images; center: that centre crop alone (one view, the scale a ten-crop-
# trained model learnt on: how such a model is validated while it trains).
# shift: the whole face and four copies moved by ~4 % of its side (2 pixels at 48) up, down, left and right, edge
# pixels repeated: the small translations training augmentation shows the model.
TTA_MODES = ("none", "flip", "tencrop", "center", "shift")
# How many forward passes each mode costs per face (tta_views' first dimension): what a selection among modes
# breaks ties with, and what the lever tables call "Nx compute".
TTA_VIEW_COUNTS = {"none": 1, "center": 1, "flip": 2, "shift": 5, "tencrop": 10}
CROP_MODES = ("tencrop", "center")
# What callers holding a model's metadata accept: "auto" is the view its weights were selected on (model_tta).
TTA_CHOICES = ("auto", *TTA_MODES)


class NonFiniteOutputError(ValueError):
    """A model produced NaN or infinite probabilities: no class can be reported for those faces."""


def check_finite(probs: np.ndarray) -> np.ndarray:
    """`probs` unchanged if every value is finite; else NonFiniteOutputError naming the faces. Every prediction
    path ends here, so a NaN never becomes a "dominant" class or a bare NaN in JSON output."""
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=tuple(range(1, probs.ndim))))  # faces with a bad value
    if len(bad):
        faces = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise NonFiniteOutputError(f"the model produced NaN or infinite probabilities for {len(bad)} of "
                                   f"{len(probs)} face(s) (index {faces})")
    return probs


def model_tta(tta: str, meta: Mapping[str, Any]) -> str:
    """The TTA mode to run weights with metadata `meta` under: "auto" -> for a saved ensemble, the mode its
    weights were fitted with (meta["tta"]); for a model trained on crops (train_view "crop": fed whole faces it
    sees faces smaller than any in training) "center"; else "none". Any mode of TTA_MODES is returned as given."""
    if tta == "auto":
        if meta.get("ensemble"):
            return str(meta.get("tta") or "none")
        return "center" if meta.get("train_view") == "crop" else "none"
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose one of {', '.join(TTA_CHOICES)}")
    return tta


def preprocess(images: torch.Tensor, input_size: int, norm: str) -> torch.Tensor:
    """uint8 (B, H, W) faces -> normalized float (B, 1, S, S) at the model's input size."""
    return normalize(resize(to_float(images), input_size), norm)


def tencrop_source_size(input_size: int) -> int:
    """The face side that crop views (tencrop, center, training crops) cut input-size windows from: 48 for 40."""
    return round(input_size * 48 / 40)


def tta_views(x: torch.Tensor, tta: str, input_size: int | None = None) -> torch.Tensor:
    """The TTA views of a preprocessed batch (B, 1, S, S): (V, B, 1, input_size, input_size); one place for both
    backends (models.predict and the ONNX backend)."""
    size = input_size or x.shape[-1]
    if tta == "none":
        return x.unsqueeze(0)
    if tta == "flip":
        return torch.stack([x, hflip(x)])
    if tta == "tencrop":
        return ten_crop(x, size)
    if tta == "center":
        return center_crop(x, size).unsqueeze(0)
    if tta == "shift":
        step = max(1, round(x.shape[-1] / 24))
        return torch.stack([x, *(shifted(x, dx, dy) for dx, dy in ((step, 0), (-step, 0), (0, step), (0, -step)))])
    raise ValueError(f"unknown TTA mode {tta!r}; choose one of {TTA_MODES}")


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x (B, 1, H, W) with its content moved dx pixels right and dy down; the uncovered border repeats the edge."""
    pad = max(abs(dx), abs(dy))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


@torch.no_grad()
def predict_batch(model: nn.Module, x: torch.Tensor, tta: str = "none", input_size: int | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities for a preprocessed batch, averaged over the TTA views."""
    device = next(model.parameters()).device
    views = tta_views(x.to(device), tta, input_size)
    n, b = views.shape[:2]
    with autocast(device, dtype):
        if hasattr(model, "probs_over_views"):  # a saved ensemble: members are view-averaged, then combined
            return model.probs_over_views(views.flatten(0, 1).contiguous(), n).float()
        logits = model(views.flatten(0, 1).contiguous())
    return logits.float().softmax(-1).view(n, b, -1).mean(0)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray | torch.Tensor, *, input_size: int, norm: str = "dataset",
                  tta: str = "none", batch_size: int = 256, dtype: torch.dtype | None = None) -> np.ndarray:
    """(N, C) float32 class probabilities for uint8 faces (N, H, W)."""
    was_training = model.training
    model.eval()
    images = torch.as_tensor(images)
    # Crop views take input-size crops from a face 48/40 times larger (40-pixel crops of 48-pixel faces,
    # as in Khaireddin & Chen); other modes feed the whole face at the input size.
    prep_size = tencrop_source_size(input_size) if tta in CROP_MODES else input_size
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size], prep_size, norm)
        out.append(predict_batch(model, x, tta, input_size, dtype).cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return check_finite(torch.cat(out).numpy().astype(np.float32))
