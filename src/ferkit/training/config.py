"""Training configuration: one flat dataclass, settable from flags or `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferkit.data.augment import AugmentConfig
from ferkit.data.ferplus import MODES as LABEL_MODES
from ferkit.training.teacher_views import MAX_VIEWS

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
TRAIN_VIEWS = ("resize", "crop")
SCHEDULES = ("none", "step", "plateau", "cosine", "onecycle")
AVERAGES = ("none", "ema", "swa")
DISTILL_VIEWS = ("offline", "online", "cached")
LOSSES = ("cross_entropy", "squared_hinge")
MAX_FOLDS = 100  # holdout=K/N: more folds than this leave each run all but a sliver of the faces
# Settings that say how a run trains on this machine and for how long, not what it learns: a resumed run may
# change them (more threads on a freer machine, a longer time limit to finish a run that used up its own, more
# early-stopping patience to continue a run that stopped on a noisy plateau: the epochs it goes on with are
# those a run started with that patience would have trained, as training is deterministic).
RESUME_SETTINGS = ("threads", "time_limit", "early_stopping", "progress")
MAX_THREADS = 1024  # torch crashes (a segfault, no message) on a thread pool of a million
# What each numeric setting must be, and finite (NaN passes any `<` test and would reach config.json as invalid
# JSON), checked by `validate` with the setting named (after `_validate_types`, so every value is a number). A test
# sets every float setting to NaN and expects a refusal.
SETTING_RANGES: dict[str, tuple[Any, str]] = {
    "label_smoothing": (lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0 = off), e.g. 0.1"),
    "lr": (lambda v: v >= 0, "a learning rate >= 0 (0 leaves the weights as they start)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, "epochs >= 0"),
    "step_every": (lambda v: v >= 1, "optimizer steps >= 1"),
    "gamma": (lambda v: v > 0, "a factor > 0"),
    "plateau_factor": (lambda v: 0 < v < 1, "a factor in (0, 1)"),
    "plateau_patience": (lambda v: v >= 0, "epochs >= 0"),
    "early_stopping": (lambda v: v >= 0, "epochs >= 0 (0 = off)"),
    "time_limit": (lambda v: v >= 0, "minutes >= 0 (0 = off)"),
    "grad_clip": (lambda v: v >= 0, "a gradient norm >= 0 (0 = off)"),
    "distill_temperature": (lambda v: v > 0, "> 0"),
    "distill_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "threads": (lambda v: 0 <= v <= MAX_THREADS, f"a number of CPU threads, 1 to {MAX_THREADS} (0 = torch's default)"),
    "seed": (lambda v: 0 <= v < 2**32, "a whole number in [0, 2^32)"),
    "limit_train": (lambda v: v >= 0, "a number of faces >= 0 (0 = all)"),
    "save_every": (lambda v: v >= 0, "optimizer steps >= 0 (0 = off)"),
    "distill_views": (lambda v: 1 <= v <= MAX_VIEWS, f"a whole number of views per face in 1..{MAX_VIEWS}"),
    "backbone_lr_scale": (lambda v: v >= 0, ">= 0 (1 = lr for all, 0 = backbone frozen)"),
    # the training levers (ferkit.training.levers)
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1), e.g. 0.999"),
    "swa_start": (lambda v: 0 <= v < 1, "a fraction of the epochs in [0, 1)"),
    "sam_rho": (lambda v: v >= 0, "a finite number >= 0 (0 = off), e.g. 0.05"),
    "mixup_alpha": (lambda v: v >= 0, "a finite number >= 0 (0 = off), e.g. 0.2"),
    "cutmix_alpha": (lambda v: v >= 0, "a finite number >= 0 (0 = off), e.g. 1.0"),
    "mix_prob": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
}


@dataclass
class TrainConfig:
    model: str = "ferkit_vgg_s"
    data: str = "fer2013.csv.gz"  # the file as distributed (and as `reproduce` defaults to); .csv works too
    label_set: str = "fer7"
    # FER+ crowd labels (fer2013new.csv) in place of the CSV's own, and how they become targets: majority (the
    # most-voted class), clear (majority, rows without a clear one dropped, as FER+'s own code) or soft
    # (cross-entropy to the vote distribution, Barsoum et al. 2016; PublicTest selection uses the majority).
    labels: str = ""
    label_mode: str = "majority"
    skip_bad_rows: bool = False  # leave out (and count) malformed CSV rows instead of stopping
    out_dir: str = "runs"
    run_name: str = ""  # default: <model>-<timestamp>

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0  # linear warm-up (cosine schedule)
    step_every: int = 1000  # step schedule: multiply lr by `gamma` every this many optimizer steps
    gamma: float = 0.98
    plateau_factor: float = 0.75  # ReduceLROnPlateau on PublicTest accuracy
    plateau_patience: int = 5
    label_smoothing: float = 0.0
    # The loss on the labels: cross_entropy, or squared_hinge (one-vs-rest L2-SVM on the logits, Tang 2013,
    # the FER2013 challenge's winner: ferkit.training.levers.squared_hinge). Distillation's term is KL either way.
    loss: str = "cross_entropy"
    class_weights: str = "none"  # 'none' or 'balanced' (inverse class frequency)
    early_stopping: int = 0  # stop after this many epochs without a better PublicTest accuracy; 0 = off
    # Stop after the first epoch that brings the run's training time (all calls together) to this many minutes;
    # 0 = off. For "the longest schedule that fits": the run is the first epochs of the configured one (a
    # per-step schedule such as cosine is laid out for `epochs` and so is cut short, not compressed).
    time_limit: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    # Knowledge distillation from a trained teacher (a .safetensors model or saved ensemble): its probabilities
    # on the un-augmented training faces (flip TTA, or the teacher's own view: distill.teacher_probabilities)
    # are computed once and used as soft targets. Or from cross-fitted targets (.npz, `ferkit crossfit`).
    teacher: str = ""
    distill_weight: float = 0.7  # loss = (1 - w) * loss(labels) + w * T^2 * KL(teacher_T || student_T)
    distill_temperature: float = 4.0
    # offline: the teacher's probabilities on the un-augmented faces, once (above). online: the teacher run on
    # every training batch as the student sees it (augmented, mixed), a teacher forward pass per step: its answers
    # on fresh augmentations and mixed faces, where offline targets on its own training faces are near its labels.
    distill_view: str = "offline"
    # cached: online's targets at about offline's cost (ferkit.training.teacher_views): each training face augmented
    # `distill_views` times once, the teacher run once on each view, and every epoch the student trains on one of
    # its face's views, drawn at random, against the teacher's answer for it. uint8 views: views x faces x size^2
    # bytes of memory (FER2013 at 16 views: 1.06 GB), kept in the run directory for resuming.
    distill_views: int = 16
    # Start from a trained model's weights (same model, model_kwargs and classes) instead of a random init:
    # fine-tuning, or continuing a model's training with a new teacher or schedule. Or from a user's timm or
    # torchvision state dict (.safetensors, or .pth read with weights_only=True): RGB stem kernels summed to
    # grayscale, a new head (ferkit.models.pretrained).
    init_weights: str = ""
    # Fine-tuning (ferkit.models.finetune): parts kept frozen, comma-separated (stem, backbone, head or prefixes of
    # parameter names), and the backbone's learning rate as a fraction of lr (discriminative rates; 0 freezes it).
    freeze: str = ""
    backbone_lr_scale: float = 1.0

    # Training levers (ferkit.training.levers). Weight averaging: PublicTest selection, best and last weights use
    # an average of the trained weights: 'ema' (an exponential moving average, updated every step with
    # `ema_decay`, BatchNorm statistics averaged too) or 'swa' (the mean of the weights at the end of each epoch
    # after the first `swa_start` fraction of the epochs, BatchNorm statistics recomputed on the training faces).
    average: str = "none"
    ema_decay: float = 0.999
    swa_start: float = 0.75
    # Sharpness-aware minimization (Foret et al. 2021): each step's gradient is taken at the weights moved a
    # distance `sam_rho` up the gradient, so a step costs two forward/backward passes; 0 = off. sam_adaptive: ASAM
    # (Kwon et al. 2021), the move scaled by each weight's magnitude.
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    # mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019): a batch is blended with a shuffled copy of itself, its
    # targets likewise; each lever is on when its Beta(alpha, alpha) parameter is > 0 (both on: one of the two
    # per batch, 50/50), and `mix_prob` of the batches are mixed.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # What a training face looks like to the model. 'resize': the whole face at the model's input size.
    # 'crop': a random input-size window of the face at 48/40 that size, cut after the geometric augmentation
    # and before random erasing (Khaireddin & Chen train on 40-pixel crops of 48-pixel faces and test on ten
    # crops); PublicTest selection then sees the centre crop (TTA mode 'center'), the scale the model learnt.
    train_view: str = "resize"
    normalize: str = "dataset"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun with CUDA: each process its LOCAL_RANK's GPU)
    # Under torchrun (several processes, CUDA only): BatchNorm normalizes with the whole batch's statistics
    # instead of each process's share's. No effect on one process.
    sync_batchnorm: bool = False
    precision: str = "auto"  # auto (CPU: bf16 where native else fp32; CUDA: bf16/fp16) | fp32 | bf16 | fp16
    channels_last: bool = True
    threads: int = 0  # CPU threads; 0 = torch default
    seed: int = 0
    limit_train: int = 0  # use only the first N training faces (quick experiments, tests); 0 = all
    # Cross-fitting: "K/N" trains on the Training faces outside fold K of N (`FaceData.folds`: stratified, seeded,
    # after limit_train); N runs holding out 1/N..N/N, scored each on its own fold by `ferkit crossfit`, give
    # every training face a prediction from networks that never saw it (a distillation teacher). "" = all faces.
    holdout: str = ""
    save_every: int = 0  # also keep a weights snapshot every N optimizer steps (snapshot ensembles); 0 = off
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        aug = d.pop("augment", None)
        cfg = cls(**d)
        if aug is not None:
            if not isinstance(aug, dict):
                raise ValueError(f"augment must be a mapping of augmentation settings, got {aug!r}")
            cfg.augment = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
        return cfg

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply `key=value` strings; nested keys use dots (`augment.rotation=15`, `model_kwargs.dropout=0.3`).
        Values parse as JSON and must fit the setting's type (ValueError naming the key otherwise)."""
        d = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, raw = item.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # bare strings: model=resnet18
            target = d
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(target.get(p), dict):
                    raise ValueError(f"unknown config key {key!r}")
                target = target[p]
            if leaf in target:
                target[leaf] = _as_type_of(target[leaf], value, raw, key)
            elif parents == ["model_kwargs"]:  # the model builder's keyword arguments: any name it takes
                target[leaf] = value
            else:
                raise ValueError(f"unknown config key {key!r}; known: {sorted(target)}")
        return TrainConfig.from_dict(d)

    def resume_changes(self, assignments: list[str]) -> dict[str, Any]:
        """The RESUME_SETTINGS that `key=value` strings set, parsed and checked as `override` does; any other
        key raises ValueError (a resumed run keeps what it learns with)."""
        keys = [item.split("=", 1)[0] for item in assignments]
        if fixed := [k for k in keys if k not in RESUME_SETTINGS]:
            raise ValueError(f"a resumed run keeps its saved config; only {', '.join(RESUME_SETTINGS)} can change "
                             f"(got {', '.join(fixed)})")
        changed = self.override(assignments)
        changed.validate()
        return {k: getattr(changed, k) for k in dict.fromkeys(keys)}

    def validate(self) -> None:
        self._validate_types()
        for name, (ok, what) in SETTING_RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} not in {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} not in {SCHEDULES}")
        if self.train_view not in TRAIN_VIEWS:
            raise ValueError(f"train_view {self.train_view!r} not in {TRAIN_VIEWS}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode {self.label_mode!r} not in {LABEL_MODES}")
        if self.label_mode != "majority" and not self.labels:
            raise ValueError(f"label_mode {self.label_mode!r} needs FER+ labels (labels=fer2013new.csv)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} not in {LOSSES}")
        if self.class_weights not in ("none", "balanced"):
            raise ValueError(f"class_weights {self.class_weights!r} must be 'none' or 'balanced'")
        if self.distill_view not in DISTILL_VIEWS:
            raise ValueError(f"distill_view {self.distill_view!r} not in {DISTILL_VIEWS}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be at least 1, got {self.epochs} and {self.batch_size}")
        if self.run_name and (Path(self.run_name).is_absolute() or ".." in Path(self.run_name).parts
                              or Path(self.run_name).name in ("", ".")):
            # A folder inside out_dir (exp/seed0 is one): an absolute name or one climbing out with .. would put the
            # run somewhere else.
            raise ValueError(f"run name {self.run_name!r} must be a folder inside the output folder (no absolute "
                             "path, no ..)")
        parse_holdout(self.holdout)
        if self.average not in AVERAGES:
            raise ValueError(f"average {self.average!r} not in {AVERAGES}")

    def _validate_types(self) -> None:
        """Every setting of the type of its default (a float setting takes a whole number too): a config.json
        edited by hand or damaged is refused naming the setting, not met by a traceback mid-run."""
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), getattr(TrainConfig, f.name, None)
            if f.name == "augment":
                _validate_augment(value)
                continue
            if f.name == "model_kwargs":
                kinds: tuple[type, ...] = (dict,)
            elif isinstance(default, bool):
                kinds = (bool,)
            elif isinstance(default, int):
                kinds = (int,)
            elif isinstance(default, float):
                kinds = (int, float)
            else:
                kinds = (str,)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{f.name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def _validate_augment(augment: Any) -> None:
    """The augmentation settings: probabilities in [0, 1], strengths >= 0, ranges (lo, hi) with 0 < lo <= hi; all
    finite."""
    if not isinstance(augment, AugmentConfig):
        raise ValueError(f"augment must be a mapping of augmentation settings, got {augment!r}")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("hflip", "erasing"):
        v = getattr(augment, name)
        if not (number(v) and 0 <= v <= 1):
            raise ValueError(f"augment.{name} must be a probability in [0, 1], got {v!r}")
    for name in ("rotation", "translate"):
        v = getattr(augment, name)
        if not (number(v) and v >= 0):
            raise ValueError(f"augment.{name} must be a finite number >= 0 (0 = off), got {v!r}")
    for name in ("crop_scale", "crop_ratio", "erasing_scale"):
        v = getattr(augment, name)
        if not (isinstance(v, tuple | list) and len(v) == 2 and all(number(x) for x in v) and 0 < v[0] <= v[1]):
            raise ValueError(f"augment.{name} must be a range [lo, hi] with 0 < lo <= hi, got {v!r}")


def parse_holdout(holdout: str) -> tuple[int, int] | None:
    """The setting holdout="K/N" as (K, N), 1 <= K <= N, 2 <= N <= MAX_FOLDS; "" -> None; ValueError otherwise."""
    if holdout == "":
        return None
    k_text, _, n_text = str(holdout).partition("/")
    if not all(text.isascii() and text.isdigit() for text in (k_text, n_text)):
        raise ValueError(f"holdout must be 'K/N' (train without fold K of N, e.g. 1/5), got {holdout!r}")
    k, n = int(k_text), int(n_text)
    if not (2 <= n <= MAX_FOLDS and 1 <= k <= n):
        raise ValueError(f"holdout {holdout!r}: need 2 <= N <= {MAX_FOLDS} folds and 1 <= K <= N")
    return k, n


def _as_type_of(current: Any, value: Any, raw: str, key: str) -> Any:
    """`value` (parsed from the text `raw`) as a value of the setting `key`, whose current value is `current`."""
    def wrong(kind: str) -> ValueError:
        return ValueError(f"{key}={raw}: expected {kind}")

    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if isinstance(current, int):
        if not (is_number and float(value).is_integer()):
            raise wrong("a whole number")
        return int(value)
    if isinstance(current, float):
        if not is_number:
            raise wrong("a number (e.g. 0.001 or 1e-3)")
        return float(value)
    if isinstance(current, str):
        return value if isinstance(value, str) else raw  # run_name=2024 is the name "2024"
    if isinstance(current, tuple | list):
        if not (isinstance(value, list) and len(value) == len(current)
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
            raise wrong(f"a list of {len(current)} numbers, e.g. {json.dumps(list(current))}")
        return [float(v) for v in value]
    if isinstance(current, dict) and not isinstance(value, dict):
        raise wrong('a JSON object, e.g. {"dropout": 0.3}')
    return value
