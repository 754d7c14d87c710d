"""Pick the device and the fast numeric path for it.

On CPU, bf16 autocast is only fast where the CPU computes bf16 natively (AVX512-BF16 or AMX, which
oneDNN reports): there it trains these small CNNs 2-3x faster than fp32. Without it (e.g. an AVX2-only
CPU) bf16 is emulated and ~10x *slower* than fp32 (measured: ferkit_vgg_s 12 vs 166 images/s on a
2-core AVX2 EPYC), so "auto" picks fp32 there. See benchmarks/train_throughput.py. On CUDA, fp16/bf16
autocast is standard.

Threads: `default_threads()` is the number of CPUs this process may actually use (its affinity mask, capped by a
cgroup CPU quota), not the machine's core count, and `set_threads(n)` applies a count to torch (and OpenCV); see
benchmarks/busy_threads.py for how thread counts behave next to other work on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:  # torch lists every backend it knows; say what ferkit supports
        raise ValueError(f"unknown device {name!r}; use auto | cpu | cuda | cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when oneDNN can run bf16 convolutions natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype | None) -> str:
    """The setting that names an autocast dtype (`resolve_precision`'s result): None -> "fp32", bf16 -> "bf16"."""
    return next(name for name, held in PRECISIONS.items() if held == dtype)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {['auto', *PRECISIONS]}")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- threads -----------------------------------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _quota_v2(directory: Path) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for no limit)."""
    text = _read(directory / "cpu.max")
    if not text:
        return None
    parts = text.split()
    try:
        if parts[0] == "max":
            return None
        quota, period = int(parts[0]), int(parts[1]) if len(parts) > 1 else 100_000
    except (ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(directory: Path) -> float | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: no limit)."""
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or -1), int(period or 100_000)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _up_to(mount: Path, relative: str) -> list[Path]:
    """mount/relative and each of its parents up to mount itself (a quota on any ancestor applies too)."""
    parts = [p for p in relative.strip("/").split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: str | os.PathLike | None = None,
                     proc_cgroup: str | os.PathLike | None = None) -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (e.g. 1.5), or None when there is none.

    Reads cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`) along the process's cgroup path (from
    /proc/self/cgroup) and its ancestors under `root`, and the mount's own top level (inside a container the
    path is often not visible under the mount); the smallest quota found wins. root / proc_cgroup default to
    CGROUP_ROOT / PROC_CGROUP.
    """
    root = Path(root or CGROUP_ROOT)
    limits: list[float] = []
    lines = (_read(Path(proc_cgroup or PROC_CGROUP)) or "").splitlines()
    candidates: list[tuple[Path, Any]] = [(root, _quota_v2), (root / "cpu", _quota_v1),
                                          (root / "cpu,cpuacct", _quota_v1)]
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, rel = fields
        if hierarchy == "0" and controllers == "":
            candidates += [(d, _quota_v2) for d in _up_to(root, rel)]
        elif "cpu" in controllers.split(","):
            for mount in {root / controllers, root / "cpu", root / "cpu,cpuacct"}:
                candidates += [(d, _quota_v1) for d in _up_to(mount, rel)]
    seen = set()
    for directory, read in candidates:
        if (directory, read) in seen:
            continue
        seen.add((directory, read))
        limit = read(directory)
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """How many CPUs this process's affinity mask allows (os.cpu_count() where the OS has no affinity call)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_cpus() -> int:
    """CPUs this process can actually use: its affinity mask, capped by its cgroup CPU quota rounded up
    (a 1.5-CPU quota gives 2), at least 1."""
    n = affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit - 1e-9)))
    return max(1, n)


def default_threads() -> int:
    """The thread count ferkit uses when none is given: OMP_NUM_THREADS when set to a positive integer (the
    user's explicit choice, as torch honours it), else available_cpus()."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cpus()


def check_threads(threads: int | None) -> int:
    """`threads` validated (None: default_threads()). Below 1 is an error; more than available_cpus() is
    lowered to it (threads beyond the CPUs this process may use only wait on each other)."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int | float) or int(threads) != threads:
        raise ValueError(f"threads must be a whole number of at least 1, got {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {int(threads)} (leave it out for the default: the CPUs "
                         f"this process may use, {available_cpus()} here)")
    return min(int(threads), available_cpus())


def set_threads(threads: int | None = None) -> int:
    """Apply a thread count to torch's intra-op pool and OpenCV and return it. None: default_threads(), or
    torch's current count where that is lower (a caller's torch.set_num_threads(1) stands). These are
    per-process settings: the last call (e.g. the last Recognizer made) sets them for all."""
    n = check_threads(threads) if threads is not None else min(default_threads(), torch.get_num_threads())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover - OpenCV is a core dependency
        pass
    return n
