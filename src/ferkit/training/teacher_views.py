"""Cached teacher views (`distill_view=cached`): online distillation's targets for a fixed number of teacher passes.

Online distillation (the teacher run on every augmented batch) paid where offline targets (the teacher's answers
on the plain faces, computed once) did not: the student learns what the teacher says about the face it actually
sees. But it runs the teacher on every step of every epoch, which more than doubled an epoch of `ferkit_vgg_s`
with a 3-network teacher on two CPU cores. Here each training face is augmented `count` times once, the teacher
scores each of those views once, and every epoch the student trains on one of its face's views, drawn at random,
against the teacher's answer for that very view (consistent targets, Beyer et al. 2022). The teacher's cost is
`count` passes over the faces in all, however many epochs, where online pays one per epoch and offline one or
two; the price is that the student sees `count` augmentations of each face instead of a fresh one every epoch,
and that a mixed batch (mixup, CutMix) aims at the mix of the teacher's answers on its faces, not at its answer
on the mixed face as online.

The views are stored as uint8 (the pixels' own precision; the teacher scores the stored values, so student and
teacher see exactly the same face): `count` x faces x size² bytes, 1.06 GB for FER2013's 28,709 faces at 16 views
of 48 pixels. They come from their own random stream (seeded by the run's seed), so a resumed run draws the same
views; a run directory keeps them in `teacher_views.pt` until the run ends, so that a resume does not pay the
teacher again, and a file that does not match the run (another teacher, augmentation, seed or count) or is
damaged is rebuilt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ferkit.data.augment import AugmentConfig, augment, resize, to_float
from ferkit.shared_files import replacing

FILE_NAME = "teacher_views.pt"
MakeViews = Callable[[], tuple[torch.Tensor, torch.Tensor]]
MAX_VIEWS = 64  # 4.2 GB of views for FER2013 at 48 pixels
MAX_BYTES = 16 * 2**30  # what the views may take in memory (check_size): larger inputs need fewer views
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


def check_size(count: int, faces: int, size: int) -> None:
    """Refuse views that would not fit in memory: count x faces x size² bytes (a 224-pixel timm model's views are
    22x a 48-pixel one's)."""
    need = count * faces * size * size
    if need > MAX_BYTES:
        raise ValueError(f"distill_views={count}: {count} views of {faces} faces at {size}x{size} need "
                         f"{need / 2**30:.1f} GiB of memory (at most {MAX_BYTES / 2**30:.0f}); use fewer views, or "
                         "distill_view=online")


def load_or_build(run_dir: Path, key: str, expected: tuple[int, int, int, int], make: MakeViews,
                  device: torch.device, *, save: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The run directory's saved views when they match `key` and the run's (views, faces, classes, size) `expected`,
    else `make()`'s, saved there when `save` (rank 0; a failed save costs only the shortcut). Returns the views,
    the teacher's probabilities and the seconds spent building them (0 when loaded)."""
    path = run_dir / FILE_NAME
    if path.is_file():
        why = _saved_views(path, key, expected)
        if isinstance(why, tuple):
            print(f"teacher views: {expected[0]} views of {expected[1]} faces from {path}", flush=True)
            return why[0].to(device), why[1].to(device), 0.0
        print(f"teacher views: {path} {why}; building them again", flush=True)
    t0 = time.perf_counter()
    views, probs = make()
    seconds = time.perf_counter() - t0
    print(f"teacher views: {views.shape[0]} views of {views.shape[1]} faces scored by the teacher in {seconds:.0f}s "
          f"({views.numel() / 2**30:.2f} GiB)", flush=True)
    if save:
        try:
            with replacing(path) as tmp:
                torch.save({"key": key, "views": views.cpu(), "probs": probs.cpu()}, tmp)
        except OSError as e:  # a full disk: the run goes on, and a resume builds the views again
            print(f"teacher views: not saved to {path} ({e}); a resume will build them again", flush=True)
    return views, probs, seconds


def _saved_views(path: Path, key: str,
                 expected: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The saved (views, probabilities) on the CPU if they are this run's, else why not. Memory-mapped: a file that
    does not match is not read into memory beside the views built in its place."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, empty, foreign: it holds nothing the run needs
        return f"is damaged ({type(e).__name__}: {e})"
    if not isinstance(saved, dict) or saved.get("key") != key:
        return "belongs to another teacher, augmentation, seed or set of faces"
    views, probs = saved.get("views"), saved.get("probs")
    count, faces, classes, size = expected
    if not (isinstance(views, torch.Tensor) and isinstance(probs, torch.Tensor) and views.dtype == torch.uint8
            and probs.dtype == torch.float32 and tuple(views.shape) == (count, faces, 1, size, size)
            and tuple(probs.shape) == (count, faces, classes)):
        return "does not hold this run's views"
    probs = probs.clone()
    if not torch.isfinite(probs).all():
        return "holds non-finite probabilities"
    return views.clone(), probs


def draw(views: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor,
         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of each face `idx` (drawn from the run's generator `gen`): the float batch in [0, 1] (B, 1, S, S)
    and the teacher's probabilities on it (B, C)."""
    pick = torch.randint(views.shape[0], (len(idx),), generator=gen).to(idx.device)
    return views[pick, idx].float() / 255, probs[pick, idx]
