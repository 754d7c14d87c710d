"""Training throughput of `ferkit train` under torchrun: N processes against one, same global batch.

Run:  python benchmarks/ddp_throughput.py [--nproc 1 2] [--model frivas_cnn3] [--faces 2048] [--batch-size 128]
      python benchmarks/ddp_throughput.py --configs 1x2 1x1 2x1     (processes x threads each, on CPU)
      python benchmarks/ddp_throughput.py --device cuda --nproc 1 2 4 8        (a host with that many GPUs)

Each configuration trains the real training loop (`ferkit train`, started by torchrun for N > 1, by python for
the one-process baseline) for two epochs on synthetic FER2013-format faces, and reports the second epoch
(the first pays for start-up): training faces per second, over the epoch's wall time (training steps, the
gathered PublicTest evaluation of a small split, and rank 0's saving). On CPU each process gets
`--threads` threads (default: the CPUs / N, so every configuration uses the same cores): N processes on the
same cores show the mechanism (sharding, gradient all-reduce over gloo) and its overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_faces(path: Path, train: int, public: int) -> Path:
    """Learnable synthetic faces (a class-specific stripe plus noise) in FER2013's CSV format."""
    rng = np.random.default_rng(0)
    with gzip.open(path, "wt") as f:
        f.write("emotion,pixels,Usage\n")
        for usage, n in (("Training", train), ("PublicTest", public), ("PrivateTest", public)):
            for i in range(n):
                label = i % 7
                img = rng.normal(60, 20, (48, 48))
                img[:, label * 6:label * 6 + 6] += 140
                f.write(f"{label},{' '.join(map(str, np.clip(img, 0, 255).astype(np.uint8).ravel()))},{usage}\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args: argparse.Namespace, data: Path, out: Path, threads: int) -> tuple[float, float]:
    """(faces/s, seconds) of the second epoch of a run with `nproc` processes."""
    name = f"n{nproc}"
    train = ["-m", "ferkit", "train", "--data", str(data), "--out", str(out), "--name", name, "--no-progress",
             "--model", args.model, "--epochs", "2", "--batch-size", str(args.batch_size), "--device", args.device,
             "--precision", args.precision, f"threads={threads}"]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *train]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"{nproc} processes: overran {args.timeout}s") from None
    if proc.returncode:
        raise SystemExit(f"{nproc} processes failed:\n{log[-3000:]}")
    with open(out / name / "metrics.csv") as f:
        seconds = float(list(csv.DictReader(f))[-1]["seconds"])
    return args.faces / seconds, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="frivas_cnn3")
    p.add_argument("--faces", type=int, default=2048, help="training faces per epoch")
    p.add_argument("--public", type=int, default=256, help="PublicTest faces (evaluated every epoch)")
    p.add_argument("--batch-size", type=int, default=128, help="the global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: the CPUs / N)")
    p.add_argument("--configs", nargs="+", default=[], help="NxT: N processes of T threads (instead of --nproc)")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    import torch

    print(f"ferkit train, {args.model}, {args.faces} faces/epoch, global batch {args.batch_size}, {args.device} "
          f"[{args.precision}], {cpus} CPUs, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_faces(Path(tmp) / "faces.csv.gz", args.faces, args.public)
        os.environ.setdefault("FERKIT_CACHE", str(Path(tmp) / "cache"))
        base = None
        configs = ([tuple(int(v) for v in c.split("x")) for c in args.configs]
                   or [(n, args.threads or max(1, cpus // n)) for n in args.nproc])
        for i, (n, threads) in enumerate(configs):
            start = time.perf_counter()
            rate, seconds = run(n, args, data, Path(tmp) / f"runs{i}", threads)
            base = base or rate
            print(f"{n} process{'es' if n > 1 else '  '} x {threads} threads: {rate:8.1f} faces/s "
                  f"(epoch {seconds:.1f} s; run {time.perf_counter() - start:.0f} s)  {rate / base:.2f}x")


if __name__ == "__main__":
    main()
