"""Training on several processes: what `torchrun` starts, and the few collectives the trainer needs.

`torchrun --nproc_per_node N -m ferkit train ...` starts N copies of `ferkit train`, each with RANK, WORLD_SIZE
and LOCAL_RANK in its environment. `processes()` joins them into one process group (gloo for CPU tensors, NCCL
for CUDA tensors); the trainer then wraps its model in DistributedDataParallel. The semantics, chosen so that N
processes train the run one process would (docs/scale-out.md):

- `batch_size` is the global batch: every process draws the same seeded permutation and the same augmentation
  for the whole batch, and takes its own contiguous share of the batch's rows (batch_size / N faces);
  gradients are averaged over the global batch, so the learning rate needs no change and the weights match a
  one-process run up to float rounding (exactly what BatchNorm and dropout allow: see the docs).
- Rank 0 alone makes the run directory, holds it and writes every file; the others get what it read
  (config, checkpoint, history) and any error it hit, so all processes stop together with the same message.

A process that is not started by torchrun (no WORLD_SIZE, or WORLD_SIZE=1) is a world of one: `Dist.active` is
False and the trainer runs its one-process code, unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")
_CPU = torch.device("cpu")
_made_group = False  # set once `processes()` joined torchrun's processes into a group: see made_process_group


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when not started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous share of n rows (shares differ by at most one row; in rank order they are
        the n rows in order)."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def from_rank0(self, fn: Callable[[], T]) -> T:
        """`fn()` run on rank 0 alone; every process returns its result, or raises the exception it raised."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:  # any error: the other processes must not wait for a result that never comes
                error = e
        result, error = self.broadcast((result, _portable(error)))
        if error is not None:
            raise error
        return result

    def settle(self, error: Exception | None) -> None:
        """After a step rank 0 alone does: rank 0 passes the exception it hit (None: it succeeded) and goes on
        to raise it itself; the other processes pass None and raise rank 0's exception, if any."""
        if not self.active:
            return
        error = self.broadcast(_portable(error) if self.main else None)
        if error is not None and not self.main:
            raise error

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` (any picklable object), on every process."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=_CPU)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes of `t` (a new tensor; `t` itself when there is one process)."""
        if not self.active:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([int(flag)])).item())

    def rows(self, part: np.ndarray, n: int, device: torch.device) -> np.ndarray:
        """The (n, ...) array whose `shard(n)` rows are each process's `part`, on every process (exact: each
        row is summed with zeros)."""
        if not self.active:
            return part
        full = torch.zeros((n, *part.shape[1:]), dtype=torch.float64 if part.dtype == np.float64 else torch.float32,
                           device=device)
        full[self.shard(n)] = torch.from_numpy(part).to(full)
        dist.all_reduce(full)
        return full.cpu().numpy().astype(part.dtype, copy=False)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics, which DDP otherwise only sends at
        the next forward): every process then evaluates the weights rank 0 saves."""
        if self.active:
            for b in model.buffers():
                dist.broadcast(b.data, src=0)


SINGLE = Dist()


def launched() -> Dist:
    """This process's place as torchrun's environment (or an already made process group) gives it."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Dist(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


@contextlib.contextmanager
def processes() -> Iterator[Dist]:
    """Join torchrun's processes into one process group for the block (and leave it after); within a process
    group made before (a test, an outer call such as `reproduce`) it is that group's place, and the group stays.
    A process not started by torchrun gets `SINGLE` and no process group."""
    d = launched()
    if not d.active or dist.is_initialized():
        yield d
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: train with one process")
    # gloo for CPU tensors (and the small objects exchanged), NCCL for CUDA tensors where CUDA is present.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    global _made_group
    _made_group = True
    try:
        yield d
        # Leave together: a process that tears its group down while a peer is still writing its last files closes
        # the peer's gloo connections under it, and the peer then aborted at exit ("terminate called without an
        # active exception", seen twice in CI). After an error the peers may never get here, so no barrier then.
        # (A rarer abort of the same words, in the interpreter's teardown after the group is gone, is why the CLI
        # ends torchrun's workers with os._exit: `ferkit.cli.main`.)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def made_process_group() -> bool:
    """Whether this process made a process group with torchrun's other processes (`processes()`), at any time:
    such a process ends with os._exit (`ferkit.cli.main`)."""
    return _made_group


def _portable(error: Exception | None) -> Exception | None:
    """`error` if it survives pickling (to be raised on the other processes), else a RuntimeError saying it."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"rank 0: {type(error).__name__}: {error}")


def local_device(device: torch.device, d: Dist) -> torch.device:
    """The device this process trains on: with CUDA and several processes, the GPU of its local rank."""
    if d.active and device.type == "cuda":
        device = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device
