"""A timm-style model registry: `@register_model` on a builder, then `create_model(name)`.

Each entry carries where the architecture comes from and what accuracy was published for it, so
`ferkit models` can print a table a reader can check against the papers.
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


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    import fnmatch

    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; `ferkit models` lists the {len(_REGISTRY)} available") from None


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model. Input: (B, 1, S, S) float in [0,1]-ish normalized units; output logits (B, C)."""
    spec = get_spec(name)
    model = spec.builder(num_classes=num_classes or spec.default_classes, **kwargs)
    model.ferkit_name = name  # type: ignore[attr-defined]
    model.input_size = spec.input_size  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: int = 48) -> int:
    """Multiply-accumulates x2 of one forward pass on one image, via torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, input_size, input_size))
    model.train(was_training)
    return int(counter.get_total_flops())
