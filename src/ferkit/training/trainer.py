"""The training loop, readable top to bottom: data -> model -> optimizer -> epochs -> run directory.

A run directory holds: config.json, metrics.csv, curves.png, best.safetensors (best PublicTest
accuracy), last.safetensors, checkpoint.pt (everything needed to resume) and manifest.json.
Selection uses PublicTest only; PrivateTest is never touched here (report it with `ferkit evaluate`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ferkit.data import FaceData, file_sha256, get_label_set, load_dataset
from ferkit.data.augment import augment, center_crop, normalize, resize, to_float
from ferkit.device import autocast, precision_name, resolve_device, resolve_precision
from ferkit.models import count_parameters, create_model
from ferkit.models.finetune import parameter_groups
from ferkit.models.predict import (
    NonFiniteOutputError,
    model_tta,
    predict_proba,
    tencrop_source_size,
)
from ferkit.models.pretrained import check_pretrained, is_ferkit_weights, load_pretrained
from ferkit.models.weights import SHIPPED_MODELS, load_model, read_metadata, resolve_weights, save_weights
from ferkit.shared_files import claimed, replacing, write_rows
from ferkit.training import distill, distributed, levers, teacher_views
from ferkit.training.config import RESUME_SETTINGS, TrainConfig
from ferkit.training.crossfit import CrossfitTargets, training_faces
from ferkit.training.report import (
    command_line,
    git_commit,
    hardware,
    library_versions,
    plot_curves,
    read_json,
    write_json,
)

# val_weights: the weights PublicTest evaluated (and best/last saved): 'raw' (the trained weights), or the average
# that `average` keeps ('ema', 'swa'; SWA's first epochs, before it averages anything, are 'raw').
# raw_val_acc: the trained weights' own PublicTest accuracy (= val_acc when those were evaluated), so a run with
# weight averaging carries its own control: what the average added over the weights it averages, epoch by epoch.
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_weights",
                 "raw_val_acc", "seconds")
CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scheduler", "torch_rng", "generator", "epoch", "step", "best_acc",
                             "best_epoch", "stale", "elapsed"})
# Steps between checks that the training loss is finite: each check waits for the device, so not every step.
FINITE_CHECK_EVERY = 50
# fp16 loss scaling: a scale below this means the gradients were inf or NaN at every scale tried, step after step
# (each skipped step halves it): the run diverged, though its loss may still be finite. fairseq stops at the same
# floor (its min_loss_scale, 1e-4). Healthy runs keep scales of thousands and more (2^15-2^18 in the tests' runs).
MIN_LOSS_SCALE = 1e-4


@dataclass
class RunResult:
    run_dir: Path
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]]  # metrics.csv's rows: numbers, and val_weights's name


class TrainingError(Exception):
    """A run that cannot start, go on or be saved; the message says why and what to do (the CLI prints it)."""


class _SaveError(TrainingError):
    """A run's files could not be written (a full disk): the run stays, to resume once there is space."""


def train(cfg: TrainConfig | None = None, resume: str | os.PathLike | None = None, data: FaceData | None = None,
          stop_after_epochs: int | None = None, changes: dict[str, Any] | None = None) -> RunResult:
    """Train `cfg.model` on the Training split, selecting on PublicTest.

    cfg: the configuration of a new run, which gets a directory of its own (`create_run`); not with `resume` (a
        resumed run trains with its directory's config.json, and `changes`).
    resume: a run directory; continues from its checkpoint.pt with its saved config (from the first epoch when
        no epoch was saved yet).
    changes: when resuming, new values for RESUME_SETTINGS (threads, time_limit, early_stopping, progress), e.g. from
        `TrainConfig.resume_changes`; they are saved to the run's config.json for the rest of the run.
    data: an already loaded dataset (tests, notebooks); by default `cfg.data` is loaded.
    stop_after_epochs: end this call after that many epochs, as a kill would (tests of resume).

    Raises TrainingError when the run directory is taken, in use, damaged or cannot be written, and when
    training diverges. A new run that fails before its first checkpoint (bad data, settings that do not fit)
    leaves no directory behind, so its name can be used again (`removed_on_failure`).

    Started by torchrun (WORLD_SIZE > 1), the processes train the run together (`ferkit.training.distributed`):
    rank 0 makes, holds and writes the run directory; every process returns the same RunResult.
    """
    if resume is None:
        if changes:
            raise ValueError("changes apply to a resumed run; pass the settings in cfg for a new one")
        if cfg is None:
            raise ValueError("train() needs a TrainConfig or a run directory to resume")
    elif cfg is not None:
        raise ValueError("a resumed run trains with its saved config.json: pass resume= alone, and changes= for "
                         f"its run settings ({', '.join(RESUME_SETTINGS)})")
    with distributed.processes() as d, contextlib.ExitStack() as stack:
        if not d.main:  # one voice: rank 0 prints (errors still reach stderr on every process)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))

        def start() -> tuple[Path, TrainConfig, dict | None, list[dict]]:  # rank 0's part: the files
            if resume is None:
                run_dir = create_run(cfg)
            else:
                run_dir = Path(resume)
                if not (run_dir / "config.json").is_file() and not (run_dir / "checkpoint.pt").is_file():
                    raise FileNotFoundError(f"cannot resume: {run_dir} holds no run (no config.json or checkpoint.pt)")
            stack.enter_context(hold_run(run_dir))
            return run_dir, *_read_run(run_dir, changes)

        run_dir, cfg, state, history = d.from_rank0(start)
        cfg.progress = cfg.progress and d.main  # a resumed run's: as it started, unless `changes` say otherwise
        saved_by = int(state.get("world_size", 1)) if state is not None else d.world_size
        if saved_by != d.world_size:
            raise TrainingError(
                f"cannot resume {run_dir} with {_processes(d.world_size)}: its checkpoint was trained by "
                f"{_processes(saved_by)}, and a run resumes exactly only as it trained (the processes' shares of "
                f"each batch, their BatchNorm statistics and dropout draws). Resume it with "
                + (f"`ferkit train --resume {run_dir}` (one process)" if saved_by == 1 else
                   f"`torchrun --nproc_per_node {saved_by} -m ferkit train --resume {run_dir}` (or the same "
                   f"number of processes over several hosts)")
                + ", or start a new run from its weights: init_weights=" + str(run_dir / "last.safetensors"))
        if resume is not None and state is None:
            print(f"{run_dir} saved no epoch yet: training it from its first epoch", flush=True)
        with removed_on_failure(run_dir, resume is None and d.main):  # rank 0 alone touches the files
            return _train(cfg, run_dir, state, history, data, stop_after_epochs, d)


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


_HELD: set[Path] = set()  # run directories this process holds


@contextlib.contextmanager
def hold_run(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run directory for this process while the block runs (a TrainingError at once when another
    process holds it): one process at a time trains or updates a run. Nested holds in one process are free."""
    key = Path(run_dir).resolve()
    if key in _HELD:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(claimed(key))
        except BlockingIOError:
            raise TrainingError(f"{run_dir} is in use: another ferkit process is training in it") from None
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)


@contextlib.contextmanager
def removed_on_failure(run_dir: Path, new: bool = True, files: tuple[str, ...] = ("config.json",)) -> Iterator[None]:
    """The first training of a run directory this process just made (`new`; False: the block runs as is): when
    the block raises an Exception before the run's first checkpoint, the directory is removed, so that the same
    name can be tried again (its data or settings were wrong: with its config.json kept, `--name` would be
    refused and `--resume` would retry the same settings).

    Removed only while it holds nothing but `files`, what this process wrote into it. Kept: a run whose save
    failed (a full disk: it resumes once there is space), one that wrote anything else (weights, snapshots,
    someone's file), and one stopped by a KeyboardInterrupt or a kill, which resumes from its first epoch."""
    try:
        yield
    except Exception as e:
        if new and not isinstance(e, _SaveError) and not (run_dir / "checkpoint.pt").exists():
            with contextlib.suppress(OSError):  # a directory that cannot be removed stays, to resume or delete
                if {p.name for p in run_dir.iterdir()} <= set(files):
                    for name in files:
                        (run_dir / name).unlink(missing_ok=True)
                    run_dir.rmdir()
        raise


def create_run(cfg: TrainConfig) -> Path:
    """Check `cfg` (settings, model, device, teacher and initial weights), then make its run directory with its
    config.json, ready for `train(resume=...)`. The directory is always a new one: an explicit `run_name` that
    exists is an error, a default name (<model>-<time>) taken by a run started in the same second gets a suffix.
    """
    # What can be checked without the data fails here, before any files: a run directory left by a typo would
    # hold the name.
    cfg.validate()
    try:
        with torch.device("meta"):  # shapes and names only: no memory, no initialization (_train builds the model)
            model = create_model(cfg.model, num_classes=get_label_set(cfg.label_set).num_classes, **cfg.model_kwargs)
    except TypeError as e:  # a keyword the model's builder does not take
        raise ValueError(f"model_kwargs {cfg.model_kwargs} do not fit model {cfg.model}: {e}") from e
    parameter_groups(model, cfg.freeze, cfg.backbone_lr_scale, cfg.lr)  # a freeze= part naming no parameter
    resolve_precision(cfg.precision, resolve_device(cfg.device))
    _start_weights(cfg)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir (--out) {out} is a file, not a folder for run directories")
    if cfg.run_name:
        run_dir = out / cfg.run_name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()  # exclusive: never two runs in one directory
        except FileExistsError:
            what = (f"holds a run: continue it with `ferkit train --resume {run_dir}`"
                    if (run_dir / "config.json").is_file() else "exists (not a ferkit run: no config.json)")
            raise TrainingError(f"run directory {run_dir} {what}, or choose another --name") from None
    else:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{cfg.model.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"  # timm:NAME -> timm-NAME
        for n in itertools.count(1):
            run_dir = out / (stem if n == 1 else f"{stem}-{n}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    # Written before any training, so a run killed (or out of disk) before its first checkpoint can be resumed.
    write_json(run_dir / "config.json", cfg.to_dict())
    return run_dir


def _read_run(run_dir: Path, changes: dict[str, Any] | None) -> tuple[TrainConfig, dict | None, list[dict]]:
    """A run directory's config (with `changes` applied and saved), its checkpoint (None before the first) and
    its metrics rows up to that checkpoint; a damaged file is a TrainingError naming it."""
    config_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    try:
        cfg = TrainConfig.from_dict(read_json(config_path))
        cfg.validate()
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise TrainingError(f"cannot resume {run_dir}: its config.json is missing or damaged ({e}); manifest.json "
                            "keeps a copy of it under \"config\" once an epoch was saved") from e
    if changes:
        if fixed := sorted(set(changes) - set(RESUME_SETTINGS)):
            raise ValueError(f"cannot change {', '.join(fixed)} of a resumed run (only {', '.join(RESUME_SETTINGS)})")
        cfg = replace(cfg, **changes)
        write_json(config_path, cfg.to_dict())
    if not ckpt_path.is_file():
        return cfg, None, []
    try:
        # torch.load fails on a damaged file in many ways (EOFError, RuntimeError, UnpicklingError, ...).
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if missing := sorted(CHECKPOINT_KEYS - set(state)):
            raise ValueError(f"it lacks {', '.join(missing)}")
        history = _read_metrics(run_dir / "metrics.csv")[:int(state["epoch"])]
        # metrics.csv is written before each checkpoint, so it holds a row for every epoch the checkpoint has:
        # fewer (a truncated or edited file) would silently drop those epochs from the run's record.
        if [row["epoch"] for row in history] != list(range(1, int(state["epoch"]) + 1)):
            raise ValueError(f"metrics.csv holds epochs {[row['epoch'] for row in history][:12]} where checkpoint.pt "
                             f"has trained {int(state['epoch'])}")
    except Exception as e:
        raise TrainingError(f"cannot resume {run_dir}: its checkpoint.pt or metrics.csv is damaged ({e}); delete "
                            f"checkpoint.pt to train the run again from its first epoch") from e
    return cfg, state, history


def _train(cfg: TrainConfig, run_dir: Path, state: dict | None, history: list[dict[str, Any]],
           data: FaceData | None, stop_after_epochs: int | None, d: distributed.Dist = distributed.SINGLE) -> RunResult:
    """The run in `run_dir` with config `cfg`, from `state` (its checkpoint; None: from the start), trained by
    the processes `d` (rank 0 alone writes files; see `ferkit.training.distributed` for what each one does)."""
    device = distributed.local_device(resolve_device(cfg.device), d)
    amp_dtype = resolve_precision(cfg.precision, device)
    start_weights = _start_weights(cfg, resumed=run_dir if state is not None else None)  # for the manifest

    # The code this call runs, read before any long work (data loading, a teacher pass): commits made while
    # the run trains must not be credited with it.
    commit = git_commit()

    # ---- determinism -------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)  # drives shuffling and augmentation

    # ---- data --------------------------------------------------------------------------------
    data = data if data is not None else load_dataset(cfg.data, cfg.label_set, skip_bad_rows=cfg.skip_bad_rows,
                                                      labels=cfg.labels or None, label_mode=cfg.label_mode)
    train_set, val_set = training_faces(data, cfg), data.split("PublicTest")
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"{cfg.data}: need Training and PublicTest rows, got {len(train_set)} and {len(val_set)}")
    # The training faces live on the training device (~66 MB of uint8 for FER2013): batches are cut, converted
    # and augmented there, so a GPU is not fed through the CPU one batch at a time.
    train_images = torch.from_numpy(train_set.images).to(device)
    train_labels = torch.from_numpy(train_set.labels).to(device)
    # What the loss aims at: the labels, or (label_mode soft) each face's crowd vote distribution.
    train_targets = (torch.from_numpy(train_set.soft_labels).to(device)
                     if cfg.label_mode == "soft" and train_set.soft_labels is not None else train_labels)
    num_classes = data.label_set.num_classes

    # ---- model, loss, optimizer, schedule ----------------------------------------------------
    model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs).to(device)
    input_size = model.input_size
    if hasattr(model, "fit_preprocessing") and state is None:
        # Models with a data-fitted input stage (e.g. PCA) fit it once on the un-augmented training faces;
        # the fitted buffers live in the state dict, so resume and saved weights carry them.
        model.fit_preprocessing(normalize(resize(to_float(train_images), input_size), cfg.normalize).to(device))
    if cfg.init_weights and state is None:
        _load_initial_weights(model, cfg)
    # Crop training cuts input-size windows out of larger faces and selects on the centre window (see TrainConfig).
    crop = input_size if cfg.train_view == "crop" else 0
    face_size = tencrop_source_size(input_size) if crop else input_size
    val_tta = "center" if crop else "none"
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if d.active:
        _check_shares(cfg, len(train_set), len(val_set), device, d)
        if cfg.sync_batchnorm:  # BatchNorm on the global batch's statistics (the same Parameters: see torch)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    class_weight = None
    if cfg.class_weights == "balanced":
        counts = np.bincount(train_set.labels, minlength=num_classes).clip(min=1)
        class_weight = torch.tensor(len(train_set) / (num_classes * counts), dtype=torch.float32, device=device)
    online = bool(cfg.teacher) and cfg.distill_view == "online"
    cached = bool(cfg.teacher) and cfg.distill_view == "cached"  # views and their targets: built before epoch 1
    teacher_probs = (distill.teacher_probabilities(cfg, train_set, device).to(device)
                     if cfg.teacher and cfg.distill_view == "offline" else None)
    online_teacher = distill.online_teacher(cfg, device, amp_dtype) if online else None
    optimizer = _make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    scheduler = _make_scheduler(cfg, optimizer, steps_per_epoch)
    averaged = levers.averaged_model(model, cfg)  # the EMA or SWA weights (average=none: None)
    mixing = levers.mixes(cfg)
    # fp16 autocast needs dynamic loss scaling, or gradients below fp16's range (~6e-8) underflow to zero: the
    # loss is scaled up for the backward pass and the gradients scaled back before the step, which is skipped
    # (and the scale halved) when they overflowed. bf16 has fp32's range and fp32 needs none: for them the scaler
    # is disabled, and each of its calls passes its argument through unchanged.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume ------------------------------------------------------------------------------
    start_epoch, step, best_acc, best_epoch, stale, elapsed = 0, 0, -1.0, 0, 0, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            if averaged is not None:
                averaged.load_state_dict(state["average"])
            if scaler.is_enabled() and "scaler" in state:  # a checkpoint from before loss scaling: the default scale
                scaler.load_state_dict(state["scaler"])
            _restore_rng_state(state, device, d)
            gen.set_state(state["generator"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise TrainingError(f"cannot resume {run_dir}: its checkpoint.pt does not fit its config.json ({e})") from e
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_acc, best_epoch, stale = float(state["best_acc"]), int(state["best_epoch"]), int(state["stale"])
        elapsed = float(state["elapsed"])
    # This call's stretch of training, as the manifest records it beside the others (a run resumed on another
    # machine, with other code or for a longer time limit keeps what each part of it ran on).
    stretch = {"started": datetime.now(UTC).isoformat(timespec="milliseconds"), "command": command_line(),
               "commit": commit, "hardware": hardware(), "device": str(device), "world_size": d.world_size,
               "precision": precision_name(amp_dtype),
               "first_epoch": start_epoch + 1}
    elapsed_before = elapsed
    net = model  # what the training steps call: the model, or (several processes) its DDP wrapper
    if d.active:
        # Each process draws its own dropout masks from the global torch RNG (a resumed one: its own saved state,
        # `_restore_rng_state`); rank 0's stream is the one a one-process run would use.
        if state is None and d.rank:
            torch.manual_seed(cfg.seed + 1_000_003 * d.rank)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    weights_meta = {"model": cfg.model, "num_classes": num_classes, "classes": list(data.label_set.classes),
                    "label_set": data.label_set.name, "input_size": input_size, "normalize": cfg.normalize,
                    "model_kwargs": cfg.model_kwargs, "train_view": cfg.train_view,  # train_view: see model_tta
                    # the mean training target: the class prior the model learns (models.prior, --prior uniform)
                    "class_prior": [round(float(v), 6) for v in class_prior(train_set, cfg.label_mode,
                                                                             cfg.class_weights)]}

    print(f"ferkit train: {cfg.model} ({count_parameters(model) / 1e6:.2f} M params) on {device}"
          f" [{'fp32' if amp_dtype is None else str(amp_dtype).removeprefix('torch.')}]; "
          f"{len(train_set)} train / {len(val_set)} PublicTest faces; run dir {run_dir}", flush=True)
    if d.active:
        print(f"{d.world_size} processes: each takes {cfg.batch_size // d.world_size} faces of every batch of "
              f"{cfg.batch_size}{' (SyncBatchNorm)' if cfg.sync_batchnorm else ''}", flush=True)
    for note in levers.ignored_settings(cfg):
        print(f"note: {note}", flush=True)

    def forward_loss(x: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None,
                     rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of this process's faces `x` (its `rows` of the batch) and its loss (`_batch_loss`)."""
        with autocast(device, amp_dtype):
            logits = net(x)
        return logits, _batch_loss(cfg, logits.float(), targets, class_weight, teacher, rows, d)

    def backward(x: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, rows: slice) -> None:
        scaler.scale(forward_loss(x, targets, teacher, rows)[1]).backward()

    # ---- epochs ------------------------------------------------------------------------------
    epochs_this_call = 0
    # A run that stopped early or used up its time limit is finished: resuming it (e.g. to re-report it) must
    # not train on.
    finished = _stop_reason(cfg, stale, elapsed) is not None
    checked = step  # the last step whose loss was checked finite
    views = None  # distill_view=cached: (views, faces) uint8 training faces; teacher_probs then (views, faces, C)
    if cached and not finished and start_epoch < cfg.epochs:  # (a run over has no use for them)
        views, teacher_probs, seconds = distill.cached_views(cfg, run_dir,
                                                             start_weights["teacher"]["sha256"] or "", train_images,
                                                             num_classes, face_size, crop, device, amp_dtype, d)
        if seconds:  # teacher passes, not training: outside `elapsed` and time_limit, but on the record
            stretch["teacher_views_seconds"] = round(seconds, 1)
    if teacher_probs is not None and mixing:  # offline or cached targets (online ones are made per batch)
        # The distillation targets are tempered distributions, and a mixed batch mixes its faces' targets: tempered
        # once here, before any mixing (distillation_loss then takes them as they are).
        teacher_probs = distill.temper(teacher_probs, cfg.distill_temperature)
    for epoch in range(start_epoch, start_epoch if finished else cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(len(train_set), generator=gen).to(device)
        # Running sums stay on the device: reading them every step would make the CPU wait for each GPU step.
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not cfg.progress, dynamic_ncols=True, leave=False)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            # What the loss aims at for these faces: their targets and (distillation) the teacher's probabilities.
            targets = train_targets[idx]
            if views is not None:  # cached: one of each face's augmented views, and the teacher's answer on it
                x, teacher = teacher_views.draw(views, teacher_probs, idx, gen)
            else:
                x = augment(resize(to_float(train_images[idx]), face_size), cfg.augment, gen, crop=crop)
                teacher = teacher_probs[idx] if teacher_probs is not None else None
            if mixing:  # as distributions, mixed on the whole batch before any process takes its share
                x, targets, teacher, _ = levers.mix_batch(x, levers.as_distribution(targets, num_classes), teacher,
                                                          cfg, gen)
            # Several processes: every process drew, augmented and mixed the whole batch alike; each keeps its share.
            rows = d.shard(len(idx)) if d.active else slice(None)
            if online_teacher is not None:  # the teacher sees this share's faces as the student will (rows of a
                teacher = x.new_zeros(len(idx), num_classes)  # batch-sized tensor, as offline targets are)
                teacher[rows] = online_teacher(x[rows])
            x = normalize(x[rows], cfg.normalize).contiguous(memory_format=memory_format)
            y = train_labels[idx[rows]]
            logits, loss = forward_loss(x, targets, teacher, rows)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.sam_rho:  # the gradient at the weights SAM perturbs replaces this one; the step starts from here
                levers.sam_gradient(model, functools.partial(backward, x, targets, teacher, rows), cfg.sam_rho,
                                    cfg.sam_adaptive, loss_scale=_loss_scale(scaler))
            stepped = _optimizer_step(cfg, model, optimizer, scaler)  # False: an fp16 overflow, skipped
            if cfg.average == "ema" and stepped:  # the average of the weights stepped to, not of skipped steps
                averaged.update_parameters(model)
            step += 1
            if scheduler is not None and cfg.schedule != "plateau":
                _schedule_step(scheduler, stepped)
            # (Several processes: this share's part of the batch's loss sum; `seen` counts this share's faces.)
            loss_sum += loss.detach().double() * (len(idx) / d.world_size if d.active else len(y))
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if cfg.progress and (b % 20 == 0 or b == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
            snapshot = cfg.save_every and step % cfg.save_every == 0
            if snapshot or step % FINITE_CHECK_EVERY == 0:
                checked = _require_finite(cfg, epoch, checked, step, d.sum(loss_sum), model if snapshot else None,
                                          _loss_scale(scaler))
            if snapshot:
                d.from_rank0(functools.partial(_save_snapshot, run_dir, epoch, model, step, weights_meta))
        bar.close()
        if d.active:  # the epoch's totals over every process's shares
            loss_sum, correct, seen = d.sum(loss_sum), d.sum(correct), len(train_set)
            d.sync_buffers(model)  # every process evaluates (and rank 0 saves) rank 0's BatchNorm statistics
        # Nothing non-finite may become best, last or the checkpoint: the loss and the weights both.
        checked = _require_finite(cfg, epoch, checked, step, loss_sum, model, _loss_scale(scaler))
        if levers.swa_averages(cfg, epoch + 1):
            averaged.update_parameters(model)
            with autocast(device, amp_dtype):  # each process its share of the pass (see recompute_batchnorm)
                levers.recompute_batchnorm(averaged.module, functools.partial(_plain_batch, train_images, face_size,
                                                                              crop, cfg, memory_format),
                                           len(train_set), cfg.batch_size, device, d)
        if averaged is not None and d.active:  # each process averaged (or combined) its own BatchNorm statistics
            d.sync_buffers(averaged)
        # The weights PublicTest evaluates and best/last keep: the average, once it holds any.
        evaluated = averaged.module if averaged is not None and averaged.n_averaged > 0 else model
        val_weights = cfg.average if evaluated is not model else "raw"

        # Validation on PublicTest (model selection only); with an average, the trained weights too (its control).
        val_acc, val_loss = _public_test(evaluated, val_set, input_size, cfg, val_tta, amp_dtype, d, device, epoch)
        raw_val_acc, control_seconds = val_acc, 0.0
        if evaluated is not model:  # timed apart: time limits and `seconds` count what a run without it spends
            t_control = time.perf_counter()
            raw_val_acc = _public_test(model, val_set, input_size, cfg, val_tta, amp_dtype, d, device, epoch,
                                       "the trained (not averaged) weights' PublicTest predictions")[0]
            control_seconds = time.perf_counter() - t_control
        if cfg.schedule == "plateau":
            scheduler.step(val_acc)
        # rank 0's clock: every process stops at the same epoch
        seconds = d.broadcast(time.perf_counter() - t0 - control_seconds)
        elapsed += seconds
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
               "val_loss": val_loss, "val_acc": val_acc, "val_weights": val_weights, "raw_val_acc": raw_val_acc,
               "seconds": seconds}
        history.append(row)
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch, stale = val_acc, epoch + 1, 0
        else:
            stale += 1
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
              f"PublicTest acc{'' if val_weights == 'raw' else f' ({val_weights})'} {val_acc:.4f}"
              f"{' *' if improved else ''}{'' if val_weights == 'raw' else f' (raw {raw_val_acc:.4f})'}"
              f"  lr {row['lr']:.2e}  {seconds:.0f}s", flush=True)

        reason = _stop_reason(cfg, stale, elapsed) if epoch + 1 < cfg.epochs else None

        # Persist: best and last weights, metrics, curves, manifest, then the resume checkpoint, each atomically.
        # The checkpoint comes last: a run killed (or out of disk) before it resumes at this epoch, which
        # rewrites the others as they were.
        # Several processes: rank 0 writes (with every process's RNG state), the others wait for it.
        rng_states = _rng_state(device, d)
        if d.main:
            try:
                with _saving(run_dir, epoch):
                    if improved:
                        save_weights(evaluated, run_dir / "best.safetensors",
                                     weights_meta | {"epoch": epoch + 1, "public_test_acc": val_acc})
                    save_weights(evaluated, run_dir / "last.safetensors", weights_meta | {"epoch": epoch + 1})
                    _write_metrics(run_dir / "metrics.csv", history)
                    plot_curves(history, run_dir / "curves.png", title=f"{cfg.model} ({run_dir.name})")
                    _write_manifest(run_dir, cfg, data, commit, best_acc, best_epoch, epoch + 1, elapsed, device,
                                    reason, start_weights, d.world_size, _loss_scale(scaler),
                                    stretch | {"last_epoch": epoch + 1, "seconds": round(elapsed - elapsed_before, 1)})
                    _save_checkpoint(run_dir / "checkpoint.pt", {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else {},
                        **({"average": averaged.state_dict()} if averaged is not None else {}),
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                        **rng_states, "generator": gen.get_state(), "epoch": epoch + 1,
                        "step": step, "best_acc": best_acc, "best_epoch": best_epoch, "stale": stale,
                        "elapsed": elapsed, "world_size": d.world_size})
            except Exception as e:
                d.settle(e)  # the other processes stop with the same error
                raise
        d.settle(None)

        epochs_this_call += 1
        if reason is not None:
            print(reason, flush=True)
            break
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break

    if views is not None and d.main and (len(history) >= cfg.epochs or _stop_reason(cfg, stale, elapsed)):
        # The run is over: its views (a GB and more) were only kept to resume it; a longer early-stopping patience
        # given to a resume later builds them again.
        (run_dir / teacher_views.FILE_NAME).unlink(missing_ok=True)
    print(f"best PublicTest accuracy {best_acc:.4f} at epoch {best_epoch}; weights: {run_dir / 'best.safetensors'}",
          flush=True)
    return RunResult(run_dir, best_acc, best_epoch, len(history), history)


def _check_shares(cfg: TrainConfig, n_train: int, n_val: int, device: torch.device, d: distributed.Dist) -> None:
    """Settings that several processes cannot train as documented: a ValueError saying what to change."""
    if cfg.batch_size % d.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch, shared by {d.world_size} processes: "
                         f"make it a multiple of {d.world_size}")
    last = n_train % cfg.batch_size
    if 0 < last < d.world_size:
        raise ValueError(f"the epoch's last batch holds {last} faces, fewer than the {d.world_size} processes: "
                         f"change batch_size or limit_train")
    if n_val < d.world_size:
        raise ValueError(f"PublicTest holds {n_val} faces, fewer than the {d.world_size} processes")
    if cfg.sync_batchnorm and device.type != "cuda":
        raise ValueError("sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on CPU); on CPU "
                         "each process normalizes with the statistics of its own share of the batch")


def _optimizer_step(cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler) -> bool:
    """The optimizer step from the gradients the backward passes left, clipped to `cfg.grad_clip`; returns whether
    the weights stepped.

    A disabled `scaler` (bf16, fp32): a plain optimizer.step(). fp16: the gradients are scaled by the loss scale;
    GradScaler unscales them and skips the step when any is inf or NaN (the scale was too high: it halves, and
    training goes on; torch's AMP recipe), leaving the weights and the optimizer's state as they were. Such a
    skip is no divergence: the loss checks (`_require_finite`) judge that, and a scale that keeps falling."""
    if cfg.grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones (a no-op when disabled)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if not scaler.is_enabled():
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale  # update() lowers the scale exactly when step() skipped


def _loss_scale(scaler: torch.amp.GradScaler) -> float | None:
    """The fp16 loss scale now (waits for the device), or None when the run does not scale its loss."""
    return scaler.get_scale() if scaler.is_enabled() else None


def _schedule_step(scheduler: torch.optim.lr_scheduler.LRScheduler, stepped: bool) -> None:
    """Move the per-step schedule on one batch. It follows the batches, stepped or skipped by an fp16 overflow
    (as in torch's AMP recipe: the schedule's length is the run's batches). A run whose first step was skipped
    would get torch's warning that the calls are out of order; they are not, so it is left out."""
    if stepped:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        scheduler.step()


def _batch_loss(cfg: TrainConfig, logits: torch.Tensor, targets: torch.Tensor, class_weight: torch.Tensor | None,
                teacher: torch.Tensor | None, rows: slice, d: distributed.Dist) -> torch.Tensor:
    """The training loss of this process's `rows` of a batch (its `logits`), whose targets (class indices, or
    distributions: FER+ votes, mixed batches) and teacher probabilities (distillation; None: off) are `targets`
    and `teacher`: (1 - w) * loss(targets) + w * distillation_loss, the loss being cfg.loss's. One process is the
    case of `_share_loss` whose share is the whole batch, so both follow one formula."""
    pos = torch.arange(len(targets), device=targets.device)
    return _share_loss(cfg, logits, targets, class_weight, teacher, pos, pos[rows], d)


def _plain_batch(images: torch.Tensor, face_size: int, crop: int, cfg: TrainConfig,
                 memory_format: torch.memory_format, rows: slice) -> torch.Tensor:
    """The training faces `rows`, un-augmented, in the view PublicTest selection sees (the centre crop when
    training on crops), ready for the model: SWA's BatchNorm pass (`levers.recompute_batchnorm`)."""
    x = resize(to_float(images[rows]), face_size)
    return normalize(center_crop(x, crop) if crop else x, cfg.normalize).contiguous(memory_format=memory_format)


def _rng_state(device: torch.device, d: distributed.Dist) -> dict[str, Any]:
    """The global RNG states a checkpoint keeps (dropout draws; the shuffling and augmentation generator is
    saved apart): torch's CPU generator and, training on CUDA, the training GPU's generator (that device's alone:
    a checkpoint resumes on a machine with other GPUs); with several processes also every process's, by rank
    (called by every process: it gathers)."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if d.active:
        state |= {f"rank_{k}": d.gather(v) for k, v in list(state.items())}
    return state


def _restore_rng_state(state: dict[str, Any], device: torch.device, d: distributed.Dist) -> None:
    """Put back what `_rng_state` saved, this process's own with several processes. A checkpoint without a CUDA
    state (saved on CPU, or by a ferkit before it kept one) leaves the GPU's generator as seeded: the run resumes,
    with other dropout draws on the GPU than an uninterrupted run's."""
    prefix = "rank_" if d.active else ""

    def saved(key: str) -> torch.Tensor:
        return state[prefix + key][d.rank] if d.active else state[key]

    torch.set_rng_state(saved("torch_rng"))
    if device.type == "cuda" and prefix + "cuda_rng" in state:
        torch.cuda.set_rng_state(saved("cuda_rng"), device)


def _share_loss(cfg: TrainConfig, logits: torch.Tensor, targets: torch.Tensor, class_weight: torch.Tensor | None,
                teacher_probs: torch.Tensor | None, batch: torch.Tensor, share: torch.Tensor,
                d: distributed.Dist) -> torch.Tensor:
    """This process's loss for its `share` of the rows of `batch`, scaled so that DDP's average of the
    processes' gradients is the gradient of the one-process loss of the whole batch: the share's part of that
    loss (its per-face terms over the whole batch's normalizer), times the number of processes.

    The normalizer is the one-process loss's (`_ce_norm`), of the whole batch; distillation's batchmean divides
    by the batch size."""
    per_face = levers.face_losses(cfg.loss, logits, targets[share], class_weight, cfg.label_smoothing)
    loss = per_face.sum() / _ce_norm(targets[batch], class_weight)
    if teacher_probs is not None:
        # Offline and cached targets of mixed batches were tempered before they were mixed (see _train); online ones
        # are the teacher's probabilities on the mixed faces themselves.
        tempered = levers.mixes(cfg) and cfg.distill_view != "online"
        kl = distill.distillation_loss(logits, teacher_probs[share], cfg.distill_temperature,
                                       tempered=tempered) * (len(share) / len(batch))
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kl
    return loss * d.world_size


def _ce_norm(targets: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor | int:
    """What a batch's summed per-face loss terms (cross-entropy or squared hinge) are divided by: the number of
    faces; with class weights, the sum of the faces' weights, as F.cross_entropy's mean for class targets (each face
    its class's weight). For
    distributions (FER+ votes, mixed batches) a face's weight is its targets' sum_c w_c y_c (before label
    smoothing), so that one-hot distributions give exactly the loss of their labels: torch's own mean divides
    them by the number of faces, which changed what class weights mean when mixing turned labels into
    distributions (labels [0, 0, 1], weights [1, 5]: (l0 + l1 + 5 l2) / 7 as labels, / 3 as distributions)."""
    if class_weight is None:
        return len(targets)
    if targets.dim() == 1:
        return class_weight[targets].sum()
    return (targets * class_weight).sum()


def _save_snapshot(run_dir: Path, epoch: int, model: torch.nn.Module, step: int, weights_meta: dict) -> None:
    with _saving(run_dir, epoch):
        (run_dir / "snapshots").mkdir(exist_ok=True)
        save_weights(model, run_dir / "snapshots" / f"step{step:07d}.safetensors", weights_meta | {"step": step})


def class_prior(train_set: FaceData, label_mode: str, class_weights: str = "none") -> np.ndarray:
    """The class frequencies a run trains towards: of its labels, or of the vote distributions it fits; uniform
    when balanced class weights already cancel them in the loss (so --prior uniform does not correct twice)."""
    if class_weights == "balanced":
        return np.full(train_set.label_set.num_classes, 1.0 / train_set.label_set.num_classes)
    if label_mode == "soft" and train_set.soft_labels is not None:
        prior = train_set.soft_labels.astype(np.float64).mean(axis=0)
    else:
        prior = np.bincount(train_set.labels, minlength=train_set.label_set.num_classes) / len(train_set)
    return np.maximum(prior, 1e-6)  # a class absent from a small training set stays usable as a divisor


def _stop_reason(cfg: TrainConfig, stale: int, elapsed: float) -> str | None:
    """Why the run ends before its last epoch (early stopping, time limit), or None to go on."""
    if cfg.early_stopping and stale >= cfg.early_stopping:
        return f"early stopping: no better PublicTest accuracy for {stale} epochs"
    if cfg.time_limit and elapsed >= cfg.time_limit * 60:
        return f"time limit: {elapsed / 60:.1f} of {cfg.time_limit:g} minutes of training used"
    return None


def _require_finite(cfg: TrainConfig, epoch: int, checked: int, step: int, loss_sum: torch.Tensor,
                    model: torch.nn.Module | None = None, loss_scale: float | None = None) -> int:
    """Stop a diverged run (TrainingError) before anything non-finite is saved; returns `step`, now checked.

    `loss_sum` sums the epoch's losses, so it stays non-finite from the step that diverged on: one look (one wait
    for the device) covers every step since the last check. `model`: check its weights too (a last step can
    blow them up before any loss shows it). `loss_scale`: fp16's loss scale, which falls below MIN_LOSS_SCALE
    only when step after step was skipped for non-finite gradients (the weights stay finite and stop learning)."""
    where = f"step {step}" if step == checked + 1 else f"steps {checked + 1}-{step}"
    if not bool(torch.isfinite(loss_sum)):
        raise _diverged(cfg, epoch, f"the training loss became NaN or infinite ({where})")
    if loss_scale is not None and loss_scale < MIN_LOSS_SCALE:
        raise _diverged(cfg, epoch, f"the fp16 gradients stayed NaN or infinite however far the loss scale fell "
                                    f"(to {loss_scale:.3g}, below {MIN_LOSS_SCALE:g}; {where}): every such step "
                                    f"was skipped")
    if model is not None and not bool(torch.stack([t.isfinite().all() for t in model.state_dict().values()
                                                   if t.is_floating_point()]).all()):
        raise _diverged(cfg, epoch, f"the weights became NaN or infinite ({where})")
    return step


def _diverged(cfg: TrainConfig, epoch: int, what: str) -> TrainingError:
    fixes = [f"a lower lr (it is {cfg.lr:g})"] + ([] if cfg.grad_clip else ["gradient clipping (e.g. grad_clip=1)"])
    return TrainingError(f"training diverged in epoch {epoch + 1}: {what}; the run's files stop before that epoch "
                         f"(none of it is saved as best or last). Start a new run with {' or '.join(fixes)}")


@contextlib.contextmanager
def _saving(run_dir: Path, epoch: int) -> Iterator[None]:
    """Turn a failed write of epoch `epoch`'s files (a full disk) into a TrainingError that says what is left."""
    try:
        yield
    except OSError as e:
        kept = (f"its checkpoint of epoch {epoch} is intact: it goes on from there" if epoch
                else "no epoch was saved yet: it starts again from its config.json")
        raise _SaveError(f"could not save epoch {epoch + 1} in {run_dir} ({e}); {kept} after you free some "
                         f"space and resume it (ferkit train --resume {run_dir})") from e


def _start_weights(cfg: TrainConfig, resumed: Path | None = None) -> dict[str, dict[str, str]]:
    """The run's teacher and initial weights as the manifest records them ({"teacher": {"path", "sha256"}}), after
    checking that each is a ferkit weights file (a path or a shipped model's name) that fits the run: the teacher
    predicts the run's classes; the initial weights are the run's model, with its model_kwargs and classes.
    Checked before training, so a bad one fails before any work (or any run directory).

    resumed: the directory of a run resumed from its checkpoint. Its initial weights are in the checkpoint, so
    their file is neither needed nor read again (it may be gone, or hold other weights by now): their record is
    the one its manifest.json kept from the run's start. The teacher is checked again: its probabilities are
    computed again."""
    classes = list(get_label_set(cfg.label_set).classes)
    found = {}
    for key in ("teacher", "init_weights"):
        spec = getattr(cfg, key)
        if not spec:
            continue
        path = resolve_weights(spec)
        if key == "init_weights" and resumed is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):  # no manifest.json: checked as new
                if isinstance(record := read_json(resumed / "manifest.json").get(key), dict):
                    found[key] = record
                    continue
            if not path.is_file():  # the record is lost too; the checkpoint holds what training goes on from
                found[key] = {"path": spec, "sha256": None, "note": "file gone and no record of it in manifest.json "
                              "when the run resumed; the run went on from its checkpoint"}
                continue
        if not path.is_file():
            raise FileNotFoundError(f"{key} {spec}: no such weights file (nor a shipped model: "
                                    f"{', '.join(SHIPPED_MODELS)})")
        if key == "teacher" and path.suffix == ".npz":  # cross-fitted targets (ferkit crossfit), not a network
            if cfg.distill_view != "offline":
                raise ValueError(f"teacher {spec} holds predictions on the plain training faces, not a network to "
                                 f"run on augmented faces (distill_view={cfg.distill_view}): use "
                                 "distill_view=offline with it")
            if (held := CrossfitTargets.load(path).classes) != classes:
                raise ValueError(f"teacher {spec} predicts {held}, but this run trains {classes}")
            found[key] = {"path": spec, "sha256": file_sha256(path)}
            continue
        if key == "init_weights" and not is_ferkit_weights(path):  # a user's timm/torchvision state dict
            report = check_pretrained(lambda: create_model(cfg.model, num_classes=len(classes), **cfg.model_kwargs),
                                      path)
            found[key] = {"path": spec, "sha256": file_sha256(path), "state_dict": report.to_json()}
            continue
        try:
            meta = read_metadata(path)
        except Exception as e:  # safetensors raises its own error types on a file that is not one
            raise ValueError(f"{key} {spec}: not a ferkit weights file ({e})") from e
        if key == "teacher" and list(meta.get("classes", [])) != classes:
            raise ValueError(f"teacher {spec} predicts {meta.get('classes')}, but this run trains {classes}")
        if key == "teacher" and cfg.distill_view != "offline":  # online or cached: it sees the student's faces
            distill.check_online_teacher(cfg, spec, model_tta("auto", meta))
        if key == "init_weights":
            held = (meta.get("model"), meta.get("model_kwargs", {}), list(meta.get("classes", [])))
            wanted = (cfg.model, cfg.model_kwargs, classes)
            if held != wanted:
                raise ValueError(f"init_weights {spec} holds model {held[0]} {held[1] or ''} predicting {held[2]}, "
                                 f"but this run trains {wanted[0]} {wanted[1] or ''} predicting {wanted[2]}")
        found[key] = {"path": spec, "sha256": file_sha256(path)}
    return found


def _load_initial_weights(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Copy the weights of `cfg.init_weights` (checked by `_start_weights` to be this model) into `model`."""
    if not is_ferkit_weights(resolve_weights(cfg.init_weights)):
        print(f"starting from {load_pretrained(model, resolve_weights(cfg.init_weights)).summary()}", flush=True)
        return
    init, meta = load_model(cfg.init_weights)
    model.load_state_dict(init.state_dict())
    print(f"starting from the weights of {cfg.init_weights} ({meta.get('public_test_acc', 'n/a')} PublicTest)",
          flush=True)


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = parameter_groups(model, cfg.freeze, cfg.backbone_lr_scale, cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step schedules (step, cosine, onecycle) and per-epoch ReduceLROnPlateau on PublicTest accuracy."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.gamma ** (s // cfg.step_every))
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def cosine(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def _save_checkpoint(path: Path, state: dict) -> None:
    with replacing(path) as tmp:  # a kill or a full disk mid-write leaves the previous checkpoint intact
        torch.save(state, tmp)


def _write_manifest(run_dir: Path, cfg: TrainConfig, data: FaceData, commit: str, best_acc: float, best_epoch: int,
                    epochs_done: int, elapsed: float, device: torch.device, stopped_by: str | None = None,
                    start_weights: dict[str, dict[str, str]] | None = None, world_size: int = 1,
                    loss_scale: float | None = None, stretch: dict[str, Any] | None = None) -> None:
    """start_weights: the teacher and initial weights, as `_start_weights` gives them; world_size: the number
    of processes that trained the run (torchrun); loss_scale: fp16's loss scale at the end (None: not fp16),
    a sign of how close the gradients came to fp16's limits; stretch: this call's part of the training (when it
    started, its command, commit, hardware, device, precision, first and last epoch, seconds), kept in the list
    `stretches` after those of earlier calls (a manifest written before the list existed starts it here). An epoch
    a kill cut off between this manifest and its checkpoint is in two stretches: it was trained twice."""
    manifest_path = run_dir / "manifest.json"
    # What earlier calls recorded, as far as it is intact: a manifest edited by hand (even into something that is
    # not JSON) must not stop a run that resumes; it is rewritten whole here.
    try:
        previous = read_json(manifest_path) if manifest_path.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    commands, commits, stretches = (_entries(previous, key, kind) for key, kind in
                                    (("commands", str), ("git_commits", str), ("stretches", dict)))
    if stretch is not None:
        same_call = bool(stretches) and stretches[-1].get("started") == stretch["started"]
        stretches = [*(stretches[:-1] if same_call else stretches), stretch]
    if command_line() not in commands:
        commands.append(command_line())  # a resumed run lists the original and the resume command
    if commit not in commits:
        commits.append(commit)
    write_json(manifest_path, {
        "command": commands[0] if commands else command_line(), "commands": commands,
        "config": cfg.to_dict(), "data": {"path": data.source, "sha256": data.sha256, "summary": data.summary()},
        "git_commit": commits[0], "git_commits": commits, "versions": library_versions(), "hardware": hardware(),
        "device": str(device), "world_size": world_size,
        "epochs_done": epochs_done, "best_epoch": best_epoch, "best_public_test_acc": best_acc,
        "train_seconds": round(elapsed, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"stopped_by": stopped_by} if stopped_by else {}), **(start_weights or {}),
        **({"loss_scale": loss_scale} if loss_scale is not None else {}),
        **({"stretches": stretches} if stretches else {}),
    })


def _entries(record: dict[str, Any], key: str, kind: type) -> list[Any]:
    """record[key]'s entries of type `kind`, or [] when it is missing or not a list."""
    entries = record.get(key)
    return [e for e in entries if isinstance(e, kind)] if isinstance(entries, list) else []


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    write_rows(path, METRIC_FIELDS, history)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv rows as numbers (epoch and step stay integers, so a resumed run rewrites them unchanged), and
    val_weights's name. Rows of runs written before a column existed: val_weights 'raw', and raw_val_acc val_acc
    where the raw weights were evaluated (NaN, unknown, where an average was)."""
    def value(key: str, text: str) -> int | float | str:
        return int(float(text)) if key in ("epoch", "step") else text if key == "val_weights" else float(text)

    def with_defaults(row: dict[str, Any]) -> dict[str, Any]:
        row = {"val_weights": "raw"} | row
        return {"raw_val_acc": row["val_acc"] if row["val_weights"] == "raw" else math.nan} | row

    with open(path, newline="") as f:
        return [with_defaults({k: value(k, v) for k, v in row.items()}) for row in csv.DictReader(f)]


def _public_test(net: torch.nn.Module, val_set: FaceData, input_size: int, cfg: TrainConfig, tta: str,
                 dtype: torch.dtype | None, d: distributed.Dist, device: torch.device, epoch: int,
                 what: str = "its PublicTest predictions") -> tuple[float, float]:
    """`net`'s PublicTest accuracy and mean cross-entropy. Finite weights can still be too large to compute with.
    Several processes: each predicts its share of the faces, and every process gets all the predictions."""
    nonfinite = False
    try:
        probs = predict_proba(net, val_set.images[d.shard(len(val_set))] if d.active else val_set.images,
                              input_size=input_size, norm=cfg.normalize, tta=tta, dtype=dtype)
    except NonFiniteOutputError:
        nonfinite = True
    if d.any(nonfinite):
        raise _diverged(cfg, epoch, f"{what} became NaN or infinite")
    probs = d.rows(probs, len(val_set), device)
    acc = float((probs.argmax(1) == val_set.labels).mean())
    return acc, float(-np.log(probs[np.arange(len(probs)), val_set.labels].clip(1e-12)).mean())

