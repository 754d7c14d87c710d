"""Why did the model say that? Saliency maps and Grad-CAM for ferkit models (and saved ensembles).

    >>> from ferkit.explain import saliency_map, grad_cam
    >>> sal = saliency_map(model, x)             # x: preprocessed faces (B, 1, S, S); -> (B, S, S), >= 0
    >>> cam = grad_cam(model, x, target=3)       # class 3 ("happy" in fer7); -> (B, S, S) in [0, 1]

* `saliency_map`: the magnitude of the gradient of the target class's score with respect to the input
  pixels, |d score / d x| (max over channels), as in Simonyan et al. 2014 and the saliency figures of
  Khaireddin & Chen 2021 (arXiv:2105.03588). Bright pixels are those whose change would most change the score.
* `grad_cam`: Grad-CAM (Selvaraju et al. 2017) on a convolution layer, by default the last `nn.Conv2d`
  module of the model (found generically, in registration order), its map A read after the normalization /
  activation layers that directly follow it in an nn.Sequential (Conv-BN-ReLU: after the ReLU):
  ReLU(sum_k alpha_k A_k) with alpha_k = mean over positions of d score / d A_k, upsampled bilinearly to the
  input size.

The score is the model's output for the target class before softmax: the logit for a single model, the
log of the combined probability for a saved ensemble (an `EnsembleModel` returns log-probabilities). The
target defaults to the predicted class. For an ensemble, `grad_cam` computes each member's Grad-CAM on its
own last conv layer and its own logit for the target, normalizes each to [0, 1] and averages them with
the ensemble's member weights; `saliency_map` differentiates the ensemble output itself.

`explain_faces` runs both on uint8 face crops and `plot_explanation` draws one face's face / saliency /
Grad-CAM panels into a PNG; `ferkit explain` uses them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Target = int | Sequence[int] | torch.Tensor | None


@contextlib.contextmanager
def _eval_with_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, BN running stats) with autograd on; restores the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected preprocessed faces of shape (B, 1, S, S), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError("expected float (preprocessed, normalized) faces; see ferkit.models.predict.preprocess")
    return x


def resolve_targets(target: Target, output: torch.Tensor) -> torch.Tensor:
    """(B,) int64 class indices: None -> argmax of `output`; an int -> the same class for every face."""
    b, c = output.shape
    if target is None:
        t = output.detach().argmax(-1)
    elif isinstance(target, (int, np.integer)):
        t = torch.full((b,), int(target), dtype=torch.long)
    else:
        t = torch.as_tensor(target, dtype=torch.long).flatten()
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"{t.numel()} targets for a batch of {b}")
    t = t.to(output.device)
    if ((t < 0) | (t >= c)).any():
        raise ValueError(f"target class out of range for {c} classes: {t.tolist()}")
    return t


def saliency_map(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """(B, S, S) float32 |d score[target] / d input|, max over input channels; >= 0, on the CPU.

    model: any ferkit model (or EnsembleModel) taking preprocessed faces. x: (B, 1, S, S) normalized
    float faces (`ferkit.models.predict.preprocess`). target: class index, one per face, or None for the
    predicted class. Parameter gradients are not touched (only the input's gradient is computed).
    """
    x = _check_input(x)
    with _eval_with_grad(model):
        xi = x.detach().to(_device(model), torch.float32).clone().requires_grad_(True)
        out = model(xi).float()
        t = resolve_targets(target, out)
        score = out.gather(1, t[:, None]).sum()
        (grad,) = torch.autograd.grad(score, xi)
    return grad.abs().amax(1).detach().float().cpu()


def find_last_conv(model: nn.Module) -> nn.Conv2d:
    """The last `nn.Conv2d` among `model.modules()` (registration order); ValueError when there is none."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise ValueError(f"{getattr(model, 'ferkit_name', type(model).__name__)} has no nn.Conv2d layer; "
                         "Grad-CAM needs a convolutional model (use saliency_map instead)")
    return last


# Layers that act per channel / per element and keep the feature map's layout: Grad-CAM reads the last conv
# layer's map after them (the rectified map, as in Selvaraju et al.), when they follow it in an nn.Sequential.
_ELEMENTWISE = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
                nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.PReLU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Identity)


def gradcam_layer(model: nn.Module) -> nn.Module:
    """Where Grad-CAM reads its feature map: the last nn.Conv2d (`find_last_conv`) or, when it sits in an
    nn.Sequential followed by normalization / activation layers (e.g. Conv-BN-ReLU), the last of those, so
    the map is the rectified output of the last conv block rather than the raw convolution (which differs by
    a per-channel offset that ReLU(sum alpha_k A_k) does not ignore)."""
    conv = find_last_conv(model)
    uses: dict[int, int] = {}
    parent = None
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
        if isinstance(m, nn.Sequential) and any(child is conv for child in m):
            parent = m
    if parent is None:
        return conv
    children = list(parent)
    layer: nn.Module = conv
    for child in children[children.index(conv) + 1:]:
        if not isinstance(child, _ELEMENTWISE) or uses.get(id(child), 0) > 1:
            break
        layer = child
    return layer


def _is_ensemble(model: nn.Module) -> bool:
    return hasattr(model, "members") and hasattr(model, "ensemble_weights")


def _normalize_maps(cam: torch.Tensor) -> torch.Tensor:
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)
    return cam / peak[:, None, None]


def grad_cam(model: nn.Module, x: torch.Tensor, target: Target = None, layer: nn.Module | None = None,
             normalize: bool = True) -> torch.Tensor:
    """(B, S, S) float32 Grad-CAM of `target` (None: the predicted class) on `layer` (default: the last
    nn.Conv2d, read after the BN / activation layers that directly follow it, see `gradcam_layer`),
    upsampled to the input size; >= 0 and, with `normalize`, scaled to a maximum of 1 per face
    (an all-zero map stays zero). For an ensemble (and no `layer`), the member-weighted mean of the members'
    normalized maps, with the target taken from the ensemble's prediction when not given.
    """
    x = _check_input(x)
    if _is_ensemble(model) and layer is None:
        with _eval_with_grad(model), torch.no_grad():
            t = resolve_targets(target, model(x.to(_device(model), torch.float32)).float())
        w = torch.as_tensor(np.asarray(model.ensemble_weights.member_weights, dtype=np.float64))
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))
        maps = [grad_cam(m, x, t.cpu(), None, normalize=True) for m in model.members]
        cam = sum(float(wi) * mi for wi, mi in zip(w, maps, strict=True))
        return _normalize_maps(cam) if normalize else cam
    layer = layer if layer is not None else gradcam_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        captured["a"] = out
        return out.clone()  # later in-place ops (ReLU(inplace=True)) change the clone, not the captured map

    with _eval_with_grad(model):
        handle = layer.register_forward_hook(hook)
        try:
            xi = x.detach().to(_device(model), torch.float32)
            out = model(xi).float()
        finally:
            handle.remove()
        if "a" not in captured:
            raise ValueError("the Grad-CAM layer was not used in the forward pass")
        acts = captured["a"]
        if acts.dim() != 4:
            raise ValueError(f"Grad-CAM needs a (B, K, H, W) feature map, got {tuple(acts.shape)}")
        t = resolve_targets(target, out)
        score = out.gather(1, t[:, None]).sum()
        (grads,) = torch.autograd.grad(score, acts)
    alpha = grads.float().mean((2, 3), keepdim=True)
    cam = F.relu((alpha * acts.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    cam = cam.cpu()
    return _normalize_maps(cam) if normalize else cam


# -- faces in, pictures out ------------------------------------------------------------------------------


@dataclass
class Explanation:
    """One face: its crop, the model's probabilities and both maps (at the model's input size)."""

    face: np.ndarray  # uint8 (H, W) grayscale face: the part the model saw (see explain_faces)
    probs: np.ndarray  # (C,) float32 probabilities (no TTA)
    target: int  # the class the maps explain
    saliency: np.ndarray  # (S, S) float32, >= 0
    cam: np.ndarray  # (S, S) float32 in [0, 1]

    def top(self, classes: Sequence[str], k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs)[:k]
        return [(classes[i], float(self.probs[i])) for i in order]


def explain_faces(model: nn.Module, meta: dict[str, Any], faces: np.ndarray, target: Target = None,
                  batch_size: int = 64) -> list[Explanation]:
    """Probabilities, saliency and Grad-CAM for uint8 faces (N, H, W), preprocessed as `meta` says.

    The model sees one view of each face, the one `--tta auto` starts from: the whole face, or for weights
    trained on crops (and ensembles fitted on crop views) the centre crop of the face enlarged to 48/40 of the
    input size; each Explanation's `face` is then the part of the face the model saw, so the maps line up.
    """
    from ferkit.data.augment import center_crop
    from ferkit.inference.faces import FER_SIZE
    from ferkit.models.predict import CROP_MODES, model_tta, preprocess, tencrop_source_size

    faces = np.asarray(faces)
    if faces.ndim == 2:
        faces = faces[None]
    input_size = int(meta.get("input_size", getattr(model, "input_size", FER_SIZE)))
    norm = meta.get("normalize", "dataset")
    batch = torch.as_tensor(np.ascontiguousarray(faces))
    if model_tta("auto", meta) in CROP_MODES:
        source = tencrop_source_size(input_size)
        x_all = center_crop(preprocess(batch, source, norm), input_size)
        faces = np.stack([_central_part(f, input_size / source) for f in faces]) if len(faces) else faces
    else:
        x_all = preprocess(batch, input_size, norm)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(x_all[i:i + batch_size].to(_device(model))).float().softmax(-1).cpu()
                           for i in range(0, len(faces), batch_size)]) if len(faces) else torch.zeros(0, 0)
    model.train(was_training)
    targets = resolve_targets(target, probs).cpu() if len(faces) else torch.zeros(0, dtype=torch.long)
    out: list[Explanation] = []
    for i in range(0, len(faces), batch_size):
        x, t = x_all[i:i + batch_size], targets[i:i + batch_size]
        sal = saliency_map(model, x, t)
        cam = grad_cam(model, x, t)
        for j in range(len(x)):
            out.append(Explanation(faces[i + j], probs[i + j].numpy(), int(t[j]), sal[j].numpy(), cam[j].numpy()))
    return out


def _central_part(face: np.ndarray, fraction: float) -> np.ndarray:
    """The centred window covering `fraction` of each side of `face`."""
    h, w = face.shape[:2]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return face[top:top + ch, left:left + cw]


def plot_explanation(exp: Explanation, classes: Sequence[str], path: str | os.PathLike,
                     title: str | None = None, truth: str | None = None) -> Path:
    """A PNG with three panels: the face crop, the saliency map and the Grad-CAM overlay.

    The title names the predicted label and the top-3 probabilities (and `truth`, when known).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = exp.face.shape[:2]
    extent = (0, w, h, 0)  # maps are at the model's input size; draw them over the face's own frame
    sal = exp.saliency / max(float(exp.saliency.max()), 1e-12)
    top = exp.top(classes, 3)
    explained = classes[exp.target]
    fig = Figure(figsize=(9.0, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(exp.face, cmap="gray", vmin=0, vmax=255, extent=extent)
    axes[0].set_title("face (model input)" if truth is None else f"face (true: {truth})", fontsize=9)
    axes[1].imshow(sal, cmap="hot", vmin=0, vmax=1, extent=extent)
    axes[1].set_title(f"saliency |d score/d x| ({explained})", fontsize=9)
    axes[2].imshow(exp.face, cmap="gray", vmin=0, vmax=255, extent=extent)
    axes[2].imshow(exp.cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=extent)
    axes[2].set_title(f"Grad-CAM ({explained})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    head = f"predicted: {top[0][0]} ({top[0][1]:.0%})  |  top-3: " + ", ".join(f"{c} {p:.2f}" for c, p in top)
    fig.suptitle(head if title is None else f"{title}\n{head}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
