"""Cached teacher views (`distill_view=cached`): online distillation's targets at offline distillation's cost.

Online distillation (the teacher run on every augmented batch) paid where offline targets (the teacher's answers
on the plain faces, computed once) did not: the student learns what the teacher says about the face it actually
sees. But it runs the teacher on every step of every epoch, which more than doubled an epoch of `ferkit_vgg_s`
with a 3-network teacher on two CPU cores. Here each training face is augmented `count` times once, the teacher
scores each of those views once, and every epoch the student trains on one of its face's views, drawn at random,
against the teacher's answer for that very view (consistent targets, Beyer et al. 2022). The teacher's cost is
`count` passes over the faces in all, instead of one per epoch; the price is that the student sees `count`
augmentations of each face instead of a fresh one every epoch.

The views are stored as uint8 (the pixels' own precision; the teacher scores the stored values, so student and
teacher see exactly the same face): `count` x faces x size² bytes, 1.06 GB for FER2013's 28,709 faces at 16 views.
They come from their own random stream (seeded by the run's seed), so a resumed run draws the same views; a run
directory keeps them in `teacher_views.pt` until the run ends, so that a resume does not pay the teacher again,
and a file that does not match the run (another teacher, augmentation, seed or count) or is damaged is rebuilt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ferkit.data.augment import AugmentConfig, augment, resize, to_float
from ferkit.shared_files import replacing

FILE_NAME = "teacher_views.pt"
MAX_VIEWS = 64  # 4.2 GB of views for FER2013: more than this is a memory error waiting to happen on a laptop
# A separate stream from the run's own generator (shuffling, mixing, which view): the views do not depend on how
# far training got, and a resumed run rebuilds or finds exactly the same ones.
_STREAM = 0x7E4C_4E15


def view_key(*, teacher_sha256: str, count: int, seed: int, augment_cfg: AugmentConfig, face_size: int,
             crop: int, faces: torch.Tensor) -> str:
    """What the views depend on, as one digest: a saved file with another key belongs to another run setup."""
    h = hashlib.sha256(json.dumps({"teacher": teacher_sha256, "count": count, "seed": seed,
                                   "augment": dataclasses.asdict(augment_cfg), "face_size": face_size, "crop": crop},
                                  sort_keys=True, default=str).encode())
    h.update(faces.cpu().numpy().tobytes())
    return h.hexdigest()


def build(faces: torch.Tensor, count: int, augment_cfg: AugmentConfig, face_size: int, crop: int, seed: int,
          teacher: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 256,
          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` augmented views of each uint8 face in `faces` (N, H, W), as the trainer augments a batch, and the
    teacher's probabilities on each: views uint8 (count, N, 1, S, S), probabilities float32 (count, N, C), on
    `faces`' device. `teacher` maps a float batch in [0, 1] (B, 1, S, S) to probabilities (B, C)."""
    if not 1 <= count <= MAX_VIEWS:
        raise ValueError(f"distill_views must be 1..{MAX_VIEWS}, got {count}")
    gen = torch.Generator().manual_seed(seed ^ _STREAM)
    n = len(faces)
    views: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    steps = [(k, i) for k in range(count) for i in range(0, n, batch_size)]
    bar = tqdm(steps, desc="teacher views", unit="batch", disable=not progress, dynamic_ncols=True, leave=False)
    with torch.no_grad():
        for k, i in bar:
            x = augment(resize(to_float(faces[i:i + batch_size]), face_size), augment_cfg, gen, crop=crop)
            quantized = x.clamp(0, 1).mul(255).round().to(torch.uint8)
            p = teacher(quantized.float() / 255).float()
            if not torch.isfinite(p).all():
                raise ValueError("the teacher's probabilities on the training faces are not finite")
            if views is None or probs is None:
                views = faces.new_empty((count, n, *quantized.shape[1:]))
                probs = torch.empty((count, n, p.shape[1]), dtype=torch.float32, device=faces.device)
            views[k, i:i + len(x)] = quantized
            probs[k, i:i + len(x)] = p
    bar.close()
    assert views is not None and probs is not None  # n >= 1: the trainer refuses an empty training split
    return views, probs


def load_or_build(run_dir: Path, key: str, make: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, *, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The run directory's saved views when they match `key`, else `make()`'s (saved there when `save`: rank 0)."""
    path = run_dir / FILE_NAME
    if path.is_file():
        try:
            saved: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
            if saved.get("key") == key and _consistent(saved.get("views"), saved.get("probs")):
                print(f"teacher views: {tuple(saved['views'].shape[:2])} (views, faces) from {path}", flush=True)
                return saved["views"], saved["probs"]
            print(f"teacher views: {path} belongs to another teacher, augmentation or seed; building them again",
                  flush=True)
        except Exception as e:  # a truncated or foreign file: rebuilt below, it holds nothing the run needs
            print(f"teacher views: {path} is damaged ({type(e).__name__}: {e}); building them again", flush=True)
    t0 = time.perf_counter()
    views, probs = make()
    print(f"teacher views: {views.shape[0]} views of {views.shape[1]} faces scored by the teacher in "
          f"{time.perf_counter() - t0:.0f}s ({views.numel() / 2**30:.2f} GiB)", flush=True)
    if save:
        with replacing(path) as tmp:
            torch.save({"key": key, "views": views.cpu(), "probs": probs.cpu()}, tmp)
    return views, probs


def _consistent(views: Any, probs: Any) -> bool:
    return (isinstance(views, torch.Tensor) and isinstance(probs, torch.Tensor) and views.dtype == torch.uint8
            and views.dim() == 5 and probs.dim() == 3 and views.shape[:2] == probs.shape[:2]
            and bool(torch.isfinite(probs).all()))


def draw(views: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor,
         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of each face `idx` (drawn from the run's generator `gen`): the float batch in [0, 1] (B, 1, S, S)
    and the teacher's probabilities on it (B, C)."""
    pick = torch.randint(views.shape[0], (len(idx),), generator=gen).to(idx.device)
    return views[pick, idx].float() / 255, probs[pick, idx]
