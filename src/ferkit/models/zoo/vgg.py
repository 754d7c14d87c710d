"""VGG-style networks: stages of (3x3 conv, BN, ReLU) x k followed by 2x2 max pooling, then an MLP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferkit.models.registry import register_model


class VGGNet(nn.Module):
    """Stages of `convs_per_stage` conv-BN-ReLU blocks + max pool; flatten; hidden FC layers; classifier.

    The head flattens the last feature map (no global pooling): FER2013 faces are roughly aligned,
    so *where* a feature fires (mouth vs brow) carries information that global pooling would discard.
    """

    def __init__(self, widths: Sequence[int], num_classes: int = 7, input_size: int = 48,
                 convs_per_stage: int = 2, hidden: Sequence[int] = (4096, 4096), dropout: float = 0.2,
                 in_chans: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = input_size
        for _ in widths:
            side //= 2
        head: list[nn.Module] = [nn.Flatten()]
        f = c * side * side
        for h in hidden:
            head += [nn.Dropout(dropout), nn.Linear(f, h), nn.ReLU(inplace=True)]
            f = h
        head += [nn.Dropout(dropout), nn.Linear(f, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(
    "khaireddin_vgg",
    source="Khaireddin & Chen 2021, 'Facial Emotion Recognition: State of the Art Performance on FER2013' "
           "(arXiv:2105.03588), code usef-kh/fer",
    reported="test 73.28 % (PublicTest, ten-crop TTA)",
    input_size=40,
)
def khaireddin_vgg(num_classes: int = 7, dropout: float = 0.2) -> nn.Module:
    """VGG variant: 4 stages of two 3x3 conv+BN+ReLU (64/128/256/512) + max pool, FC 4096-4096.

    Trained on 40x40 crops of the 48x48 faces (ten-crop at test time), so the input side is 40.
    """
    return VGGNet((64, 128, 256, 512), num_classes, input_size=40, hidden=(4096, 4096), dropout=dropout)


@register_model(
    "ferkit_vgg_s",
    source="ferkit: Khaireddin-style VGG at half width with a 512-unit head, sized to train on a 2-core CPU",
    reported="(ferkit's own; see weights manifest)",
)
def ferkit_vgg_s(num_classes: int = 7, dropout: float = 0.4, width: float = 1.0, depth: int = 2) -> nn.Module:
    """Half-width Khaireddin VGG (32/64/128/256) on full 48x48 faces with a 512-unit head; ~2.4 M params.

    width, depth (model_kwargs, for the width/depth lever): the stages' channels times `width` (1.5: 48/96/192/384,
    about 2.2x the compute), and `depth` conv blocks per stage (3: 1.7x the compute, 1: 0.3x)."""
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0.25 <= width <= 4:
        raise ValueError(f"ferkit_vgg_s: width must be a number in [0.25, 4] (1 = 32/64/128/256 channels), "
                         f"got {width!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 6:
        raise ValueError(f"ferkit_vgg_s: depth must be a whole number of conv blocks per stage in 1..6, got {depth!r}")
    widths = tuple(max(1, round(c * width)) for c in (32, 64, 128, 256))
    return VGGNet(widths, num_classes, input_size=48, convs_per_stage=depth, hidden=(512,), dropout=dropout)
