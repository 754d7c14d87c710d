"""Training throughput (images/s) of registry models: fp32, fp32 + channels_last, bf16 autocast + channels_last.

Run:  python benchmarks/train_throughput.py [--models ferkit_vgg_s frivas_cnn3 resnet18] [--batch-size 128]

Prints one line per (model, mode) and a speed-up summary. Uses synthetic batches, so it needs no data;
the numbers measure forward + backward + SGD step, the work of one training step.
"""

from __future__ import annotations

import argparse
import time

# isort: off
import ferkit  # noqa: F401  before torch: its OpenMP threads then wait passively (see ferkit/__init__.py)
import torch
import torch.nn.functional as F
# isort: on

from ferkit.device import autocast, cpu_has_native_bf16, resolve_device
from ferkit.models import create_model, get_spec

# fp32 is the baseline; ferkit's "auto" precision on CPU is fp32+channels_last where the CPU has no native bf16
# and bf16+channels_last where it does (AVX512-BF16 / AMX), see ferkit.device.
MODES = {"fp32": (None, False), "fp32+channels_last": (None, True), "bf16+channels_last": (torch.bfloat16, True)}


def images_per_second(name: str, dtype: torch.dtype | None, channels_last: bool, batch_size: int,
                      steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    size = get_spec(name).input_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(device).to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 1, size, size, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        num_classes = model(x[:2]).shape[1]  # 7, or 6 for the no-disgust recipes
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ferkit_vgg_s", "frivas_cnn3", "resnet18"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for name in args.models:
        rates = {}
        for mode, (dtype, cl) in MODES.items():
            rates[mode] = images_per_second(name, dtype, cl, args.batch_size, args.steps, device)
            print(f"{name:<16} {mode:<20} {rates[mode]:8.1f} images/s", flush=True)
        print(f"{name:<16} speed-up vs fp32: " + ", ".join(f"{m} {rates[m] / rates['fp32']:.2f}x"
                                                          for m in MODES if m != "fp32"))
    print(f"this CPU computes bf16 natively: {cpu_has_native_bf16()} (ferkit's auto precision: "
          f"{'bf16' if cpu_has_native_bf16() else 'fp32'} + channels_last)")


if __name__ == "__main__":
    main()
