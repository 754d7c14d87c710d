"""Training levers (issue #24): weight averaging (EMA, SWA), SAM / ASAM, mixup / CutMix, the squared-hinge loss
and the CUDA RNG state in checkpoints: each against a hand computation, exact resume, their settings' checks, and
their composition with the other options (bf16, grad_clip, distillation, soft FER+ labels, class weights,
torchrun)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file
from test_training import small_config, without_timing
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

import ferkit.training.distill as distill
import ferkit.training.trainer as trainer
from ferkit.cli import app
from ferkit.data import load_dataset
from ferkit.data.augment import normalize, resize, to_float
from ferkit.models import create_model
from ferkit.models.predict import predict_proba
from ferkit.models.weights import load_model
from ferkit.training import TrainConfig, TrainingError, train
from ferkit.training.distributed import SINGLE, Dist
from ferkit.training.levers import (
    as_distribution,
    averaged_model,
    mix_batch,
    recompute_batchnorm,
    sam_gradient,
    squared_hinge,
    swa_averages,
)

BN_MODEL = "mini_xception"  # small, with BatchNorm (whose statistics EMA averages and SWA recomputes)
STEPS_PER_EPOCH = 5  # tiny_csv: 70 Training faces in batches of 16


def float_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def val_weights(run_dir: Path) -> list[str]:
    return [row["val_weights"] for row in trainer._read_metrics(run_dir / "metrics.csv")]


@pytest.fixture
def trajectory(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The trained model's state dict after every optimizer step of the next train() call."""
    states: list[dict[str, torch.Tensor]] = []
    built: list[torch.nn.Module] = []
    real_create = trainer.create_model

    def create(*args, **kwargs):
        built.append(real_create(*args, **kwargs))
        return built[-1]

    def record(optimizer, args, kwargs) -> None:
        states.append({k: v.detach().clone() for k, v in built[-1].state_dict().items()})

    monkeypatch.setattr(trainer, "create_model", create)
    handle = register_optimizer_step_post_hook(record)
    yield states
    handle.remove()


# ---- weight averaging -------------------------------------------------------------------------------------------


def test_ema_weights_are_the_moving_average_of_the_trajectory(tiny_csv: Path, tmp_path: Path,
                                                               trajectory: list[dict[str, torch.Tensor]]) -> None:
    decay = 0.8
    result = train(small_config(tiny_csv, tmp_path, model=BN_MODEL, epochs=3, lr=0.01, average="ema", ema_decay=decay))
    assert len(trajectory) == 3 * STEPS_PER_EPOCH
    ema = [float_tensors(trajectory[0])]  # the first update copies the weights
    for state in trajectory[1:]:
        ema.append({k: decay * v + (1 - decay) * state[k] for k, v in ema[-1].items()})
    last = load_file(str(result.run_dir / "last.safetensors"))
    assert any("running_mean" in k for k in ema[-1])  # BatchNorm statistics are averaged too
    for k, v in ema[-1].items():
        torch.testing.assert_close(last[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(last[k], v) for k, v in float_tensors(trajectory[-1]).items())  # not the raw ones
    best_epoch = result.best_epoch
    best = load_file(str(result.run_dir / "best.safetensors"))
    for k, v in ema[best_epoch * STEPS_PER_EPOCH - 1].items():
        torch.testing.assert_close(best[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # PublicTest evaluated the averaged weights, and metrics.csv says so.
    assert val_weights(result.run_dir) == ["ema"] * 3
    model, meta = load_model(result.run_dir / "last.safetensors")
    public = load_dataset(str(tiny_csv)).split("PublicTest")
    probs = predict_proba(model, public.images, input_size=meta["input_size"])
    assert float((probs.argmax(1) == public.labels).mean()) == result.history[-1]["val_acc"]
    val_loss = float(-np.log(probs[np.arange(len(probs)), public.labels].clip(1e-12)).mean())
    assert val_loss == pytest.approx(result.history[-1]["val_loss"], rel=1e-5)
    assert "average" in torch.load(result.run_dir / "checkpoint.pt", weights_only=True)


def test_ema_keeps_integer_buffers_as_the_trained_model_has_them(tiny_csv: Path, tmp_path: Path) -> None:
    # An average of integers truncated back to an integer drifts below it (49 * 0.96 + 49 * 0.04 is 48.99...,
    # stored as 48): tan_pca's fitted PCA rank `pca_k` and BatchNorm's `num_batches_tracked` are copied instead.
    result = train(small_config(tiny_csv, tmp_path, model="tan_pca", epochs=1, average="ema", ema_decay=0.96))
    raw = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"]
    integers = {k: v for k, v in raw.items() if not v.is_floating_point()}
    assert "pca_k" in integers and int(integers["pca_k"]) > 1
    assert int(integers["features.1.num_batches_tracked"]) == STEPS_PER_EPOCH
    for name in ("last.safetensors", "best.safetensors"):
        averaged = load_file(str(result.run_dir / name))
        for k, v in integers.items():
            assert torch.equal(averaged[k], v), (name, k, averaged[k], v)
    # Any integer the model's buffers take, step after step.
    model = tiny_net()
    model.register_buffer("count", torch.tensor(49))
    ema = averaged_model(model, TrainConfig(average="ema", ema_decay=0.96))
    for count in (49, 49, 50, 1_000_003, 7):
        model.count.fill_(count)
        model(torch.randn(4, 3, dtype=torch.float64))  # num_batches_tracked + 1
        ema.update_parameters(model)
        for (k, b), a in zip(model.named_buffers(), ema.module.buffers(), strict=True):
            if not b.is_floating_point():
                assert torch.equal(a, b), (k, a, b)


def test_swa_weights_are_the_mean_of_the_epochs_it_averaged(tiny_csv: Path, tmp_path: Path) -> None:
    # Four epochs, swa_start 0.5: the mean of the weights at the ends of epochs 3 and 4 (the raw weights are
    # kept as snapshots at every epoch's end).
    result = train(small_config(tiny_csv, tmp_path, model=BN_MODEL, epochs=4, average="swa", swa_start=0.5,
                                save_every=STEPS_PER_EPOCH))
    assert val_weights(result.run_dir) == ["raw", "raw", "swa", "swa"]
    snapshots = [load_file(str(result.run_dir / "snapshots" / f"step{s:07d}.safetensors")) for s in (15, 20)]
    model = create_model(BN_MODEL, num_classes=7)
    params = {name for name, _ in model.named_parameters()}
    mean = {k: (snapshots[0][k] + snapshots[1][k]) / 2 for k in params}
    last = load_file(str(result.run_dir / "last.safetensors"))
    for k, v in mean.items():
        torch.testing.assert_close(last[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # Its BatchNorm statistics are those of the mean weights, on the un-augmented training faces.
    model.load_state_dict(mean, strict=False)
    faces = torch.from_numpy(load_dataset(str(tiny_csv)).split("Training").images)
    batches = [normalize(resize(to_float(faces[i:i + 16]), 48)) for i in range(0, len(faces), 16)]
    torch.optim.swa_utils.update_bn(batches, model)
    for k, v in model.state_dict().items():
        if "running_" in k:
            torch.testing.assert_close(last[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # The average is kept apart: the weights that train on are the raw ones.
    raw = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(raw[k], snapshots[1][k]) for k in params)


@pytest.mark.parametrize("swa_start, epochs, first", [(0.29, 100, 30), (0.57, 100, 58), (0.75, 100, 76),
                                                      (0.75, 10, 8), (0.0, 3, 1), (0.5, 4, 3), (0.3, 10, 4)])
def test_swa_starts_after_the_swa_start_fraction_of_the_epochs(swa_start: float, epochs: int, first: int) -> None:
    # 0.29 * 100 is 28.999999999999996 in floats: SWA must still leave out 29 epochs, not 28.
    cfg = TrainConfig(average="swa", swa_start=swa_start, epochs=epochs)
    assert [e for e in range(1, epochs + 1) if swa_averages(cfg, e)] == list(range(first, epochs + 1))
    assert not any(swa_averages(replace(cfg, average="ema"), e) for e in range(1, epochs + 1))


@pytest.mark.parametrize("levers", [
    dict(model=BN_MODEL, average="ema", ema_decay=0.9),
    dict(model=BN_MODEL, average="swa", swa_start=0.3),
    dict(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.8),
    dict(sam_rho=0.05, sam_adaptive=True),
], ids=["ema", "swa", "mixup_cutmix", "asam"])
def test_resume_after_kill_matches_the_uninterrupted_run(tiny_csv: Path, tmp_path: Path, levers: dict) -> None:
    full = train(small_config(tiny_csv, tmp_path / "full", **levers))
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **levers), stop_after_epochs=1)
    assert killed.epochs_run == 1
    resumed = train(resume=killed.run_dir)
    assert without_timing(resumed.history) == without_timing(full.history)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(full.run_dir / name)), load_file(str(resumed.run_dir / name))
        for k, v in a.items():
            assert torch.equal(v, b[k]), (name, k)
    # A CPU run keeps no CUDA RNG state; its checkpoint resumes all the same (above).
    assert "cuda_rng" not in torch.load(resumed.run_dir / "checkpoint.pt", weights_only=True)


# ---- SAM / ASAM -----------------------------------------------------------------------------------------------


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 2)).double()


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_a_sam_step_is_the_hand_computed_one(adaptive: bool) -> None:
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    rho, lr = 0.3, 0.1
    model = tiny_net()
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # the hand computation moves no statistics
        return F.cross_entropy(torch.func.functional_call(model, weights | buffers, (x,)), y)

    # By hand: g at w; e = rho * T(T g) / ||T g||, T = |w| (ASAM) or 1 (SAM); the SGD step with g at w + e.
    g = dict(zip(names, torch.autograd.grad(loss_at({n: v.requires_grad_() for n, v in w.items()}), list(w.values())),
                 strict=True))
    w = {n: v.detach() for n, v in w.items()}
    t = {n: w[n].abs() if adaptive else torch.ones_like(w[n]) for n in names}
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in names))
    perturbed = {n: (w[n] + rho * t[n] * t[n] * g[n] / norm).requires_grad_() for n in names}
    g2 = torch.autograd.grad(loss_at(perturbed), list(perturbed.values()))
    expected = {n: w[n] - lr * g2[i] for i, n in enumerate(names)}

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    F.cross_entropy(model(x), y).backward()
    statistics = {n: b.clone() for n, b in model.named_buffers()}  # after the first pass, as plain training
    sam_gradient(model, lambda: F.cross_entropy(model(x), y).backward(), rho, adaptive)
    for n, b in model.named_buffers():  # the second pass changed no BatchNorm statistics
        assert torch.equal(b, statistics[n]), n
    optimizer.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], msg=n)


def test_sam_saves_and_restores_only_the_normalization_statistics() -> None:
    # The second pass can change BatchNorm's running statistics alone: other buffers (tan_pca's 2304 x 2304 PCA
    # components, 21 MB) are neither copied nor written back at every step.
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    model = tiny_net()
    model.register_buffer("table", torch.randn(64, 64, dtype=torch.float64))
    F.cross_entropy(model(x), y).backward()
    statistics = {n: b.clone() for n, b in model.named_buffers()}
    version = model.table._version
    cloned: list[torch.Size] = []
    real_clone = torch.Tensor.clone

    def clone(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cloned.append(t.shape)
        return real_clone(t, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "clone", clone)
        sam_gradient(model, lambda: F.cross_entropy(model(x), y).backward(), 0.05)
    assert model.table._version == version and torch.Size([64, 64]) not in cloned
    for n, b in model.named_buffers():  # the BatchNorm statistics are those of the first pass
        assert torch.equal(b, statistics[n]), n


def test_sam_with_rho_zero_is_the_plain_gradient() -> None:
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    plain, sam = tiny_net(), tiny_net()
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(sam(x), y).backward()
    sam_gradient(sam, lambda: F.cross_entropy(sam(x), y).backward(), 0.0)  # the second pass's alone, not added
    for (n, p), q in zip(plain.named_parameters(), sam.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad) and torch.equal(p, q), n


def test_sam_in_training_differs_from_plain_and_rho_zero_is_plain(tiny_csv: Path, tmp_path: Path) -> None:
    plain = train(small_config(tiny_csv, tmp_path / "plain", epochs=1))
    off = train(small_config(tiny_csv, tmp_path / "off", epochs=1, sam_rho=0.0, sam_adaptive=True))
    sam = train(small_config(tiny_csv, tmp_path / "sam", epochs=1, sam_rho=0.05))
    assert without_timing(off.history) == without_timing(plain.history)
    assert sam.history[0]["train_loss"] != plain.history[0]["train_loss"]


# ---- mixup / CutMix ---------------------------------------------------------------------------------------------


def identity_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images filled with their own row number, and one-hot targets over n classes (row i is class i): a mixed
    batch shows which row each one was mixed with."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 12, 12).clone(), torch.eye(n)


def test_cutmix_lambda_is_the_fraction_of_each_image_kept() -> None:
    cfg = TrainConfig(cutmix_alpha=1.0)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(20):
        x, eye = identity_batch()
        mixed, targets, teacher, lam = mix_batch(x, eye, eye.clone(), cfg, gen)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert torch.equal(targets, teacher)  # the same permutation and lam for both
        perm = (targets - lam * eye).argmax(1)  # row i took its box from row perm[i]
        for i in range(8):
            if perm[i] != i:
                assert float((mixed[i] == i).float().mean()) == pytest.approx(lam, abs=1e-6)
                assert float((mixed[i] == perm[i]).float().mean()) == pytest.approx(1 - lam, abs=1e-6)
                checked += 0 < lam < 1
    assert checked > 20


def test_mixup_blends_images_targets_and_teacher_alike() -> None:
    cfg = TrainConfig(mixup_alpha=0.4)
    x, onehot = identity_batch()
    soft = torch.softmax(torch.randn(8, 5), 1)  # FER+ vote distributions
    mixed, mixed_soft, mixed_onehot, lam = mix_batch(x, soft, onehot, cfg, torch.Generator().manual_seed(3))
    assert 0 < lam < 1
    perm = (mixed_onehot - lam * torch.eye(8)).argmax(1)  # row i was mixed with row perm[i]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(mixed_soft, lam * soft + (1 - lam) * soft[perm])
    torch.testing.assert_close(mixed_soft.sum(1), torch.ones(8))
    # Same generator state, same mix (a resumed run mixes as the uninterrupted one); mix_prob 0 leaves it as is.
    again = mix_batch(x, soft, onehot, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], mixed_soft)
    kept = mix_batch(x, soft, onehot, TrainConfig(mixup_alpha=0.4, mix_prob=0.0), torch.Generator())
    assert kept[0] is x and kept[1] is soft and kept[2] is onehot and kept[3] == 1.0


def test_hard_labels_become_one_hot_and_soft_ones_stay() -> None:
    assert torch.equal(as_distribution(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    soft = torch.tensor([[0.2, 0.8]])
    assert as_distribution(soft, 2) is soft


def test_mixing_switched_off_is_bit_identical_to_no_mixing(tiny_csv: Path, tmp_path: Path) -> None:
    plain = train(small_config(tiny_csv, tmp_path / "plain", epochs=2))
    never = train(small_config(tiny_csv, tmp_path / "never", epochs=2, mixup_alpha=0.4, cutmix_alpha=1.0,
                               mix_prob=0.0))
    mixed = train(small_config(tiny_csv, tmp_path / "mixed", epochs=2, mixup_alpha=0.4))
    assert without_timing(never.history) == without_timing(plain.history)
    a, b = load_file(str(plain.run_dir / "last.safetensors")), load_file(str(never.run_dir / "last.safetensors"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert without_timing(mixed.history) != without_timing(plain.history)


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
def test_class_weights_mean_the_same_for_distributions_as_for_labels(smoothing: float) -> None:
    # With class weights, the loss of a batch of labels is their weighted sum over the sum of the labels' weights
    # (F.cross_entropy's mean). A batch whose targets are distributions (mixed batches, FER+ votes) is normalized
    # alike, by the sum over its faces of sum_c w_c y_c: one-hot distributions give the labels' loss, so a mixup
    # on/off ablation with class_weights=balanced compares like with like. Labels: [0, 0, 1], weights [1, 5]:
    # (l0 + l1 + 5 l2) / 7, where the distributions' loss was divided by 3.
    cfg = TrainConfig(label_smoothing=smoothing)
    logits = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels, weight = torch.tensor([0, 0, 1]), torch.tensor([1.0, 5.0], dtype=torch.float64)

    def loss(targets: torch.Tensor, logits: torch.Tensor = logits,
             weight: torch.Tensor | None = weight) -> torch.Tensor:
        return trainer._batch_loss(cfg, logits, targets, weight, None, slice(None), SINGLE)

    hard = loss(labels)
    torch.testing.assert_close(hard, F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing),
                               rtol=1e-12, atol=0)  # F.cross_entropy's weighted mean, as it was
    if not smoothing:
        nll = -F.log_softmax(logits, 1)[torch.arange(3), labels]
        torch.testing.assert_close(hard, (nll[0] + nll[1] + 5 * nll[2]) / 7)
    torch.testing.assert_close(loss(as_distribution(labels, 2).double()), hard, rtol=1e-12, atol=0)
    # Any distributions: sum_i sum_c w_c y'_ic (-log p_ic) / sum_i sum_c w_c y_ic, y' the smoothed targets.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64, generator=gen), 1)
    smoothed = soft * (1 - smoothing) + smoothing / 5
    expected = -(smoothed * weight * F.log_softmax(logits, 1)).sum() / (soft * weight).sum()
    torch.testing.assert_close(loss(soft, logits, weight), expected)
    # Without class weights, the mean over the faces (unchanged).
    torch.testing.assert_close(loss(soft, logits, None), F.cross_entropy(logits, soft, label_smoothing=smoothing),
                               rtol=1e-12, atol=0)
    # Several processes: the normalizer is the whole batch's, so the shares' gradients average to the whole loss's.
    (whole,) = torch.autograd.grad(loss(soft, logits, weight), logits)
    averaged = torch.zeros_like(logits)
    batch = torch.arange(7)
    for rank, share in enumerate((batch[:3], batch[3:])):
        part = trainer._share_loss(cfg, logits[share], soft, weight, None, batch, share, Dist(rank, 2))
        averaged += torch.autograd.grad(part, logits)[0] / 2
    torch.testing.assert_close(averaged, whole)



# ---- the squared-hinge loss -----------------------------------------------------------------------------------


def test_squared_hinge_is_the_one_vs_rest_l2_svm_loss() -> None:
    # Face 0, class 0, logits (2, -0.5, 0.3): its class is past the margin (0); the others pay (1 - 0.5)^2 and
    # (1 + 0.3)^2. Face 1, class 2, all logits 0: a unit for each class.
    logits = torch.tensor([[2.0, -0.5, 0.3], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(squared_hinge(logits, labels), torch.tensor([0.25 + 1.69, 3.0]))
    # A one-hot distribution is its label; class weights scale each face by its class's weight.
    torch.testing.assert_close(squared_hinge(logits, as_distribution(labels, 3)), squared_hinge(logits, labels))
    torch.testing.assert_close(squared_hinge(logits, labels, torch.tensor([2.0, 1.0, 5.0])),
                               torch.tensor([2 * 1.94, 5 * 3.0]))
    # A distribution is the expectation over the face's class; smoothing is that of its smoothed labels.
    soft = torch.tensor([[0.5, 0.0, 0.5]])
    expected = 0.5 * squared_hinge(logits[:1], torch.tensor([0])) + 0.5 * squared_hinge(logits[:1], torch.tensor([2]))
    torch.testing.assert_close(squared_hinge(logits[:1], soft), expected)
    smoothed = as_distribution(labels, 3) * 0.9 + 0.1 / 3
    torch.testing.assert_close(squared_hinge(logits, labels, label_smoothing=0.1), squared_hinge(logits, smoothed))
    # With class weights, each class k's term is weighted by w_k, as in cross-entropy's -sum_k w_k y_k log p_k: the
    # loss of any (smoothed) distribution is sum_k w_k y_k (the loss of label k). Face 0 of (0.5, 0, 0.5), weights
    # (2, 1, 5): 0.5 * 2 * 1.94 + 0.5 * 5 * (0.7^2 + 3^2 + 0.5^2) = 26.29.
    weight = torch.tensor([2.0, 1.0, 5.0])
    torch.testing.assert_close(squared_hinge(logits[:1], soft, weight), torch.tensor([26.29]))
    gen = torch.Generator().manual_seed(0)
    scores, dist = torch.randn(5, 4, generator=gen), torch.softmax(torch.randn(5, 4, generator=gen), 1)
    weight = torch.rand(4, generator=gen) + 0.5
    per_label = torch.stack([squared_hinge(scores, torch.full((5,), k)) for k in range(4)], 1)  # (faces, k)
    for eps in (0.0, 0.3):
        y = dist * (1 - eps) + eps / 4
        torch.testing.assert_close(squared_hinge(scores, dist, weight, label_smoothing=eps),
                                   (y * weight * per_label).sum(1))
    # bf16 logits are scored in fp32.
    assert squared_hinge(logits.bfloat16(), labels).dtype == torch.float32


def test_the_batch_loss_with_squared_hinge_is_its_weighted_mean() -> None:
    cfg = TrainConfig(loss="squared_hinge")
    logits = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    labels, weight = torch.tensor([0, 0, 1]), torch.tensor([1.0, 5.0])
    per_face = squared_hinge(logits, labels)
    batch = trainer._batch_loss(cfg, logits, labels, weight, None, slice(None), SINGLE)
    torch.testing.assert_close(batch, (per_face[0] + per_face[1] + 5 * per_face[2]) / 7)
    torch.testing.assert_close(trainer._batch_loss(cfg, logits, labels, None, None, slice(None), SINGLE),
                               per_face.mean())


@pytest.mark.parametrize("extra", [{}, {"mixup_alpha": 0.4, "class_weights": "balanced", "label_smoothing": 0.1}],
                         ids=["labels", "mixed_weighted_smoothed"])
def test_training_with_squared_hinge(tiny_csv: Path, tmp_path: Path, extra: dict) -> None:
    # lr 0.01: the squared hinge's gradients grow with the logits (cross-entropy's are bounded by 1), and this small
    # network without BatchNorm diverges on it at the other tests' 0.05.
    hinge = train(small_config(tiny_csv, tmp_path / "hinge", epochs=2, lr=0.01, loss="squared_hinge", **extra))
    plain = train(small_config(tiny_csv, tmp_path / "plain", epochs=2, lr=0.01, **extra))
    assert all(math.isfinite(h["train_loss"]) for h in hinge.history)
    assert hinge.history[0]["train_loss"] != plain.history[0]["train_loss"]
    assert json.loads((hinge.run_dir / "config.json").read_text())["loss"] == "squared_hinge"
    _, meta = load_model(hinge.run_dir / "best.safetensors")  # evaluation reads its scores as logits, as any model's
    assert meta["num_classes"] == 7


def save_teacher(path: Path, **meta: object) -> torch.nn.Module:
    """A random-init 7-class sixclass_cnn4 saved as a teacher (its probabilities are all a test needs)."""
    from ferkit.data import get_label_set
    from ferkit.models.weights import save_weights

    torch.manual_seed(0)
    model = create_model("sixclass_cnn4", num_classes=7).eval()
    save_weights(model, path, {"model": "sixclass_cnn4", "num_classes": 7, "label_set": "fer7", "input_size": 48,
                               "classes": list(get_label_set("fer7").classes), "normalize": "dataset",
                               "model_kwargs": {}, **meta})
    return model


def test_distillation_with_mixing_mixes_the_tempered_teacher_distributions(tiny_csv: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The distillation target at temperature T is the teacher's tempered distribution; a mixed batch's target is
    # the mix of its faces' targets, as for labels: lam * p_i^(1/T)/Z_i + (1 - lam) * p_j^(1/T)/Z_j, not the
    # mix tempered afterwards.
    from ferkit.training import levers

    teacher_path = tmp_path / "teacher.safetensors"
    save_teacher(teacher_path)
    probs: list[torch.Tensor] = []
    mixes: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses: list[tuple[torch.Tensor, bool]] = []
    real_probs, real_mix, real_loss = distill.teacher_probabilities, levers.mix_batch, distill.distillation_loss

    def teacher_probabilities(*args):
        probs.append(real_probs(*args))
        return probs[-1]

    def mix_batch(x, targets, teacher, cfg, gen):
        out = real_mix(x, targets, teacher, cfg, gen)
        mixes.append((teacher, out[2]))
        return out

    def distillation_loss(student, teacher, temperature, tempered=False):
        losses.append((teacher, tempered))
        return real_loss(student, teacher, temperature, **({"tempered": True} if tempered else {}))

    monkeypatch.setattr(distill, "teacher_probabilities", teacher_probabilities)
    monkeypatch.setattr(levers, "mix_batch", mix_batch)
    monkeypatch.setattr(distill, "distillation_loss", distillation_loss)
    settings = dict(teacher=str(teacher_path), distill_temperature=4.0, mixup_alpha=0.4, epochs=2)
    full = train(small_config(tiny_csv, tmp_path / "full", **settings))
    tempered = F.softmax(probs[0].clamp_min(1e-8).log() / 4.0, 1)
    assert len(mixes) == len(losses) == 2 * STEPS_PER_EPOCH
    for (given, mixed), (target, flag) in zip(mixes, losses, strict=True):
        nearest = (given[:, None] - tempered[None]).abs().amax(2).amin(1)
        assert float(nearest.max()) < 1e-6  # each row a tempered distribution
        assert flag and torch.equal(target, mixed)  # taken as they are, not tempered again
    # Tempering is applied once for all faces: tempered distributions give the plain loss, and a run resumes exactly.
    student = torch.randn(5, 7)
    torch.testing.assert_close(real_loss(student, tempered[:5], 4.0, tempered=True),
                               real_loss(student, probs[0][:5], 4.0))
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **settings), stop_after_epochs=1)
    assert without_timing(train(resume=killed.run_dir).history) == without_timing(full.history)


@pytest.mark.parametrize("teacher_norm", ["dataset", "per_image"])
def test_online_distillation_targets_are_the_teacher_on_each_mixed_batch(tiny_csv: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        teacher_norm: str) -> None:
    # distill_view=online: no offline pass; every step's target is the teacher's probabilities on the very faces
    # the student gets (augmented, then mixed), normalized as the teacher was trained (per_image: not as the
    # student is), untempered (distillation_loss tempers them), and the run resumes exactly.
    from ferkit.models.predict import predict_batch
    from ferkit.training import levers

    teacher_path = tmp_path / "teacher.safetensors"
    teacher = save_teacher(teacher_path, normalize=teacher_norm)
    seen: list[torch.Tensor] = []
    losses: list[tuple[torch.Tensor, bool]] = []
    real_mix, real_loss = levers.mix_batch, distill.distillation_loss

    def mix_batch(x, targets, given, cfg, gen):
        assert given is None  # online: nothing precomputed to mix
        out = real_mix(x, targets, given, cfg, gen)
        seen.append(out[0])
        return out

    def distillation_loss(student, targets, temperature, tempered=False):
        losses.append((targets, tempered))
        return real_loss(student, targets, temperature, tempered=tempered)

    def no_offline_pass(*args):
        raise AssertionError("online distillation computed offline targets")

    monkeypatch.setattr(levers, "mix_batch", mix_batch)
    monkeypatch.setattr(distill, "distillation_loss", distillation_loss)
    monkeypatch.setattr(distill, "teacher_probabilities", no_offline_pass)
    settings = dict(teacher=str(teacher_path), distill_view="online", mixup_alpha=0.4, epochs=2)
    full = train(small_config(tiny_csv, tmp_path / "full", **settings))
    assert len(seen) == len(losses) == 2 * STEPS_PER_EPOCH
    for x, (targets, tempered) in zip(seen, losses, strict=True):
        assert not tempered
        expected = predict_batch(teacher, normalize(x, teacher_norm), "none", 48)
        torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-6)
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **settings), stop_after_epochs=1)
    assert without_timing(train(resume=killed.run_dir).history) == without_timing(full.history)
    assert json.loads((full.run_dir / "config.json").read_text())["distill_view"] == "online"


def test_online_distillation_teacher_and_student_see_faces_alike(tiny_csv: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Online, the teacher gets the student's faces: a crop-trained teacher with a whole-face student (or the other
    # way round) is refused before any run directory; a crop teacher with a crop student gets the crops as they are.
    from ferkit.models.predict import predict_batch

    crop_teacher, whole_teacher = tmp_path / "crop.safetensors", tmp_path / "whole.safetensors"
    teacher = save_teacher(crop_teacher, train_view="crop")
    save_teacher(whole_teacher)
    for path, view, message in ((crop_teacher, "resize", r"sees crops \(center view\), but this run trains on "
                                 r"whole faces \(train_view=resize\)"),
                                (whole_teacher, "crop", r"sees whole faces \(none view\), but this run trains on "
                                 r"crops \(train_view=crop\)")):
        with pytest.raises(ValueError, match=message + ".*distill_view=offline"):
            train(small_config(tiny_csv, tmp_path / "runs", teacher=str(path), distill_view="online",
                               train_view=view))
        assert not (tmp_path / "runs").exists()
    crops: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    real_augment, real_loss = trainer.augment, distill.distillation_loss

    def augment(*args, **kwargs):  # the student's training faces: 48-pixel crops of 58-pixel faces
        crops.append(real_augment(*args, **kwargs))
        return crops[-1]

    def distillation_loss(student, given, temperature, tempered=False):
        targets.append(given)
        return real_loss(student, given, temperature, tempered=tempered)

    monkeypatch.setattr(trainer, "augment", augment)
    monkeypatch.setattr(distill, "distillation_loss", distillation_loss)
    train(small_config(tiny_csv, tmp_path / "crop", teacher=str(crop_teacher), distill_view="online",
                       train_view="crop", epochs=1))
    assert len(crops) == len(targets) == STEPS_PER_EPOCH
    for x, given in zip(crops, targets, strict=True):
        assert x.shape[-1] == 48
        torch.testing.assert_close(given, predict_batch(teacher, normalize(x), "none", 48), rtol=1e-5, atol=1e-6)


def test_online_distillation_refuses_bad_settings(tiny_csv: Path, tmp_path: Path) -> None:
    for bad in ("onlin", "", 1, None):
        with pytest.raises(ValueError, match="distill_view"):
            TrainConfig(distill_view=bad).validate()  # type: ignore[arg-type]
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_csv), "--out", str(tmp_path), "--no-progress",
                                      "distill_view=sideways"])
    assert result.exit_code == 2 and "distill_view" in result.output, result.output


def test_cached_distillation_trains_on_stored_views_against_the_teacher_on_each(
        tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # distill_view=cached: the teacher runs distill_views passes over the faces before the first epoch and never
    # again; every step trains on one stored view per face and aims at the teacher's probabilities on that very
    # view (untempered without mixing); a resume finds the saved views instead of running the teacher again and
    # continues exactly.
    from ferkit.models.predict import predict_batch
    from ferkit.training import teacher_views

    teacher_path = tmp_path / "teacher.safetensors"
    teacher = save_teacher(teacher_path)
    built: list[tuple[torch.Tensor, torch.Tensor]] = []
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    picked: list[tuple[torch.Tensor, torch.Tensor]] = []  # (faces drawn, their batch)
    losses: list[tuple[torch.Tensor, bool]] = []
    real_build, real_draw, real_loss = teacher_views.build, teacher_views.draw, distill.distillation_loss

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def draw(*args):
        drawn.append(real_draw(*args))
        picked.append((args[2], drawn[-1][0]))
        return drawn[-1]

    def distillation_loss(student, targets, temperature, tempered=False):
        losses.append((targets, tempered))
        return real_loss(student, targets, temperature, tempered=tempered)

    def no_augment(*args, **kwargs):
        raise AssertionError("a cached run augmented a batch")

    monkeypatch.setattr(teacher_views, "build", build)
    monkeypatch.setattr(teacher_views, "draw", draw)
    monkeypatch.setattr(distill, "distillation_loss", distillation_loss)
    monkeypatch.setattr(trainer, "augment", no_augment)
    settings = dict(teacher=str(teacher_path), distill_view="cached", distill_views=3, epochs=2)
    full = train(small_config(tiny_csv, tmp_path / "full", **settings))
    assert len(built) == 1 and len(drawn) == len(losses) == 2 * STEPS_PER_EPOCH
    views, probs = built[0]
    assert views.dtype == torch.uint8 and views.shape == (3, 70, 1, 48, 48) and probs.shape == (3, 70, 7)
    assert not torch.equal(views[0], views[1])  # three augmentations, not one face three times
    # The teacher scored the stored (uint8) faces, which are what the student gets.
    torch.testing.assert_close(probs[1, :10], predict_batch(teacher, normalize(views[1, :10].float() / 255), "none",
                                                            48), rtol=1e-5, atol=1e-6)
    for (x, given), (targets, tempered) in zip(drawn, losses, strict=True):
        assert not tempered and torch.equal(targets, given)
        torch.testing.assert_close(given, predict_batch(teacher, normalize(x), "none", 48), rtol=1e-5, atol=1e-6)
    # Each face of a batch is one of that face's own views, and every view gets drawn.
    drawn_views = set()
    for idx, x in picked:
        stored = views[:, idx].float() / 255  # (views, B, 1, S, S)
        match = (stored == x[None]).flatten(2).all(-1)  # (views, B): which view each row is
        assert match.any(0).all()
        drawn_views |= set(match.float().argmax(0).tolist())
    assert drawn_views == {0, 1, 2}
    assert not (full.run_dir / teacher_views.FILE_NAME).exists()  # kept for resuming only: gone when the run ends
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **settings), stop_after_epochs=1)
    assert (killed.run_dir / teacher_views.FILE_NAME).is_file()
    built.clear()
    assert without_timing(train(resume=killed.run_dir).history) == without_timing(full.history)
    assert built == []  # the resume read the saved views
    assert not (killed.run_dir / teacher_views.FILE_NAME).exists()
    assert json.loads((full.run_dir / "config.json").read_text())["distill_views"] == 3
    stretches = json.loads((full.run_dir / "manifest.json").read_text())["stretches"]
    assert stretches[0]["teacher_views_seconds"] >= 0
    train(resume=full.run_dir)  # a run that is over: nothing to train, no views to build
    assert built == []


def test_cached_distillation_with_mixing_mixes_tempered_distributions(tiny_csv: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Mixed batches aim at the mix of their faces' tempered targets, as offline: each target a distribution over
    # the classes (tempering the (views, faces, C) table over any other axis would not sum to 1).
    losses: list[tuple[torch.Tensor, bool]] = []
    real_loss = distill.distillation_loss

    def distillation_loss(student, targets, temperature, tempered=False):
        losses.append((targets, tempered))
        return real_loss(student, targets, temperature, tempered=tempered)

    monkeypatch.setattr(distill, "distillation_loss", distillation_loss)
    teacher_path = tmp_path / "teacher.safetensors"
    save_teacher(teacher_path)
    train(small_config(tiny_csv, tmp_path, teacher=str(teacher_path), distill_view="cached", distill_views=2,
                       mixup_alpha=0.4, epochs=1))
    assert len(losses) == STEPS_PER_EPOCH
    for targets, tempered in losses:
        assert tempered
        torch.testing.assert_close(targets.sum(-1), torch.ones(len(targets)))


def test_cached_views_that_cannot_be_saved_or_would_not_fit(tiny_csv: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from ferkit.training import teacher_views

    teacher_path = tmp_path / "teacher.safetensors"
    save_teacher(teacher_path)
    settings = dict(teacher=str(teacher_path), distill_view="cached", distill_views=2, epochs=1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (full_disk if "teacher_views" in str(f) else
                                                                 real_save)(obj, f, *a, **k))
    result = train(small_config(tiny_csv, tmp_path / "disk", **settings))  # the views are a shortcut: it trains
    assert len(result.history) == 1 and "not saved" in capsys.readouterr().out
    assert not list(result.run_dir.glob("teacher_views*"))
    monkeypatch.setattr(teacher_views, "MAX_BYTES", 2 * 70 * 48 * 48 - 1)
    with pytest.raises(ValueError, match=r"distill_views=2: 2 views of 70 faces at 48x48 need"):
        train(small_config(tiny_csv, tmp_path / "big", **settings))


@pytest.mark.parametrize("damage", ["truncated", "empty", "other_key", "nan", "not_a_dict"])
def test_cached_views_file_that_does_not_fit_is_built_again(tiny_csv: Path, tmp_path: Path, damage: str,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The saved views are a resume's shortcut, not a record: a damaged one, or one made for another teacher,
    # augmentation or seed, is rebuilt (and the run's result is the same as without it).
    from ferkit.training import teacher_views

    teacher_path = tmp_path / "teacher.safetensors"
    save_teacher(teacher_path)
    settings = dict(teacher=str(teacher_path), distill_view="cached", distill_views=2, epochs=2)
    full = train(small_config(tiny_csv, tmp_path / "full", **settings))
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **settings), stop_after_epochs=1)
    path = killed.run_dir / teacher_views.FILE_NAME
    good = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_key":
        torch.save({**good, "key": "0" * 64}, path)
    elif damage == "nan":
        torch.save({**good, "probs": good["probs"] * float("nan")}, path)
    else:
        torch.save([good["views"]], path)
    rebuilt: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_build = teacher_views.build

    def build(*args, **kwargs):
        rebuilt.append(real_build(*args, **kwargs))
        return rebuilt[-1]

    monkeypatch.setattr(teacher_views, "build", build)
    capsys.readouterr()
    assert without_timing(train(resume=killed.run_dir).history) == without_timing(full.history)
    assert "building them again" in capsys.readouterr().out
    assert len(rebuilt) == 1 and torch.equal(rebuilt[0][0], good["views"])


def test_cached_distillation_refuses_bad_settings(tiny_csv: Path, tmp_path: Path) -> None:
    for bad in (0, -1, 65, 1.5, True, "8", None, float("nan")):
        with pytest.raises(ValueError, match="distill_views"):
            TrainConfig(teacher="t.safetensors", distill_view="cached", distill_views=bad).validate()  # type: ignore
    for value in ("0", "100000", "nan", "many"):
        result = CliRunner().invoke(app, ["train", "--data", str(tiny_csv), "--out", str(tmp_path / "cli"),
                                          "--no-progress", "distill_view=cached", f"distill_views={value}"])
        assert result.exit_code == 2 and "distill_views" in result.output, result.output
    # Cross-fitted targets are predictions on the plain faces: nothing to run on augmented views.
    targets = tmp_path / "cf.npz"
    np.savez(targets, probabilities=np.full((70, 7), 1 / 7))
    with pytest.raises(ValueError, match="use distill_view=offline"):
        train(small_config(tiny_csv, tmp_path / "runs", teacher=str(targets), distill_view="cached"))
    crop_teacher = tmp_path / "crop.safetensors"  # a crop teacher would score the student's whole faces
    save_teacher(crop_teacher, train_view="crop")
    with pytest.raises(ValueError, match=r"sees crops .*distill_view=cached feeds the teacher"):
        train(small_config(tiny_csv, tmp_path / "runs", teacher=str(crop_teacher), distill_view="cached"))
    assert not (tmp_path / "runs").exists()


def test_cached_views_are_the_same_for_every_call_and_differ_by_seed() -> None:
    from ferkit.data.augment import AugmentConfig
    from ferkit.training import teacher_views

    faces = torch.randint(0, 256, (20, 48, 48), dtype=torch.uint8)

    def uniform(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 7), 1 / 7)

    a = teacher_views.build(faces, 2, AugmentConfig(), 48, 0, 0, uniform, batch_size=8)
    b = teacher_views.build(faces, 2, AugmentConfig(), 48, 0, 0, uniform, batch_size=8)
    c = teacher_views.build(faces, 2, AugmentConfig(), 48, 0, 1, uniform, batch_size=8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    crops = teacher_views.build(faces, 1, AugmentConfig(), 58, 48, 0, uniform)[0]
    assert crops.shape == (1, 20, 1, 48, 48)
    with pytest.raises(ValueError, match="not finite"):
        teacher_views.build(faces, 1, AugmentConfig(), 48, 0, 0, lambda x: uniform(x) * float("nan"))
    with pytest.raises(ValueError, match="distill_views"):
        teacher_views.build(faces, 0, AugmentConfig(), 48, 0, 0, uniform)


# ---- composition with the other options ----------------------------------------------------------------------


def test_levers_compose_with_soft_labels_distillation_bf16_and_grad_clip(tmp_path: Path, cache_dir: Path) -> None:
    from test_ferplus_cli import _ferplus_pair

    from ferkit.models.weights import save_weights

    csv_path, fp_path, _ = _ferplus_pair(tmp_path)
    classes = ["neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt"]
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("sixclass_cnn4", num_classes=8), teacher,
                 {"model": "sixclass_cnn4", "num_classes": 8, "classes": classes, "label_set": "ferplus8",
                  "input_size": 48, "normalize": "dataset", "model_kwargs": {}})
    result = train(small_config(csv_path, tmp_path / "runs", epochs=2, labels=str(fp_path), label_mode="soft",
                                label_set="ferplus8", teacher=str(teacher), precision="bf16", grad_clip=1.0,
                                sam_rho=0.05, mixup_alpha=0.4, cutmix_alpha=1.0, average="ema", ema_decay=0.9))
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert val_weights(result.run_dir) == ["ema", "ema"]


def test_levers_compose_with_class_weights_crops_and_swa(tiny_csv: Path, tmp_path: Path) -> None:
    result = train(small_config(tiny_csv, tmp_path, model=BN_MODEL, epochs=2, class_weights="balanced",
                                label_smoothing=0.1, train_view="crop", sam_rho=0.5, sam_adaptive=True,
                                cutmix_alpha=1.0, mix_prob=0.5, average="swa", swa_start=0.0))
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert val_weights(result.run_dir) == ["swa", "swa"]


def test_two_processes_train_the_one_process_run_with_the_levers(tmp_path: Path, cache_dir: Path) -> None:
    # SAM's first pass averages its gradient over the processes (every process perturbs alike) and must not
    # leak into the second; the mix is drawn for the whole batch before the shares are taken; each process
    # updates its EMA alike. Without BatchNorm and dropout, the weights are one process's up to float rounding.
    from test_distributed import SETTINGS, flags, torchrun

    data = write_csv(tmp_path / "tiny.csv", synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35}))
    levers = SETTINGS | {"epochs": 2, "sam_rho": 0.05, "mixup_alpha": 0.4, "cutmix_alpha": 1.0,
                         "average": "ema", "ema_decay": 0.9}
    two = torchrun(2, ["-m", "ferkit", "train", "--data", str(data), "--out", str(tmp_path / "two"), "--name", "r",
                       "--no-progress", *flags(levers)], cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-4000:]
    one = train(TrainConfig(data=str(data), out_dir=str(tmp_path / "one"), run_name="r", progress=False, **levers))
    two_w = load_file(str(tmp_path / "two" / "r" / "last.safetensors"))
    for k, v in load_file(str(one.run_dir / "last.safetensors")).items():
        torch.testing.assert_close(two_w[k], v, rtol=1e-4, atol=1e-6, msg=k)


SWA_BATCHNORM_PATCH = """
# Each process records the batches of its SWA BatchNorm passes: their faces, and whether gradients were on.
import torch
from ferkit.training import levers

real, passes = levers.update_bn, []

def recorded(batches, model, *args, **kwargs):
    seen = []
    passes.append(seen)

    def counted():
        for x in batches:
            seen.append([len(x), torch.is_grad_enabled()])
            yield x

    real(counted(), model, *args, **kwargs)

levers.update_bn = recorded
"""


def test_two_processes_share_the_swa_batchnorm_pass(tmp_path: Path, cache_dir: Path) -> None:
    # Each process runs every other batch of the pass (the whole global batch, without gradients), and the
    # processes' statistics are combined: the pass costs each process its share, and its BatchNorm statistics are
    # the one-process pass's over all the training faces, for the averaged weights (up to float rounding).
    from test_distributed import SETTINGS, cli_worker, flags, torchrun

    data = write_csv(tmp_path / "tiny.csv", synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35}))
    worker = tmp_path / "swa_worker.py"
    worker.write_text(cli_worker(SWA_BATCHNORM_PATCH, records="passes"))
    settings = SETTINGS | {"model": BN_MODEL, "average": "swa", "swa_start": 0.5}
    done = torchrun(2, [str(worker), "train", "--data", str(data), "--out", str(tmp_path / "runs"), "--name", "r",
                        "--no-progress", *flags(settings)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"passes{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) == 2  # epochs 2 and 3
    for mine, theirs in zip(rank0, rank1, strict=True):
        assert [n for n, _ in mine] == [16, 16, 6] and [n for n, _ in theirs] == [16, 16]  # batches 0, 2, 4 | 1, 3
        assert not any(grad for _, grad in mine + theirs)
    last = load_file(str(tmp_path / "runs" / "r" / "last.safetensors"))
    assert val_weights(tmp_path / "runs" / "r") == ["raw", "swa", "swa"]
    model = create_model(BN_MODEL, num_classes=7)
    model.load_state_dict(last)
    faces = torch.from_numpy(load_dataset(str(data)).split("Training").images)
    torch.optim.swa_utils.update_bn([normalize(resize(to_float(faces[i:i + 16]), 48)) for i in range(0, 70, 16)],
                                    model)
    statistics = {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    assert statistics
    for k, v in statistics.items():
        torch.testing.assert_close(last[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_with_syncbatchnorm_each_process_runs_its_share_of_every_batch() -> None:
    # SyncBatchNorm layers compute each batch's statistics over the processes together, so every process takes part
    # in every batch with its share (here rank 1 of 2, without a process group: SyncBatchNorm then normalizes alone).
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tiny_net())
    faces = torch.randn(70, 3, dtype=torch.float64)
    seen: list[tuple[int, int]] = []

    def batch(rows: slice) -> torch.Tensor:
        seen.append((rows.start, rows.stop))
        return faces[rows]

    recompute_batchnorm(model, batch, len(faces), 16, torch.device("cpu"), Dist(1, 2))
    assert seen == [(8, 16), (24, 32), (40, 48), (56, 64), (67, 70)]
    assert int(model[1].num_batches_tracked) == 5
    plain = tiny_net()
    recompute_batchnorm(plain, batch, len(faces), 16, torch.device("cpu"))  # one process: every batch, whole
    assert seen[5:] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]


# ---- settings ---------------------------------------------------------------------------------------------------


BAD_SETTINGS = [
    ("average", "sma", "average 'sma' not in"),
    ("ema_decay", 1.0, "ema_decay must be in .0, 1."),
    ("ema_decay", 0.0, "ema_decay must be in .0, 1."),
    ("ema_decay", float("nan"), "ema_decay must be in .0, 1., e.g. 0.999, got nan"),
    ("swa_start", 1.0, "swa_start must be a fraction of the epochs in .0, 1., got 1.0"),
    ("swa_start", -0.1, "swa_start must be"),
    ("sam_rho", -0.05, "sam_rho must be a finite number >= 0 .0 = off., e.g. 0.05, got -0.05"),
    ("sam_rho", float("nan"), "sam_rho must be .*got nan"),
    ("sam_rho", float("inf"), "sam_rho must be .*got inf"),
    ("mixup_alpha", -1.0, "mixup_alpha must be .*got -1.0"),
    ("mixup_alpha", float("nan"), "mixup_alpha must be .*got nan"),
    ("cutmix_alpha", float("inf"), "cutmix_alpha must be .*got inf"),
    ("mix_prob", 1.5, "mix_prob must be a probability in .0, 1., got 1.5"),
    ("mix_prob", float("nan"), "mix_prob must be .*got nan"),
    ("loss", "hinge", "loss 'hinge' not in .'cross_entropy', 'squared_hinge'."),
    ("loss", "", "loss '' not in"),
    ("label_smoothing", float("nan"), "label_smoothing must be a fraction in .0, 1. .0 = off., e.g. 0.1, got nan"),
    ("label_smoothing", -0.1, "label_smoothing must be .*got -0.1"),
    ("label_smoothing", 1.5, "label_smoothing must be .*got 1.5"),
]


@pytest.mark.parametrize("key, value, message", BAD_SETTINGS)
def test_bad_lever_settings_fail_before_any_run_directory(tiny_csv: Path, tmp_path: Path, key: str, value: object,
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value}).validate()
    with pytest.raises(ValueError, match=message):
        train(small_config(tiny_csv, tmp_path / "runs", **{key: value}))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["sam_rho=nan"], "sam_rho=nan: expected a number"),
    (["sam_rho=NaN"], "sam_rho must be a finite number >= 0"),
    (["--sam-rho", "nan"], "sam_rho must be a finite number >= 0"),
    (["--average", "sma"], "average 'sma' not in"),
    (["ema_decay=1"], "ema_decay must be in (0, 1)"),
    (["swa_start=1"], "swa_start must be"),
    (["--mixup-alpha", "-0.2"], "mixup_alpha must be"),
    (["cutmix_alpha=Infinity"], "cutmix_alpha must be"),
    (["mix_prob=2"], "mix_prob must be a probability"),
    (["sam_adaptive=1"], "sam_adaptive=1: expected true or false"),
])
def test_bad_lever_settings_on_the_command_line(tiny_csv: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_csv), "--out", str(tmp_path / "runs"), "--name",
                                      "x", "--no-progress", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs").exists()


def test_lever_settings_on_the_command_line_and_in_sweeps(tiny_csv: Path, tmp_path: Path) -> None:
    from ferkit.training.sweep import SweepError, parse_grid

    args = ["train", "--data", str(tiny_csv), "--model", "sixclass_cnn4", "--epochs", "1", "--out", str(tmp_path),
            "--name", "x", "--no-progress", "--precision", "fp32", "--average", "ema", "--sam-rho", "0.05",
            "--mixup-alpha", "0.2", "--cutmix-alpha", "1", "ema_decay=0.99", "mix_prob=0.5", "sam_adaptive=true",
            "swa_start=0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert {k: config[k] for k in ("average", "ema_decay", "swa_start", "sam_rho", "sam_adaptive", "mixup_alpha",
                                   "cutmix_alpha", "mix_prob")} == {
        "average": "ema", "ema_decay": 0.99, "swa_start": 0.5, "sam_rho": 0.05, "sam_adaptive": True,
        "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 0.5}
    grid = parse_grid(["average=none,ema,swa", "sam_rho=0,0.05", "sam_adaptive=false,true", "mixup_alpha=0,0.2"])
    assert grid["average"] == ["none", "ema", "swa"]
    with pytest.raises(SweepError, match="ema_decay=1: ema_decay must be in"):
        parse_grid(["ema_decay=0.99,1"])
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    for name in ("--average", "--sam-rho", "--mixup-alpha", "--cutmix-alpha", "ema_decay", "swa_start",
                 "sam_adaptive", "mix_prob"):
        assert name in help_text, name


@pytest.mark.parametrize("settings, note", [
    (dict(sam_adaptive=True), "sam_adaptive=true does nothing with sam_rho=0 (SAM is off)"),
    (dict(ema_decay=0.99), "ema_decay=0.99 does nothing with average=none (it is average=ema's)"),
    (dict(average="swa", ema_decay=0.99), "ema_decay=0.99 does nothing with average=swa (it is average=ema's)"),
    (dict(swa_start=0.5, average="ema"), "swa_start=0.5 does nothing with average=ema (it is average=swa's)"),
    (dict(mix_prob=0.5), "mix_prob=0.5 does nothing with mixup_alpha=0 and cutmix_alpha=0 (mixing is off)"),
    (dict(distill_view="online"), "distill_view=online does nothing without a teacher (distillation is off)"),
    (dict(distill_views=4), "distill_views=4 does nothing without a teacher and distill_view=cached"),
    (dict(sam_rho=0.05, sam_adaptive=True, average="ema", ema_decay=0.99, mixup_alpha=0.2, mix_prob=0.5), None),
    (dict(average="swa", swa_start=0.5, cutmix_alpha=1.0, mix_prob=0.0), None),
], ids=["sam_adaptive", "ema_decay", "ema_decay_swa", "swa_start", "mix_prob", "distill_view", "distill_views",
        "in_use", "in_use_swa"])
def test_lever_settings_that_do_nothing_are_noted(tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  settings: dict, note: str | None) -> None:
    train(small_config(tiny_csv, tmp_path, epochs=1, limit_train=16, **settings))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == ([f"note: {note}"] if note else [])


def test_a_resumed_run_keeps_its_levers(tiny_csv: Path, tmp_path: Path) -> None:
    run_dir = train(small_config(tiny_csv, tmp_path, epochs=2, average="ema"), stop_after_epochs=1).run_dir
    for change in ("average=none", "sam_rho=0.05", "mixup_alpha=0.2", "ema_decay=0.9", "mix_prob=0.5"):
        with pytest.raises(ValueError, match="a resumed run keeps its saved config"):
            TrainConfig().resume_changes([change])
        result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--no-progress", change])
        assert result.exit_code == 2 and "a resumed run keeps its saved config" in result.output, result.output
    with pytest.raises(ValueError, match="cannot change sam_rho"):
        train(resume=run_dir, changes={"sam_rho": 0.05})
    # A checkpoint that lacks the average its config asks for is refused clearly.
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del ckpt["average"]
    torch.save(ckpt, run_dir / "checkpoint.pt")
    with pytest.raises(TrainingError, match="does not fit its config.json"):
        train(resume=run_dir)


@pytest.mark.parametrize("dropped", [("val_weights", "raw_val_acc"), ("raw_val_acc",)])
def test_metrics_written_before_the_newer_columns_still_resume(tiny_csv: Path, tmp_path: Path,
                                                                dropped: tuple[str, ...]) -> None:
    full = train(small_config(tiny_csv, tmp_path / "full", epochs=2))
    run_dir = train(small_config(tiny_csv, tmp_path / "old", epochs=2), stop_after_epochs=1).run_dir
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    columns = {lines[0].split(",").index(name) for name in dropped}
    (run_dir / "metrics.csv").write_text("".join(",".join(f for i, f in enumerate(line.split(",")) if i not in columns)
                                                 + "\n" for line in lines))  # as an older ferkit wrote it
    resumed = train(resume=run_dir)
    assert without_timing(resumed.history) == without_timing(full.history)


def test_an_averaging_run_records_its_raw_weights_accuracy(tiny_csv: Path, tmp_path: Path) -> None:
    # The control of a weight-averaging ablation, in the same run: the trained (raw) weights' PublicTest accuracy.
    result = train(small_config(tiny_csv, tmp_path / "swa", model=BN_MODEL, epochs=4, lr=0.05, average="swa",
                                swa_start=0.5))
    rows = trainer._read_metrics(result.run_dir / "metrics.csv")
    assert [r["val_weights"] for r in rows] == ["raw", "raw", "swa", "swa"]
    assert rows[0]["raw_val_acc"] == rows[0]["val_acc"]  # before SWA averages anything, the raw weights are scored
    model, meta = load_model(result.run_dir / "last.safetensors")
    model.load_state_dict(torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"])
    public = load_dataset(str(tiny_csv)).split("PublicTest")
    probs = predict_proba(model, public.images, input_size=meta["input_size"])
    assert rows[-1]["raw_val_acc"] == float((probs.argmax(1) == public.labels).mean())
    assert result.history[-1]["raw_val_acc"] == rows[-1]["raw_val_acc"]
    plain = train(small_config(tiny_csv, tmp_path / "plain", epochs=2))
    assert all(r["raw_val_acc"] == r["val_acc"] for r in plain.history)
    # Rows written before the column existed: known where the raw weights were the evaluated ones, else NaN.
    metrics = result.run_dir / "metrics.csv"
    lines = metrics.read_text().splitlines()
    column = lines[0].split(",").index("raw_val_acc")
    metrics.write_text("".join(",".join(f for i, f in enumerate(line.split(",")) if i != column) + "\n"
                               for line in lines))
    old = trainer._read_metrics(metrics)
    assert all(r["raw_val_acc"] == r["val_acc"] for r in old[:2]) and all(np.isnan(r["raw_val_acc"]) for r in old[2:])


# ---- CUDA RNG state -----------------------------------------------------------------------------------------------


def test_the_cuda_rng_state_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    gpu_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    state = trainer._rng_state(cuda, SINGLE)
    assert torch.equal(state["cuda_rng"], gpu_state) and torch.equal(state["torch_rng"], torch.get_rng_state())
    trainer._restore_rng_state(state, cuda, SINGLE)
    assert len(restored) == 1 and torch.equal(restored[0][0], gpu_state) and restored[0][1] == cuda
    # A CPU checkpoint (or one saved before CUDA states were kept) resumes on a GPU without one; a CPU run
    # neither saves nor restores one.
    restored.clear()
    trainer._restore_rng_state({"torch_rng": torch.get_rng_state()}, cuda, SINGLE)
    assert restored == [] and "cuda_rng" not in trainer._rng_state(torch.device("cpu"), SINGLE)
    trainer._restore_rng_state(state, torch.device("cpu"), SINGLE)
    assert restored == []


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    # The CPU state restored from a saved checkpoint gives the same random numbers as the state saved.
    torch.manual_seed(5)
    state = trainer._rng_state(torch.device("cpu"), SINGLE)
    expected = torch.rand(3)
    torch.save(state, tmp_path / "c.pt")
    torch.manual_seed(6)
    trainer._restore_rng_state(torch.load(tmp_path / "c.pt", weights_only=True), torch.device("cpu"), SINGLE)
    assert torch.equal(torch.rand(3), expected)
