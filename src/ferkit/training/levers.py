"""Training levers beyond the plain loop: weight averaging (EMA, SWA), sharpness-aware minimization (SAM, ASAM),
mixup / CutMix, and the loss on the labels (cross-entropy or Tang's squared hinge). Torch only (timm is optional
and torchvision is not a dependency); each piece is small enough to read against its paper. The trainer turns them
on from TrainConfig (average, ema_decay, swa_start, sam_rho, sam_adaptive, mixup_alpha, cutmix_alpha, mix_prob,
loss); with their defaults it runs none of this code but the cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from ferkit.training.config import TrainConfig
from ferkit.training.distributed import SINGLE, Dist

# ---- settings that do nothing --------------------------------------------------------------------------------


def ignored_settings(cfg: TrainConfig) -> list[str]:
    """Notes on lever settings that `cfg` sets away from their defaults where they do nothing (the lever they
    belong to is off), each naming the setting: a typo'd or forgotten lever would otherwise pass unseen, and a
    sweep over such a setting would train the same run several times."""
    default, notes = TrainConfig(), []

    def setting(name: str) -> str:
        value = getattr(cfg, name)
        return f"{name}={'true' if value is True else value}"

    if cfg.sam_adaptive and not cfg.sam_rho:
        notes.append(f"{setting('sam_adaptive')} does nothing with sam_rho=0 (SAM is off)")
    for name, average in (("ema_decay", "ema"), ("swa_start", "swa")):
        if getattr(cfg, name) != getattr(default, name) and cfg.average != average:
            notes.append(f"{setting(name)} does nothing with average={cfg.average} (it is average={average}'s)")
    if cfg.distill_view != default.distill_view and not cfg.teacher:
        notes.append(f"{setting('distill_view')} does nothing without a teacher (distillation is off)")
    if cfg.distill_views != default.distill_views and not (cfg.teacher and cfg.distill_view == "cached"):
        notes.append(f"{setting('distill_views')} does nothing without a teacher and distill_view=cached")
    if cfg.mix_prob != default.mix_prob and cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        notes.append(f"{setting('mix_prob')} does nothing with mixup_alpha=0 and cutmix_alpha=0 (mixing is off)")
    return notes


# ---- weight averaging ---------------------------------------------------------------------------------------


def averaged_model(model: nn.Module, cfg: TrainConfig) -> AveragedModel | None:
    """The copy of `model` that `cfg.average` keeps (None for 'none'), using torch's own averaging.

    ema: W_ema <- decay * W_ema + (1 - decay) * W after every optimizer step (the first step copies W), with the
    BatchNorm running statistics averaged alike (use_buffers). Integer buffers (BatchNorm's num_batches_tracked,
    tan_pca's fitted rank pca_k) are copied, not averaged: an average of integers stored back as an integer is
    truncated (49 * 0.96 + 49 * 0.04 is 48.99..., stored as 48). swa: the running mean of the weights it is given
    (once per epoch: `swa_averages`; Izmailov et al. 2018, 'Averaging Weights Leads to Wider Optima and Better
    Generalization'); it averages the parameters alone (always floating point) and copies every buffer from the
    model, and its BatchNorm statistics are then recomputed for the mean weights (`recompute_batchnorm`)."""
    if cfg.average == "ema":
        return AveragedModel(model, multi_avg_fn=_ema_floats_copy_integers(cfg.ema_decay), use_buffers=True)
    if cfg.average == "swa":
        return AveragedModel(model)
    return None


def _ema_floats_copy_integers(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """torch's EMA update for floating-point tensors; other tensors take the model's values. AveragedModel calls
    it once per group of tensors of one device and dtype, so each call's tensors are all floating point or all
    not."""
    ema = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            ema(averaged, current, n_averaged)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def swa_averages(cfg: TrainConfig, epochs_done: int) -> bool:
    """Whether SWA adds the weights at the end of epoch `epochs_done` (1-based) to its mean: every epoch after the
    first `swa_start` fraction of the run's epochs (swa_start 0.75 of 100 epochs: epochs 76-100). The epochs left
    out are the whole part of swa_start * epochs, taken with a margin for float rounding: 0.29 * 100 is
    28.999999999999996, and leaves out 29 epochs (a product a hair below a whole number is that number)."""
    return cfg.average == "swa" and epochs_done > math.floor(cfg.swa_start * cfg.epochs + 1e-9)


def recompute_batchnorm(model: nn.Module, batch: Callable[[slice], torch.Tensor], n: int, batch_size: int,
                        device: torch.device, d: Dist = SINGLE) -> None:
    """Give `model`'s BatchNorm layers the running statistics of its own weights, from one pass over n faces in
    batches of `batch_size` (`batch(rows)`: the model's input for that slice of them) in training mode, without
    gradients (torch's update_bn): a mean of weights is not a mean of the activations' statistics. The statistics
    are the mean over the batches of each batch's mean and (unbiased) variance. The global RNG is forked, so
    dropout draws in this pass leave the training's random stream (and its resume) as it was.

    Several processes (`d`) share the pass, each doing its share of the work, and every process ends with the
    one-process statistics (up to float rounding). Plain BatchNorm: each process runs whole batches, every
    world_size-th one (rank r: batches r, r + world_size, ...), at the size one process uses, so that each
    batch's statistics are the one-process pass's; the processes' means of them are then combined, each weighted
    by its number of batches. (Splitting every batch instead would give each layer the statistics of smaller
    batches, and a deeper layer's input depends on the batch its inputs were normalized with.) SyncBatchNorm
    (sync_batchnorm), whose layers compute each batch's statistics over all the processes together: each process
    runs its share of every batch, every process taking part in every batch."""
    synced = d.active and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    starts = range(0, n, batch_size)
    if d.active and not synced:
        starts = starts[d.rank::d.world_size]

    def batches() -> Iterator[torch.Tensor]:
        for start in starts:
            rows = range(start, min(start + batch_size, n))
            share = rows[d.shard(len(rows))] if synced else rows
            yield batch(slice(share.start, share.stop))

    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        update_bn(batches(), model)
        if d.active and not synced:
            _combine_batchnorm(model, d)


def _combine_batchnorm(model: nn.Module, d: Dist) -> None:
    """Every process's BatchNorm running statistics become the mean of all the processes' batches' statistics:
    each process's means (over its num_batches_tracked batches) weighted by its number of batches, summed in
    float64 (one collective for all the layers); num_batches_tracked becomes the total."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not layers:
        return
    parts = []
    for m in layers:
        count = m.num_batches_tracked.to(torch.float64)
        parts += [count.reshape(1), m.running_mean.double().flatten() * count, m.running_var.double().flatten() * count]
    total, at = d.sum(torch.cat(parts)), 0
    for m in layers:
        count, size = total[at], m.running_mean.numel()
        m.running_mean.copy_((total[at + 1:at + 1 + size] / count).view_as(m.running_mean))
        m.running_var.copy_((total[at + 1 + size:at + 1 + 2 * size] / count).view_as(m.running_var))
        m.num_batches_tracked.fill_(int(round(float(count))))
        at += 1 + 2 * size


# ---- SAM / ASAM ---------------------------------------------------------------------------------------------


def sam_gradient(model: nn.Module, recompute: Callable[[], None], rho: float, adaptive: bool = False,
                 loss_scale: float | None = None) -> None:
    """Replace the gradients of `model`'s parameters, those of the loss at the weights w (a backward pass ran), by
    SAM's: the gradient at w + e, e = rho * T(T g) / ||T g||, after which the base optimizer steps from w.

    T = 1: SAM (Foret, Kleiner, Mobahi & Neyshabur 2021, 'Sharpness-Aware Minimization for Efficiently Improving
    Generalization', ICLR). T = |w| element-wise: ASAM (Kwon, Kim, Park & Choi 2021, 'ASAM: Adaptive
    Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks', ICML) as the widely used
    davda54/sam implements it: T = |w| for every parameter. The authors' code (SamsungLabs/ASAM) differs twice: T =
    |w| + eta (eta = 0.01) for parameters named 'weight', and T = 1 (no scaling) for the others, the biases. Here a
    parameter at exactly zero (a zero-initialised bias or BatchNorm shift, at the first step) is not perturbed
    until it has moved, and a bias's perturbation scales with its size. (No sam_eta setting: matching the
    authors' rule would also need the name-based bias rule; what matters for a comparison is that the variant is
    stated.)

    `recompute()` runs the forward and backward pass again; its backward fills the gradients anew (they are
    cleared first, so the first pass's do not add to them; under DDP it averages them over the processes as the
    first backward did, so every process perturbs and steps alike). Only parameters with a gradient move (frozen
    ones stay). The weights are then put back bit for bit, and so are the running statistics of the normalization
    layers (BatchNorm's, which the second forward updated): the second pass measures a gradient and changes
    nothing else. Other buffers, which a forward pass does not change, are left alone (tan_pca's PCA components,
    21 MB, are not copied twice a step).

    loss_scale: the factor fp16 loss scaling (torch's GradScaler) multiplied the gradients by; None: they are the
    loss's own. e is computed from the true gradients g / loss_scale (the 1e-12 guard is meant for them, and they
    are what rho is measured against); `recompute()` must scale its loss alike, so that GradScaler unscales the
    gradients the step uses. When the true gradients hold inf or NaN (an fp16 overflow: the scale is too high)
    there is no perturbation to compute: they are left as they are, without the second pass, for GradScaler to
    find and skip the step. (This check waits for the device; GradScaler's step waits for it anyway.)
    """
    params = [p for p in model.parameters() if p.grad is not None]
    weights = [p.detach().clone() for p in params]
    statistics = [b for m in model.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]
    saved = [b.detach().clone() for b in statistics]
    with torch.no_grad():
        grads = [p.grad if loss_scale is None else p.grad / loss_scale for p in params]
        scaled = [g * p.abs() if adaptive else g for p, g in zip(params, grads, strict=True)]  # T g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in scaled]))
        if loss_scale is not None and not bool(torch.isfinite(norm)):
            return
        scale = rho / (norm + 1e-12)
        for p, t in zip(params, scaled, strict=True):
            p.add_((t * p.abs() if adaptive else t) * scale)
            p.grad = None
    recompute()
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
        for b, kept in zip(statistics, saved, strict=True):
            b.copy_(kept)


# ---- the loss on the labels ---------------------------------------------------------------------------------


def face_losses(loss: str, logits: torch.Tensor, targets: torch.Tensor, class_weight: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Each face's loss, (B,), for labels (B,) or target distributions (B, C) (FER+ votes, mixed batches):
    `loss` is 'cross_entropy' (torch's, with its class weights and label smoothing) or 'squared_hinge'."""
    if loss == "squared_hinge":
        return squared_hinge(logits, targets, class_weight, label_smoothing)
    if loss != "cross_entropy":
        raise ValueError(f"unknown loss {loss!r}")
    return F.cross_entropy(logits, targets, weight=class_weight, label_smoothing=label_smoothing, reduction="none")


def squared_hinge(logits: torch.Tensor, targets: torch.Tensor, class_weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """One-vs-rest L2-SVM loss per face (Tang 2013, 'Deep Learning using Linear Support Vector Machines', the
    FER2013 challenge's winning entry): sum_c max(0, 1 - t_c s_c)^2 over the logits s, t_c = +1 for the face's
    class k and -1 for the others; the weight decay on the last layer is the SVM's margin term.

    For a target distribution y (FER+ votes, mixed batches; label smoothing makes (1 - eps) y + eps / C of it, as
    cross-entropy's) it is the expectation over the face's class k ~ y, and class weights weight each class k's
    term by w_k, as cross-entropy's -sum_k w_k y_k log p_k does:
        sum_k w_k y_k [max(0, 1 - s_k)^2 + sum_{c != k} max(0, 1 + s_c)^2]
      = sum_c [v_c max(0, 1 - s_c)^2 + (V - v_c) max(0, 1 + s_c)^2],  v = w * y, V = sum_c v_c.
    For a label without weights that is the loss of the label. Computed in fp32 (bf16 logits square poorly)."""
    num_classes = logits.shape[1]
    y = as_distribution(targets, num_classes).float()
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / num_classes
    v = y if class_weight is None else y * class_weight.float()
    s = logits.float()
    return (v * F.relu(1 - s).square() + (v.sum(dim=1, keepdim=True) - v) * F.relu(1 + s).square()).sum(dim=1)


# ---- mixup / CutMix -----------------------------------------------------------------------------------------


def mixes(cfg: TrainConfig) -> bool:
    """Whether the run mixes batches at all; when it does not, training is exactly the run without the levers."""
    return cfg.mix_prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)


def as_distribution(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) class indices as one-hot rows; (B, C) distributions (FER+ votes) as they are."""
    return F.one_hot(targets, num_classes).float() if targets.dim() == 1 else targets


def mix_batch(x: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, cfg: TrainConfig,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on one batch, as timm's Mixup does it.

    x: (B, 1, H, W) images; targets and teacher: (B, C) distributions (`as_distribution`), the teacher's may be
    None. With probability `cfg.mix_prob` the batch is mixed with a permutation of itself: mixup blends whole
    images, x*lam + x[perm]*(1-lam), lam ~ Beta(mixup_alpha, mixup_alpha); CutMix pastes a box of the permuted
    images whose area is about 1 - lam, lam ~ Beta(cutmix_alpha, cutmix_alpha), and lam becomes the fraction of
    each image left (the box clipped at the border). Both on: one of the two per batch, 50/50. The targets and
    the teacher's probabilities are mixed with the same permutation and lam (the trainer passes the teacher's
    distributions tempered, the targets of its distillation term, so that their mix is a mix of targets).

    Every random number comes from `gen`, the run's generator (one draw per batch, mixed or not), so a seeded
    run and its resume mix alike, and processes drawing the same batch mix it alike. Returns the images, targets,
    teacher probabilities and lam (1.0 for a batch left as it is)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, (), generator=gen)))
    if rng.random() >= cfg.mix_prob:
        return x, targets, teacher, 1.0
    cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cfg.cutmix_alpha if cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    if cutmix:
        h, w = x.shape[-2:]
        side = math.sqrt(1 - lam)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - int(h * side) // 2, 0), min(cy + int(h * side) // 2, h)
        x0, x1 = max(cx - int(w * side) // 2, 0), min(cx + int(w * side) // 2, w)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x[perm, ..., y0:y1, x0:x1]  # only the box of the permuted images
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        mixed = x * lam + x[perm] * (1 - lam)

    def blend(t: torch.Tensor) -> torch.Tensor:
        return t * lam + t[perm] * (1 - lam)

    return mixed, blend(targets), None if teacher is None else blend(teacher), lam
