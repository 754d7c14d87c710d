"""Pick the device and the fast numeric path for it.

On CPU, bf16 autocast is only fast where the CPU computes bf16 natively (AVX512-BF16 or AMX, which
oneDNN reports): there it trains these small CNNs 2-3x faster than fp32. Without it (e.g. an AVX2-only
CPU) bf16 is emulated and ~10x *slower* than fp32 (measured: ferkit_vgg_s 12 vs 166 images/s on a
2-core AVX2 EPYC), so "auto" picks fp32 there. See benchmarks/train_throughput.py. On CUDA, fp16/bf16
autocast is standard.
"""

from __future__ import annotations

import contextlib

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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision {precision!r} not in {['auto', *table]}")
    return table[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
