"""fp16 training with dynamic loss scaling (torch's GradScaler): small gradients survive fp16, an overflowing step
is skipped (not counted as divergence), the scale is checkpointed so a resumed run continues bit for bit, and it
composes with SAM/ASAM, grad_clip, EMA and torchrun. bf16 and fp32 have no scaler.

On CPU, torch's autocast computes in fp16 and GradScaler("cpu") scales as on CUDA, so the trainer's own path runs
here. Where a test needs the scale to move within a few steps, it starts GradScaler with a huge initial scale
(the first steps overflow and are skipped) and a short growth interval."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file
from test_training import small_config, without_timing
from test_training_levers import BN_MODEL, STEPS_PER_EPOCH, tiny_net
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import ferkit.training.trainer as trainer
from ferkit.training import TrainingError, train
from ferkit.training.levers import sam_gradient

FP16 = dict(precision="fp16")


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture
def scaler_kwargs(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[dict]]:
    """`scaler_kwargs(init_scale=..., growth_interval=...)`: the trainer's GradScaler starts with these settings;
    returns the list of the keyword arguments each GradScaler the trainer made was given (device first)."""
    real = torch.amp.GradScaler

    def patch(**settings) -> list[dict]:
        made: list[dict] = []

        def make(device: str = "cuda", **kwargs) -> torch.amp.GradScaler:
            made.append({"device": device} | kwargs)
            return real(device, **(settings | kwargs))

        monkeypatch.setattr(torch.amp, "GradScaler", make)
        return made

    return patch


@pytest.fixture
def optimizer_steps() -> list[int]:
    """One entry per optimizer.step() that ran (a step GradScaler skips never calls it)."""
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
    yield steps
    handle.remove()


# ---- what the scaling is for ------------------------------------------------------------------------------------


@pytest.mark.parametrize("levers", [dict(), dict(sam_rho=0.05, sam_adaptive=True)], ids=["plain", "asam"])
def test_small_gradients_survive_fp16(tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      levers: dict) -> None:
    # A loss 1000x smaller (as late in training) has gradients below fp16's range: unscaled, fp16 backward flushes
    # most of them to zero. With loss scaling, the step's gradients are the fp32 run's up to fp16 rounding (with
    # ASAM: the gradients of its second pass, at the weights it perturbed by the first pass's).
    real_loss = trainer._batch_loss
    monkeypatch.setattr(trainer, "_batch_loss", lambda *args: real_loss(*args) * 1e-3)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def first_step_gradients(precision: str) -> dict[str, torch.Tensor]:
        def record(optimizer, args, kwargs) -> None:
            seen.setdefault(precision, {f"{i}": p.grad.clone() for i, p in
                                        enumerate(optimizer.param_groups[0]["params"]) if p.grad is not None})

        handle = register_optimizer_step_pre_hook(record)
        try:
            train(small_config(tiny_csv, tmp_path / precision, epochs=1, limit_train=16, precision=precision,
                               **levers))
        finally:
            handle.remove()
        return seen[precision]

    fp32, fp16 = first_step_gradients("fp32"), first_step_gradients("fp16")
    worst = max(float((fp16[k] - g).norm() / g.norm()) for k, g in fp32.items() if g.norm() > 0)
    assert worst < 0.1, worst  # unscaled fp16: about 1.6 (most gradients zero)


def test_an_fp16_run_scales_its_loss_and_checkpoints_the_scale(tiny_csv: Path, tmp_path: Path,
                                                               scaler_kwargs: Callable[..., list[dict]]) -> None:
    made = scaler_kwargs()
    result = train(small_config(tiny_csv, tmp_path, **FP16))
    assert made == [{"device": "cpu", "enabled": True}]
    state = checkpoint(result.run_dir)["scaler"]
    assert state["scale"] > 0 and set(state) >= {"scale", "growth_factor", "backoff_factor", "growth_interval",
                                                 "_growth_tracker"}
    assert manifest(result.run_dir)["loss_scale"] == state["scale"]
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]  # it learns


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_and_fp32_have_no_loss_scaling(tiny_csv: Path, tmp_path: Path, precision: str,
                                            scaler_kwargs: Callable[..., list[dict]]) -> None:
    # Their results are unchanged by loss scaling: the scaler is disabled (each call passes through) and nothing
    # of it is saved.
    made = scaler_kwargs()
    result = train(small_config(tiny_csv, tmp_path, epochs=1, precision=precision, sam_rho=0.05, grad_clip=1.0))
    assert made == [{"device": "cpu", "enabled": False}]
    assert "scaler" not in checkpoint(result.run_dir) and "loss_scale" not in manifest(result.run_dir)


# ---- skipped steps ----------------------------------------------------------------------------------------------


def scaled_gradients(model: torch.nn.Module, scaler: torch.amp.GradScaler, grad: float) -> None:
    """The backward pass of a scaled loss whose gradient is `grad` for every weight."""
    model.zero_grad(set_to_none=True)
    scaler.scale(sum(p.sum() for p in model.parameters()) * grad).backward()


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_an_overflowing_step_is_skipped_and_the_scale_halves(grad_clip: float) -> None:
    cfg = small_config(Path("unused"), Path("unused"), grad_clip=grad_clip)
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for bad in (math.inf, math.nan):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        scale = scaler.get_scale()
        scaled_gradients(model, scaler, 0.01)
        next(model.parameters()).grad[0] = bad
        assert trainer._optimizer_step(cfg, model, optimizer, scaler) is False
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # untouched
        assert optimizer.state_dict()["state"] == {}  # no momentum taken from the skipped gradient
        assert scaler.get_scale() == scale / 2
    # Training goes on: finite gradients step, at the halved scale, from the true (unscaled, then clipped) ones.
    before = [p.detach().clone() for p in model.parameters()]
    scaled_gradients(model, scaler, 0.3)
    true_norm = 0.3 * math.sqrt(sum(p.numel() for p in model.parameters()))
    assert trainer._optimizer_step(cfg, model, optimizer, scaler) is True
    assert scaler.get_scale() == 256.0
    moved = torch.linalg.vector_norm(torch.cat([(b - p.detach()).flatten() for b, p in
                                                zip(before, model.parameters(), strict=True)]))
    assert float(moved) == pytest.approx(min(true_norm, grad_clip) if grad_clip else true_norm, rel=1e-6)


def test_a_disabled_scaler_steps_as_a_plain_optimizer() -> None:
    cfg = small_config(Path("unused"), Path("unused"), grad_clip=0.5)
    plain, scaled = tiny_net(), tiny_net()
    for model in (plain, scaled):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.3)
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    assert trainer._optimizer_step(cfg, scaled, torch.optim.SGD(scaled.parameters(), lr=0.1),
                                   torch.amp.GradScaler("cpu", enabled=False)) is True
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q)


def test_overflowing_steps_in_training_are_skipped_and_it_goes_on(tiny_csv: Path, tmp_path: Path,
                                                                  scaler_kwargs: Callable[..., list[dict]],
                                                                  optimizer_steps: list[int]) -> None:
    # Starting at 2^24, the first steps overflow: each is skipped (no optimizer step, no EMA update), halves the
    # scale, and is no divergence; the loss stays finite and the run trains on once the scale fits.
    scaler_kwargs(init_scale=2.0 ** 24)
    result = train(small_config(tiny_csv, tmp_path, model=BN_MODEL, average="ema", **FP16))
    total = 3 * STEPS_PER_EPOCH
    skipped = total - len(optimizer_steps)
    assert 3 <= skipped < total
    state = checkpoint(result.run_dir)
    assert state["scaler"]["scale"] == 2.0 ** 24 / 2 ** skipped  # halved once per skipped step, never grown
    assert int(state["average"]["n_averaged"]) == len(optimizer_steps)  # EMA averaged the steps taken alone
    assert len(result.history) == 3 and all(math.isfinite(row["train_loss"]) for row in result.history)
    assert state["step"] == total  # every batch counts (the schedule follows the batches)


def test_a_first_skipped_step_does_not_warn_about_the_schedule(tiny_csv: Path, tmp_path: Path,
                                                               scaler_kwargs: Callable[..., list[dict]]) -> None:
    # The schedule follows the batches, skipped or not; torch would take that for calls out of order.
    scaler_kwargs(init_scale=2.0 ** 40)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        train(small_config(tiny_csv, tmp_path, epochs=1, schedule="cosine", **FP16))
    assert not [w for w in warned if "lr_scheduler.step()" in str(w.message)]


def test_gradients_that_stay_non_finite_are_divergence(tiny_csv: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      scaler_kwargs: Callable[..., list[dict]]) -> None:
    # NaN gradients at every scale, with a finite loss: each step is skipped and the scale halves; once it is below
    # MIN_LOSS_SCALE the run stops as diverged instead of going on without learning.
    real_create = trainer.create_model

    def nan_gradients(*args, **kwargs) -> torch.nn.Module:
        model = real_create(*args, **kwargs)
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, math.nan))
        return model

    monkeypatch.setattr(trainer, "create_model", nan_gradients)
    scaler_kwargs(init_scale=1e-3)  # below 1e-4 after 4 skipped steps; the epoch's end (5 steps) checks it
    with pytest.raises(TrainingError, match=r"diverged in epoch 1: the fp16 gradients stayed NaN or infinite however "
                                            r"far the loss scale fell \(to 3.13e-05, below 0.0001; steps 1-5\)"):
        train(small_config(tiny_csv, tmp_path, **FP16))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_fp16_run_whose_loss_explodes_still_stops_as_diverged(tiny_csv: Path, tmp_path: Path) -> None:
    # Skipped steps are no divergence, but a non-finite loss still is (as in bf16 and fp32).
    with pytest.raises(TrainingError, match="training diverged in epoch 1: the training loss became NaN or infinite"):
        train(small_config(tiny_csv, tmp_path, lr=1e6, **FP16))


# ---- SAM / ASAM -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_perturbs_by_the_true_gradients_of_a_scaled_loss(adaptive: bool) -> None:
    # The scale cancels in e = rho T(Tg)/||Tg|| except in the 1e-12 guard, which is meant for the true gradients:
    # with gradients near it (a tiny loss) a perturbation from the scaled ones would differ by far.
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    tiny, scale = 1e-12, 2.0 ** 16

    def loss(model: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(x), y) * tiny

    plain, scaled = tiny_net(), tiny_net()
    loss(plain).backward()
    sam_gradient(plain, lambda: loss(plain).backward(), 0.05, adaptive)
    (loss(scaled) * scale).backward()
    sam_gradient(scaled, lambda: (loss(scaled) * scale).backward(), 0.05, adaptive, loss_scale=scale)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q)
        torch.testing.assert_close(q.grad / scale, p.grad, rtol=1e-9, atol=0)


def test_sam_leaves_an_overflowed_first_pass_for_the_scaler_to_skip() -> None:
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    model = tiny_net()
    F.cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    second_pass = []
    sam_gradient(model, lambda: second_pass.append(1), 0.05, loss_scale=1024.0)
    assert second_pass == []  # no perturbation from non-finite gradients, no second pass
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))  # inf kept


# ---- resume -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levers", [
    dict(),
    dict(model=BN_MODEL, sam_rho=0.05, sam_adaptive=True, grad_clip=1.0, average="ema", schedule="onecycle"),
], ids=["plain", "asam_clip_ema"])
def test_a_resumed_fp16_run_matches_the_uninterrupted_one(tiny_csv: Path, tmp_path: Path, levers: dict,
                                                          scaler_kwargs: Callable[..., list[dict]]) -> None:
    # The scale moves in the first epoch (skipped steps from 2^20, growth every 3 steps): a resume that did not
    # restore it, or its growth tracker, would step differently.
    scaler_kwargs(init_scale=2.0 ** 20, growth_interval=3)
    full = train(small_config(tiny_csv, tmp_path / "full", **FP16, **levers))
    killed = train(small_config(tiny_csv, tmp_path / "resumed", **FP16, **levers), stop_after_epochs=1)
    assert checkpoint(killed.run_dir)["scaler"]["scale"] != 2.0 ** 20
    resumed = train(resume=killed.run_dir)
    assert without_timing(resumed.history) == without_timing(full.history)
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(full.run_dir / name)), load_file(str(resumed.run_dir / name))
        assert all(torch.equal(v, b[k]) for k, v in a.items()), name
    assert checkpoint(resumed.run_dir)["scaler"] == checkpoint(full.run_dir)["scaler"]
    assert manifest(resumed.run_dir)["loss_scale"] == manifest(full.run_dir)["loss_scale"]


def test_an_fp16_checkpoint_without_a_scaler_still_resumes(tiny_csv: Path, tmp_path: Path) -> None:
    # As ferkit saved fp16 runs before it scaled their loss: the run goes on from the default scale.
    run_dir = train(small_config(tiny_csv, tmp_path, **FP16), stop_after_epochs=1).run_dir
    state = checkpoint(run_dir)
    del state["scaler"]
    torch.save(state, run_dir / "checkpoint.pt")
    result = train(resume=run_dir)
    assert result.epochs_run == 3 and "scaler" in checkpoint(run_dir)


# ---- torchrun ---------------------------------------------------------------------------------------------------

SCALED_WORKER_PATCH = """
# Each process records, step by step, whether it stepped and its loss scale after the step.
import functools
import torch
from ferkit.training import trainer

torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20, growth_interval=3)
step, steps = trainer._optimizer_step, []

def recorded(cfg, model, optimizer, scaler):
    steps.append([step(cfg, model, optimizer, scaler), scaler.get_scale()])
    return steps[-1][0]

trainer._optimizer_step = recorded
"""


@pytest.mark.slow
def test_two_processes_skip_the_same_steps(tmp_path: Path, cache_dir: Path) -> None:
    # DDP averages the gradients before the scaler looks at them (and before SAM's check of the first pass), so
    # every process skips the same steps and keeps the same scale: their weights stay one model.
    from test_distributed import cli_worker, torchrun, train_cli

    data = write_csv(tmp_path / "tiny.csv", synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35}))
    worker = tmp_path / "scaled_worker.py"
    worker.write_text(cli_worker(SCALED_WORKER_PATCH, records="steps"))
    args = [a for a in train_cli(data, tmp_path / "runs", "--name", "r") if a != "precision=fp32"][2:]
    done = torchrun(2, [str(worker), *args, "precision=fp16", "sam_rho=0.05", "grad_clip=1"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"steps{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and len(rank0) == 3 * STEPS_PER_EPOCH
    assert [stepped for stepped, _ in rank0].count(False) >= 2 and any(stepped for stepped, _ in rank0)
    state = checkpoint(tmp_path / "runs" / "r")
    assert state["world_size"] == 2 and state["scaler"]["scale"] == rank0[-1][1]
