"""F-Riv's six Keras CNN variants for FER2013: one base design, five single changes to it.

Base (model 1): three blocks of [3x3 conv, ReLU, BN, 3x3 conv, ReLU, 2x2 max pool, dropout 0.25] with
32/64/128 filters, then flatten, dense 256 (ReLU), dropout 0.5, dense to the classes. Models 2-6 change one
thing each (average pooling, double filters, 5x5 kernels, a fourth block, 'valid' padding); see the builders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferkit.models.registry import register_model

SOURCE = "F-Riv, FER2013 CNN experiments: six Keras CNN variants (GitHub project)"


class FRivasCNN(nn.Module):
    """Blocks of [conv k x k, ReLU, BN, conv k x k, ReLU, 2x2 pool, dropout]; flatten; dense; dropout; dense.

    widths: filters per block. pools: "max" or "avg" per block. valid_second: the second conv of each
    block uses 'valid' padding (shrinks the map by k-1), the first keeps 'same'.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), num_classes: int = 7, input_size: int = 48,
                 kernel_size: int = 3, pools: Sequence[str] = ("max", "avg", "avg"),
                 valid_second: bool = False, hidden: int = 256, block_dropout: float = 0.25,
                 head_dropout: float = 0.5, in_chans: int = 1) -> None:
        super().__init__()
        if len(pools) != len(widths):
            raise ValueError(f"need one pool kind per block: {len(widths)} widths, {len(pools)} pools")
        pool_types = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
        layers: list[nn.Module] = []
        c, side = in_chans, input_size
        for w, pool in zip(widths, pools, strict=True):
            second_pad = "valid" if valid_second else "same"
            layers += [nn.Conv2d(c, w, kernel_size, padding="same"), nn.ReLU(inplace=True), nn.BatchNorm2d(w),
                       nn.Conv2d(w, w, kernel_size, padding=second_pad), nn.ReLU(inplace=True),
                       pool_types[pool](2), nn.Dropout(block_dropout)]
            if valid_second:
                side -= kernel_size - 1
            c, side = w, side // 2
        if side < 1:
            raise ValueError(f"input {input_size} is too small for {len(widths)} blocks")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, hidden),
                                        nn.ReLU(inplace=True), nn.Dropout(head_dropout),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# Model 2 is the reference the later variants are described against.
MODEL2 = dict(widths=(32, 64, 128), kernel_size=3, pools=("max", "avg", "avg"), valid_second=False)


def _frivas(num_classes: int, changes: dict, kwargs: dict) -> nn.Module:
    return FRivasCNN(num_classes=num_classes, **(MODEL2 | changes | kwargs))


@register_model("frivas_cnn1", source=SOURCE, reported="val 63.5 %")
def frivas_cnn1(num_classes: int = 7, **kwargs) -> nn.Module:
    """Model 1: the base design, max pooling in all three blocks (32/64/128 filters)."""
    return _frivas(num_classes, dict(pools=("max", "max", "max")), kwargs)


@register_model("frivas_cnn2", source=SOURCE, reported="val 65.1 %")
def frivas_cnn2(num_classes: int = 7, **kwargs) -> nn.Module:
    """Model 2: model 1 with average instead of max pooling in blocks 2 and 3."""
    return _frivas(num_classes, {}, kwargs)


@register_model("frivas_cnn3", source=SOURCE, reported="val 65.5 %, test 67 %")
def frivas_cnn3(num_classes: int = 7, **kwargs) -> nn.Module:
    """Model 3: model 2 with every filter count doubled (64/128/256)."""
    return _frivas(num_classes, dict(widths=(64, 128, 256)), kwargs)


@register_model("frivas_cnn4", source=SOURCE, reported="val 64.8 %")
def frivas_cnn4(num_classes: int = 7, **kwargs) -> nn.Module:
    """Model 4: model 2 with 5x5 kernels in every conv."""
    return _frivas(num_classes, dict(kernel_size=5), kwargs)


@register_model("frivas_cnn5", source=SOURCE, reported="val 65.2 %")
def frivas_cnn5(num_classes: int = 7, **kwargs) -> nn.Module:
    """Model 5: model 2 plus a fourth block of 256 filters (average pooling), 48 -> 3 before the head."""
    return _frivas(num_classes, dict(widths=(32, 64, 128, 256), pools=("max", "avg", "avg", "avg")), kwargs)


@register_model("frivas_cnn6", source=SOURCE, reported="val 65.1 %, test 66 %")
def frivas_cnn6(num_classes: int = 7, **kwargs) -> nn.Module:
    """Model 6: model 2 with 'valid' padding in half the convs (the second of each block):
    48 -> 46 -> 23 -> 21 -> 10 -> 8 -> 4 before the head."""
    return _frivas(num_classes, dict(valid_second=True), kwargs)
