"""Fine-tuning options: which parameters train (`freeze=`) and at what rate (`backbone_lr_scale=`).

freeze: comma-separated parts of the model kept as they are: `stem` (the first convolution and the norm after it,
    or a module called `stem`), `backbone` (everything but the head), `head`, or any prefix of parameter names
    (`blocks.0`, `layer1`, `conv_stem`; `ferkit models` builds a model, and `model.named_parameters()` lists them).
    Frozen parameters get no gradient and are left out of the optimizer. Their BatchNorm running statistics still
    adapt to the faces in training mode (as torchvision's and timm's fine-tuning recipes do without FrozenBN).
backbone_lr_scale: the backbone's learning rate as a fraction of `lr` (discriminative learning rates: e.g. 0.1
    with a new head at lr); 1 = one rate for all; 0 = the backbone frozen. Schedules scale both rates alike.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ferkit.models.pretrained import head_tensor_names

GROUPS = ("stem", "backbone", "head")


def stem_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the model's stem: a module called `stem`, else timm's first_conv, else the first Conv2d;
    plus the normalization layer that follows that convolution."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(getattr(model, "stem", None), nn.Module):
        return [n for n in names if n.startswith("stem.")]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    modules = list(model.named_modules())
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if not first:
        first = next((m for m, mod in modules if isinstance(mod, nn.Conv2d)), None)
    if first is None:
        return []
    order = [m for m, _ in modules]
    if first not in order:
        return []
    chosen = {first}
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    for m in order[order.index(first) + 1:order.index(first) + 4]:  # the norm right after it, if any
        if isinstance(dict(modules)[m], norms):
            chosen.add(m)
            break
    return [n for n in names if n.rpartition(".")[0] in chosen]


def parameter_groups(model: nn.Module, freeze: str = "", backbone_lr_scale: float = 1.0,
                     lr: float = 0.01) -> list[Any]:
    """Set requires_grad by `freeze` and return what the optimizer takes: the parameters in one list when
    everything trains at one rate (as before these options), else param groups, the head's first (at `lr`: the
    rate that metrics.csv logs), then the backbone's at `lr * backbone_lr_scale`. ValueError naming a part of
    `freeze` that matches no parameter, or a setting that leaves nothing to train."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if not (math.isfinite(backbone_lr_scale) and backbone_lr_scale >= 0):
        raise ValueError(f"backbone_lr_scale must be a number >= 0 (0 freezes the backbone), got {backbone_lr_scale}")
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    head = set(head_tensor_names(model)) & set(names)
    frozen: set[str] = set()
    for part in [p.strip() for p in freeze.split(",") if p.strip()]:
        if part == "head":
            matched = head
        elif part == "backbone":
            matched = set(names) - head
        elif part == "stem":
            matched = set(stem_parameter_names(model))
        else:
            matched = {n for n in names if n == part or n.startswith(part + ".")}
        if not matched:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"freeze={freeze}: {part!r} names no parameter of "
                             f"{getattr(model, 'ferkit_name', 'the model')} (use {', '.join(GROUPS)} or a prefix "
                             f"such as {', '.join(tops[:6])})")
        frozen |= matched
    if backbone_lr_scale == 0:
        frozen |= set(names) - head
    if frozen >= set(names):
        raise ValueError(f"freeze={freeze!r} backbone_lr_scale={backbone_lr_scale:g} leave no parameter to train")
    for n, p in named:
        p.requires_grad_(n not in frozen)
    if not frozen and backbone_lr_scale == 1:
        return [p for _, p in named]
    head_params = [p for n, p in named if n in head and n not in frozen]
    body_params = [p for n, p in named if n not in head and n not in frozen]
    groups = []
    if head_params:
        groups.append({"params": head_params, "lr": lr})
    if body_params:
        groups.append({"params": body_params, "lr": lr * backbone_lr_scale})
    return groups
