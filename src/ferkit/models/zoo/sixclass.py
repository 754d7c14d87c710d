"""A six-class FER2013 project (disgust dropped: it has too few faces to learn): two small
TensorFlow-tutorial-style CNNs of 5x5 convolutions, max pooling and a 128-unit dense layer.

Registered with default_classes=6; train them with the fer6 label set (`--label-set fer6`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferkit.models.registry import register_model

SOURCE = "Six-class FER2013 project (angry, fear, happy, sad, surprise, neutral; disgust dropped)"


class SmallCNN(nn.Module):
    """Units of [k x k 'same' conv -> ReLU -> 2x2 max pool]; flatten; dense `hidden` (ReLU) [-> dropout];
    dense classes."""

    def __init__(self, widths: Sequence[int], num_classes: int = 6, input_size: int = 48,
                 kernel_size: int = 5, hidden: int = 128, dropout: float = 0.0, in_chans: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, side = in_chans, input_size
        for w in widths:
            layers += [nn.Conv2d(c, w, kernel_size, padding="same"), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c, side = w, side // 2
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(inplace=True)]
        if dropout:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("sixclass_cnn4", source=SOURCE, reported="test ~62 % (6 classes)", default_classes=6)
def sixclass_cnn4(num_classes: int = 6, hidden: int = 128) -> nn.Module:
    """CNN 4: conv 5x5 x16 + 2x2 max pool, conv 5x5 x36 + 2x2 max pool, FC 128, FC classes; no dropout
    (48 -> 12 before the head; ~0.68 M params)."""
    return SmallCNN((16, 36), num_classes, hidden=hidden)


@register_model("sixclass_cnn5", source=SOURCE, reported="test 63.6 % (6 classes)", default_classes=6)
def sixclass_cnn5(num_classes: int = 6, hidden: int = 128, dropout: float = 0.3) -> nn.Module:
    """CNN 5: three conv 5x5 units of 32/64/64 filters, each with 2x2 max pooling (48 -> 6), FC 128,
    30 % dropout, FC classes."""
    return SmallCNN((32, 64, 64), num_classes, hidden=hidden, dropout=dropout)
