"""Distillation: the teacher's targets and the loss that pulls the student toward them.

A teacher is a ferkit weights file (a network, or a saved ensemble) or a cross-fitted targets file (.npz,
`ferkit crossfit`). `distill_view` says which faces it answers on:
- offline: the plain training faces, once before training (`teacher_probabilities`);
- online: every augmented (and mixed) batch the student sees (`online_teacher`);
- cached: a fixed number of augmented views of each face, scored once (`cached_views`, over
  `ferkit.training.teacher_views`).
The loss is Hinton et al.'s T^2 * KL between the tempered distributions (`distillation_loss`), mixed with the loss
on the labels by `distill_weight` (the trainer's `_share_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ferkit.data import FaceData
from ferkit.data.augment import normalize, resize
from ferkit.models.predict import CROP_MODES, model_tta, predict_batch, predict_proba
from ferkit.models.weights import load_model, resolve_weights
from ferkit.training import distributed, teacher_views
from ferkit.training.config import TrainConfig
from ferkit.training.crossfit import CrossfitTargets, offline_view


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
                      tempered: bool = False) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) (Hinton et al. 2015), from the teacher's probabilities.

    Tempering probabilities p -> p^(1/T) / sum equals softmax(teacher_logits / T), so saved probabilities
    serve as well as logits (`temper`). The T^2 factor keeps the gradient scale independent of T.
    tempered: `teacher_probs` are tempered already (mixed batches mix the tempered distributions, see trainer._train).
    """
    teacher_t = teacher_probs if tempered else temper(teacher_probs, temperature)
    student_log_t = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(student_log_t, teacher_t, reduction="batchmean") * temperature ** 2


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities (..., C) at temperature T: p^(1/T) / sum over the classes (the last axis), i.e.
    softmax(log p / T) (zeros kept at 1e-8). Cached teacher views hold (views, faces, C)."""
    return F.softmax(probs.clamp_min(1e-8).log() / temperature, dim=-1)


def teacher_probabilities(cfg: TrainConfig, train_set: FaceData, device: torch.device) -> torch.Tensor:
    """The teacher's probabilities on the un-augmented training faces, (N, C), computed once, under its own
    view (`--tta auto`: a saved ensemble's fitted mode, the centre crop for crop-trained weights), or with
    flip TTA where that view is the plain whole face; or, for a cross-fitted targets file (.npz, `ferkit
    crossfit`), its rows for these faces.

    Offline targets cost one teacher pass instead of one per epoch; under the mild augmentations used here
    (flips, small crops and shifts) a face's emotion distribution does not change, so the targets still fit.
    """
    if (path := resolve_weights(cfg.teacher)).suffix == ".npz":
        probs = CrossfitTargets.load(path).for_faces(train_set, cfg.data)
        print(f"distilling from the cross-fitted targets {cfg.teacher}: held-out accuracy on this run's "
              f"{len(train_set)} training faces {float((probs.argmax(1) == train_set.labels).mean()):.4f}", flush=True)
        return torch.from_numpy(probs)
    teacher, meta = load_model(cfg.teacher, device)
    print(f"distilling from {cfg.teacher} ({meta['model']}): computing its probabilities on {len(train_set)} "
          "training faces", flush=True)
    probs = predict_proba(teacher, train_set.images, input_size=meta["input_size"],
                          norm=meta.get("normalize", "dataset"), tta=offline_view(meta))
    acc = float((probs.argmax(1) == train_set.labels).mean())
    print(f"teacher accuracy on the training faces: {acc:.4f}", flush=True)
    return torch.from_numpy(probs)


def check_online_teacher(cfg: TrainConfig, spec: str, view: str) -> None:
    """distill_view=online (and cached) feeds the teacher the student's own training faces, so both must see faces
    alike: whole faces (train_view=resize) for a teacher whose view is the whole face, input-size crops
    (train_view=crop) for one whose view is a crop (crop-trained weights, an ensemble fitted under center or
    tencrop)."""
    teacher_crops, student_crops = view in CROP_MODES, cfg.train_view == "crop"
    if teacher_crops != student_crops:
        seen = {True: "crops", False: "whole faces"}
        raise ValueError(f"teacher {spec} sees {seen[teacher_crops]} ({view} view), but this run trains on "
                         f"{seen[student_crops]} (train_view={cfg.train_view}): distill_view={cfg.distill_view} "
                         "feeds the teacher the student's faces; use distill_view=offline, or a teacher trained as "
                         "this run trains")


def cached_views(cfg: TrainConfig, run_dir: Path, teacher_sha256: str, train_images: torch.Tensor,
                 num_classes: int, face_size: int, crop: int, device: torch.device, amp_dtype: torch.dtype | None,
                 d: distributed.Dist) -> tuple[torch.Tensor, torch.Tensor, float]:
    """distill_view=cached: the run's teacher views and the teacher's probabilities on them (ferkit.training.
    teacher_views), from the run directory or built (and saved there), and the seconds the build took. Several
    processes: rank 0 builds and saves them while the others wait, then the others read its file (or build their
    own, the same from the same stream, if it could not be saved)."""
    size = crop or face_size
    teacher_views.check_size(cfg.distill_views, len(train_images), size)
    key = teacher_views.view_key(teacher_sha256=teacher_sha256, count=cfg.distill_views, seed=cfg.seed,
                                 augment_cfg=cfg.augment, face_size=face_size, crop=crop, faces=train_images)

    def make() -> tuple[torch.Tensor, torch.Tensor]:  # the teacher is loaded only when the views are built
        return teacher_views.build(train_images, cfg.distill_views, cfg.augment, face_size, crop, cfg.seed,
                                   online_teacher(cfg, device, amp_dtype), progress=cfg.progress and d.main)

    def load_or_build() -> tuple[torch.Tensor, torch.Tensor, float]:
        return teacher_views.load_or_build(run_dir, key, (cfg.distill_views, len(train_images), num_classes, size),
                                           make, device, save=d.main)

    if not d.active:
        return load_or_build()
    built: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    d.from_rank0(lambda: built.append(load_or_build()))  # the others wait here for rank 0's file
    return built[0] if d.main else load_or_build()


def online_teacher(cfg: TrainConfig, device: torch.device,
                   amp_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """distill_view=online (cached: on each stored view): a function from a batch of training faces as the student
    gets them (augmented, mixed; float (B, 1, S, S) in [0, 1], not normalized) to the teacher's probabilities on
    them, (B, C), under
    the teacher's own view: a saved ensemble's fitted mode, or none (no flip averaging: the batches are flipped at
    random already); a crop teacher's crops are the student's crops (`check_online_teacher`), fed as they are.
    In bf16 when the run trains in it, else fp32 (fp16 logits can overflow, and a NaN target would read as
    divergence). The teacher is in eval mode and draws no random numbers: a resumed run gets the same targets."""
    teacher, meta = load_model(cfg.teacher, device)
    teacher.eval()
    size, norm, view = meta["input_size"], meta.get("normalize", "dataset"), model_tta("auto", meta)
    view = "none" if view in CROP_MODES else view
    dtype = amp_dtype if amp_dtype == torch.bfloat16 else None
    when = ("online: the teacher runs on every training batch" if cfg.distill_view == "online" else
            f"from {cfg.distill_views} cached views of each training face: the teacher runs on each once")
    print(f"distilling from {cfg.teacher} ({meta['model']}) {when} ({view} view)", flush=True)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return predict_batch(teacher, normalize(resize(x, size), norm), view, size, dtype).float()

    return probabilities
