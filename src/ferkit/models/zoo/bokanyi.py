"""Bokányi & Mészégető's FER2013 project: a shallow and a deep BN/dropout CNN, and their rebuild of
Agrawal & Mittal's (2020) pooling-free, dense-free network of 8x8 convolutions.

The project's write-up names the ingredients (batch norm, dropout 0.3, max pooling, the number of conv
and FC layers) but not every filter count; where it is silent, ferkit's choice is stated in the builder's
docstring and can be overridden with keyword arguments (`widths=`, `hidden=`, `dropout=`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferkit.models.registry import register_model

BOKANYI_SOURCE = "Bokányi & Mészégető, FER2013 facial-expression-recognition project (shallow and deep CNN)"


class BokanyiCNN(nn.Module):
    """Conv units [3x3 conv (same) -> BN -> ReLU -> 2x2 max pool -> dropout], flatten, hidden FC units
    [linear -> BN -> ReLU -> dropout], then a linear classifier.

    `widths` gives one conv unit per entry (each halves the map); `hidden` gives the hidden FC widths,
    not counting the output layer.
    """

    def __init__(self, widths: Sequence[int], hidden: Sequence[int], num_classes: int = 7,
                 input_size: int = 48, dropout: float = 0.3, kernel_size: int = 3, in_chans: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, side = in_chans, input_size
        for w in widths:
            layers += [nn.Conv2d(c, w, kernel_size, padding="same", bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(dropout)]
            c, side = w, side // 2
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        f = c * side * side
        for h in hidden:
            head += [nn.Linear(f, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                     nn.Dropout(dropout)]
            f = h
        head.append(nn.Linear(f, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("bokanyi_shallow", source=BOKANYI_SOURCE, reported="test 60.6 %")
def bokanyi_shallow(num_classes: int = 7, widths: Sequence[int] = (32, 64), hidden: Sequence[int] = (256,),
                    dropout: float = 0.3) -> nn.Module:
    """Shallow CNN: 2 conv units + 1 FC layer, with batch norm, dropout 0.3 and max pooling.

    Filter counts are ferkit's choice (not given in the write-up): 32 and 64 3x3 filters, one hidden FC
    layer of 256 units ("FC" counted without the softmax output layer); 48 -> 12 before the head;
    ~2.4 M params.
    """
    return BokanyiCNN(widths, hidden, num_classes, dropout=dropout)


@register_model("bokanyi_deep", source=BOKANYI_SOURCE, reported="test 66.5 %")
def bokanyi_deep(num_classes: int = 7, widths: Sequence[int] = (32, 64, 128, 256),
                 hidden: Sequence[int] = (256, 256), dropout: float = 0.3) -> nn.Module:
    """Deep CNN: 4 conv units + 2 FC layers, same ingredients as `bokanyi_shallow`.

    Filter counts are ferkit's choice: 32/64/128/256 3x3 filters (48 -> 3 before the head), two hidden FC
    layers of 256 units, then the output layer.
    """
    return BokanyiCNN(widths, hidden, num_classes, dropout=dropout)


class StridedConvNet(nn.Module):
    """All-convolutional network: (conv -> BN -> ReLU) units whose strides do the downsampling (no pooling),
    closed by one conv whose kernel covers the whole remaining map, so it acts as the classifier (no FC).

    `layers` is a sequence of (out_channels, stride, padding); padding is an int or "same" (stride 1 only).
    """

    def __init__(self, layers: Sequence[tuple[int, int, int | str]], num_classes: int = 7,
                 input_size: int = 64, kernel_size: int = 8, in_chans: int = 1) -> None:
        super().__init__()
        units: list[nn.Module] = []
        c, side = in_chans, input_size
        for w, stride, pad in layers:
            if pad == "same":  # TF-style: an even kernel pads one pixel more on the right/bottom
                if stride != 1:
                    raise ValueError("'same' padding is only supported for stride 1")
                lo, hi = (kernel_size - 1) // 2, kernel_size // 2
                units.append(nn.ZeroPad2d((lo, hi, lo, hi)))
                pad = 0
            else:
                side = (side + 2 * pad - kernel_size) // stride + 1
            units += [nn.Conv2d(c, w, kernel_size, stride=stride, padding=pad, bias=False), nn.BatchNorm2d(w),
                      nn.ReLU(inplace=True)]
            c = w
        if side < 1:
            raise ValueError(f"input {input_size} shrinks to nothing through these {len(layers)} convs")
        self.features = nn.Sequential(*units)
        self.final_kernel = side  # 7 for the Agrawal & Mittal layout at 64x64
        self.classifier = nn.Sequential(nn.Conv2d(c, num_classes, side), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def agrawal_mittal_layers(channels: Sequence[int] = (32,) * 6 + (16,) * 6 + (8,) * 3
                          ) -> list[tuple[int, int, int | str]]:
    """(channels, stride, padding) per conv: stride 2 (padding 3, TF-'same') at the first conv of each width
    group, 'same' elsewhere, and padding 3 at the very last conv, which therefore trims one pixel."""
    layers: list[tuple[int, int, int | str]] = []
    for i, w in enumerate(channels):
        first_of_group = i == 0 or channels[i - 1] != w
        if first_of_group:
            layers.append((w, 2, 3))
        elif i == len(channels) - 1:
            layers.append((w, 1, 3))
        else:
            layers.append((w, 1, "same"))
    return layers


@register_model(
    "agrawal_mittal",
    source="Agrawal & Mittal 2020, 'Using CNN for facial expression recognition: a study of the effects of "
           "kernel size and number of filters on accuracy', The Visual Computer 36; as rebuilt by Bokányi & "
           "Mészégető",
    reported="test 63.36 %",
    input_size=64,
)
def agrawal_mittal(num_classes: int = 7) -> nn.Module:
    """Agrawal & Mittal's network: 64x64 input, 8x8 kernels everywhere, no pooling, no dense layer.

    15 conv -> BN -> ReLU units with 32,32,32,32,32,32,16,16,16,16,16,16,8,8,8 filters, then a 7x7 conv to
    the classes. The paper gives the filters and kernels; the strides and padding are ferkit's choice so the
    map reaches exactly 7x7: stride 2 with padding 3 at the first conv of each width group
    (64 -> 32 -> 16 -> 8), 'same' padding for the stride-1 convs, and padding 3 on the last of the 15
    (8 -> 7); the final 7x7 'valid' conv then gives 1x1 x num_classes logits.
    """
    return StridedConvNet(agrawal_mittal_layers(), num_classes, input_size=64, kernel_size=8)
