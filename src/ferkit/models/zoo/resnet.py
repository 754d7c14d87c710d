"""ResNet-18/34 (He et al. 2016) adapted to 48x48 grayscale faces, CIFAR-style.

The ImageNet stem (7x7 stride-2 conv + 3x3 max pool) would cut a 48x48 face to 12x12 before the first
residual stage; here the stem is one 3x3 stride-1 conv, so the four stages (64/128/256/512 channels,
strides 1, 2, 2, 2) see 48 -> 48 -> 24 -> 12 -> 6, followed by global average pooling and a linear layer.
Self-contained (torchvision is not a dependency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferkit.models.registry import register_model

SOURCE = ("He, Zhang, Ren & Sun 2016, 'Deep Residual Learning for Image Recognition' (CVPR); "
          "48x48 CIFAR-style stem")
REPORTED = "(ferkit baseline; He et al. 2016 architecture)"


def conv_bn(cin: int, cout: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut; ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem -> stages of BasicBlocks (first block of a stage carries its stride) -> GAP -> linear."""

    def __init__(self, depths: Sequence[int], num_classes: int = 7,
                 widths: Sequence[int] = (64, 128, 256, 512), strides: Sequence[int] = (1, 2, 2, 2),
                 in_chans: int = 1, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_chans, widths[0], 3), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c = widths[0]
        for depth, w, s in zip(depths, widths, strides, strict=True):
            blocks = [BasicBlock(c if i == 0 else w, w, s if i == 0 else 1) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("resnet18", source=SOURCE, reported=REPORTED)
def resnet18(num_classes: int = 7, **kwargs) -> nn.Module:
    """ResNet-18: BasicBlocks [2, 2, 2, 2]; ~11.2 M params."""
    return ResNet((2, 2, 2, 2), num_classes, **kwargs)


@register_model("resnet34", source=SOURCE, reported=REPORTED)
def resnet34(num_classes: int = 7, **kwargs) -> nn.Module:
    """ResNet-34: BasicBlocks [3, 4, 6, 3]; ~21.3 M params."""
    return ResNet((3, 4, 6, 3), num_classes, **kwargs)
