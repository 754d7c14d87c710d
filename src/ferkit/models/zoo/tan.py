"""Tan, Bruni, Yang & Zheng's FER2013 study: an MLP baseline and a ladder of Keras CNNs, each rung one
change on the previous one (depth + batch norm, dropout, more dropout, swish, a PCA input stage).

The write-up gives the default CNN exactly (48,48 -> pool -> 96,96 -> pool -> dense 768) and describes the
later rungs by their change; the layer counts and rates it does not give are ferkit's choice, stated in each
builder and overridable with keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferkit.models.registry import register_model

SOURCE = "Tan, Bruni, Yang & Zheng, FER2013 project: MLP and Keras CNN ladder"

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


class TanMLP(nn.Module):
    """Flatten -> dense `hidden` (ReLU) -> dense classes."""

    def __init__(self, num_classes: int = 7, input_size: int = 48, hidden: int = 300) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(input_size * input_size, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TanCNN(nn.Module):
    """Stages of 3x3 'same' convs [-> BN] -> activation, each stage closed by 2x2 max pool [-> dropout];
    flatten -> dense `hidden` -> activation [-> dropout] -> dense classes.

    stages: filters of each conv, grouped by stage. batch_norm: BN after every conv. stage_dropout /
    dense_dropout: dropout rate after each pooling / after the hidden dense layer (0 = none).
    """

    def __init__(self, stages: Sequence[Sequence[int]] = ((48, 48), (96, 96)), num_classes: int = 7,
                 input_size: int = 48, hidden: int = 768, batch_norm: bool = False, activation: str = "relu",
                 stage_dropout: float = 0.0, dense_dropout: float = 0.0, in_chans: int = 1) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        c, side = in_chans, input_size
        for stage in stages:
            for w in stage:
                layers.append(nn.Conv2d(c, w, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(act(inplace=True))
                c = w
            layers.append(nn.MaxPool2d(2))
            if stage_dropout:
                layers.append(nn.Dropout(stage_dropout))
            side //= 2
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c * side * side, hidden), act(inplace=True)]
        if dense_dropout:
            head.append(nn.Dropout(dense_dropout))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TanPCACNN(TanCNN):
    """A TanCNN preceded by a PCA stage fitted on the training faces: each image is projected onto the top-k
    principal components and reconstructed, x -> mean + (x - mean) V_k^T V_k, k being the smallest count that
    keeps `variance` of the training variance.

    Buffers (fixed shapes, so a fresh model loads any fitted state dict): `pca_mean` (D,),
    `pca_components` (D, D), all fitted components as rows, zero rows past the fitted rank, and `pca_k`
    (an int64 scalar; 0 = not fitted yet, in which case the stage passes images through unchanged).
    """

    def __init__(self, *args, input_size: int = 48, variance: float = 0.98, max_rows: int = 10_000,
                 seed: int = 0, **kwargs) -> None:
        super().__init__(*args, input_size=input_size, **kwargs)
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1], got {variance}")
        d = input_size * input_size
        self.variance, self.max_rows, self.seed = variance, max_rows, seed
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_components", torch.zeros(d, d))
        self.register_buffer("pca_k", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def fit_preprocessing(self, x: torch.Tensor) -> int:
        """Fit the PCA stage on training faces (N, 1, S, S); returns the number of components kept.

        Uses at most `max_rows` randomly chosen faces (seeded) for the SVD; the mean uses all of them.
        """
        d = self.pca_mean.numel()
        flat = x.reshape(len(x), -1).to(self.pca_mean.device, torch.float32)
        if flat.shape[1] != d:
            raise ValueError(f"expected faces of {d} pixels, got {flat.shape[1]}")
        mean = flat.mean(0)
        if len(flat) > self.max_rows:
            gen = torch.Generator().manual_seed(self.seed)
            rows = torch.randperm(len(flat), generator=gen)[: self.max_rows]
            flat = flat[rows.to(flat.device)]
        _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        explained = s.double().square().cumsum(0)
        explained = explained / explained[-1].clamp_min(1e-30)
        k = min(int((explained < self.variance).sum()) + 1, len(s))
        self.pca_mean.copy_(mean)
        self.pca_components.zero_()
        self.pca_components[: len(vh)] = vh
        self.pca_k.fill_(k)
        return k

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Project images onto the kept components and reconstruct them (identity until fitted)."""
        k = int(self.pca_k)
        if k == 0:
            return x
        # Keep the projection in fp32 under mixed precision.
        with torch.autocast(x.device.type, enabled=False):
            v = self.pca_components[:k]
            z = (x.reshape(len(x), -1).float() - self.pca_mean) @ v.T
            rec = self.pca_mean + z @ v
        return rec.reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.project(x))


@register_model("tan_mlp", source=SOURCE, reported="test 25 %")
def tan_mlp(num_classes: int = 7, hidden: int = 300) -> nn.Module:
    """Baseline MLP: flattened 48x48 face -> 300 hidden units (ReLU) -> classes."""
    return TanMLP(num_classes, hidden=hidden)


# The ladder: each configuration is the previous one plus its change.
DEFAULT = dict(stages=((48, 48), (96, 96)), hidden=768)
IMPROVED = dict(stages=((48, 48), (96, 96), (192, 192)), hidden=768, batch_norm=True)
DROPOUT = IMPROVED | dict(dense_dropout=0.4)
MORE_DROPOUT = DROPOUT | dict(stage_dropout=0.4)
SWISH = MORE_DROPOUT | dict(activation="silu")


@register_model("tan_default", source=SOURCE, reported="test 46.3 %")
def tan_default(num_classes: int = 7, **kwargs) -> nn.Module:
    """Default Keras CNN: conv 48, 48 -> max pool -> conv 96, 96 -> max pool -> dense 768 -> classes
    (3x3 'same' convs, ReLU, no batch norm, no dropout)."""
    return TanCNN(num_classes=num_classes, **(DEFAULT | kwargs))


@register_model("tan_improved", source=SOURCE, reported="test 51.3 %")
def tan_improved(num_classes: int = 7, **kwargs) -> nn.Module:
    """Improved CNN: deeper, with batch norm. ferkit's reading of "deeper": a third stage of two 192-filter
    convs (48,48 / 96,96 / 192,192, each stage max pooled), BN after every conv, dense 768."""
    return TanCNN(num_classes=num_classes, **(IMPROVED | kwargs))


@register_model("tan_dropout", source=SOURCE, reported="test 53.9 % (20 epochs), 56.8 % (50 epochs)")
def tan_dropout(num_classes: int = 7, **kwargs) -> nn.Module:
    """`tan_improved` + dropout 0.4 after the hidden dense layer."""
    return TanCNN(num_classes=num_classes, **(DROPOUT | kwargs))


@register_model("tan_more_dropout", source=SOURCE, reported="test 58.1 %")
def tan_more_dropout(num_classes: int = 7, **kwargs) -> nn.Module:
    """`tan_dropout` with more dropout layers: ferkit puts dropout 0.4 after every pooling stage as well."""
    return TanCNN(num_classes=num_classes, **(MORE_DROPOUT | kwargs))


@register_model("tan_swish", source=SOURCE, reported="test 53.7 %")
def tan_swish(num_classes: int = 7, **kwargs) -> nn.Module:
    """`tan_more_dropout` with swish (SiLU, x * sigmoid(x)) instead of ReLU everywhere."""
    return TanCNN(num_classes=num_classes, **(SWISH | kwargs))


@register_model("tan_pca", source=SOURCE, reported="test 57 % (90 epochs)")
def tan_pca(num_classes: int = 7, variance: float = 0.98, max_rows: int = 10_000, **kwargs) -> nn.Module:
    """`tan_more_dropout` behind a PCA input stage keeping 98 % of the training variance.

    The trainer calls `fit_preprocessing` once on the normalized training faces; the fitted mean and
    components are buffers, so checkpoints and weights files carry them.
    """
    return TanPCACNN(num_classes=num_classes, variance=variance, max_rows=max_rows, **(MORE_DROPOUT | kwargs))
