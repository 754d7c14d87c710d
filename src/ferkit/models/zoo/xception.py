"""mini-Xception (Arriaga, Valdenegro-Toro & Plöger 2017), the emotion model behind the `fer` package.

Stem: two 3x3 'valid' conv (8 filters) -> BN -> ReLU. Then four residual modules of 16/32/64/128 channels,
each: [depthwise-separable 3x3 -> BN -> ReLU -> depthwise-separable 3x3 -> BN -> 3x3 stride-2 max pool]
added to a [1x1 stride-2 conv -> BN] shortcut. Finally a 3x3 conv to the classes and global average
pooling (no dense layer); ~58 k params. The original runs at 64x64 (the `fer` package's weights);
ferkit feeds it the native 48x48 faces: 48 -> 44 (stem) -> 22 -> 11 -> 6 -> 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferkit.models.registry import register_model


class SeparableConv2d(nn.Sequential):
    """Keras SeparableConv2D: per-channel (depthwise) k x k conv, then 1x1 pointwise conv; no bias."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        super().__init__(nn.Conv2d(cin, cin, kernel_size, padding=kernel_size // 2, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False))


class StridedPointwiseConv(nn.Conv2d):
    """nn.Conv2d(cin, cout, 1, stride=s) computed as a 1x1 conv of the input sampled every s pixels.

    The same function, parameters and state-dict keys, but not the same kernel: PyTorch 2.13's CPU build
    (oneDNN 3.12) corrupts the heap in the backward pass of a strided 1x1 conv on channels_last inputs on
    AVX-512 CPUs for some shapes (mini-Xception's first shortcut, 8 -> 16 channels at 44x44, with a batch of
    37, the last batch of a FER2013 epoch at batch size 64: 'double free or corruption', fp32 and bf16 alike).
    The crash is in the backward pass only, so without autograd (inference, ONNX export) the native strided conv
    runs: one op instead of a slice and a conv (in an ONNX export the slices cost ~10 % of mini-Xception's time).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)


class XceptionModule(nn.Module):
    """Residual module: two separable convs + stride-2 max pool, plus a strided 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(StridedPointwiseConv(cin, cout, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(cout))
        self.body = nn.Sequential(
            SeparableConv2d(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            SeparableConv2d(cout, cout), nn.BatchNorm2d(cout),
            nn.MaxPool2d(3, stride=2, padding=1),  # Keras 'same' pooling: ceil(n / 2), like the shortcut
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.residual(x)


class MiniXception(nn.Module):
    """`stem`: channels of the two stem convs; `stem_stride`: stride of the second one (1 as published).

    Why the knobs: on CPUs with AVX-512, ONNX Runtime computes convolutions in 16-channel blocks, so the published
    8-channel stem costs as much as a 16-channel one (measured: same faces/s), and the 44x44 layers dominate the
    time; `stem_stride=2` runs the modules at 22x22 (2.2x the faces/s at the published widths, 1.4x with widths
    doubled; benchmarks/architecture_speed.py, docs/detection.md). The shipped `fast` model uses
    `stem=16, stem_stride=2, widths=(32, 64, 128, 256)`.
    """

    def __init__(self, num_classes: int = 7, widths: Sequence[int] = (16, 32, 64, 128), stem: int = 8,
                 in_chans: int = 1, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, stride=stem_stride, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
        )
        modules: list[nn.Module] = []
        c = stem
        for w in widths:
            modules.append(XceptionModule(c, w))
            c = w
        self.blocks = nn.Sequential(*modules)
        self.head = nn.Sequential(nn.Conv2d(c, num_classes, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(
    "mini_xception",
    source="Arriaga, Valdenegro-Toro & Plöger 2017, 'Real-time Convolutional Neural Networks for Emotion and "
           "Gender Classification' (arXiv:1710.07557); code oarriaga/face_classification, "
           "used by the `fer` package",
    reported="66 % (fer package / Arriaga et al. 2017)",
)
def mini_xception(num_classes: int = 7, **kwargs) -> nn.Module:
    """mini-Xception: 2-conv stem, 4 residual separable-conv modules (16/32/64/128), conv to classes + GAP."""
    return MiniXception(num_classes, **kwargs)
