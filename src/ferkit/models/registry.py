"""A timm-style model registry: `@register_model` on a builder, then `create_model(name)`.

Each entry carries where the architecture comes from and what accuracy was published for it, so
`ferkit models` can print a table a reader can check against the papers.

Names `timm:ARCH` are timm's architectures (the `timm` extra), built offline for grayscale faces by
`ferkit.models.timm_bridge`; `list_models("timm:*")` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    builder: Callable[..., nn.Module]
    source: str  # citation: who published it, where
    reported: str  # the accuracy they published, as text ("test 66.5 %")
    input_size: int = 48  # side of the square grayscale input the model expects
    default_classes: int = 7


_REGISTRY: dict[str, ModelSpec] = {}
TIMM_PREFIX = "timm:"


def register_model(name: str, *, source: str, reported: str, input_size: int = 48,
                   default_classes: int = 7) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder(num_classes, **kwargs) -> nn.Module` under `name`."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, source, reported, input_size, default_classes)
        return builder

    return wrap


def _ensure_loaded() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from ferkit.models import zoo  # noqa: F401


def list_models(pattern: str = "*", include_timm: bool | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern, sorted; with `include_timm` (by default: when the
    pattern starts with "timm:") also timm's architectures as timm:ARCH (needs the timm extra)."""
    import fnmatch

    _ensure_loaded()
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    if include_timm is None:
        include_timm = pattern.startswith(TIMM_PREFIX)
    if include_timm:
        from ferkit.models.timm_bridge import timm_model_names

        arch_pattern = pattern.removeprefix(TIMM_PREFIX) if pattern.startswith(TIMM_PREFIX) else pattern
        names += [TIMM_PREFIX + n for n in timm_model_names(arch_pattern)]
    return names


def get_spec(name: str) -> ModelSpec:
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; `ferkit models` lists the {len(_REGISTRY)} available "
                         "(and timm:NAME any timm architecture, with the timm extra)") from None


def _timm_spec(name: str) -> ModelSpec:
    """The spec of timm:ARCH (ValueError for an architecture timm lacks, ImportError without timm)."""
    from functools import partial

    from ferkit.models.timm_bridge import DEFAULT_INPUT_SIZE, check_timm_name, create_timm_model, timm_source

    arch = name.removeprefix(TIMM_PREFIX)
    check_timm_name(arch)
    return ModelSpec(name, partial(create_timm_model, arch), timm_source(arch),
                     "(no published FER2013 result; ferkit baseline)", DEFAULT_INPUT_SIZE)


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model. Input: (B, 1, S, S) float in [0,1]-ish normalized units; output logits (B, C).

    A builder that takes an `input_size` keyword is built for that side, and the model's `input_size` (what the
    faces are resized to) follows it."""
    spec = get_spec(name)
    model = spec.builder(num_classes=num_classes or spec.default_classes, **kwargs)
    model.ferkit_name = name  # type: ignore[attr-defined]
    model.input_size = int(getattr(model, "ferkit_input_size", kwargs.get("input_size", spec.input_size)))  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: int = 48) -> int:
    """Multiply-accumulates x2 of one forward pass on one image, via torch's FLOP counter. A model on the meta
    device is counted without memory or compute (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, input_size, input_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())
