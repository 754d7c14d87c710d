"""Images/s of single-process `ferkit predict` vs `ferkit predict --ray` on the same files (issue #27).

Run:  python benchmarks/ray_predict.py [--images 400] [--ray local | auto | HOST:PORT] [--actors N]
                                       [--batch-size 16] [--threads N] [--weights W] [--detector retinaface]
                                       [--backend auto] [--rounds 3] [--json results.json]

The inputs are the ten photos of benchmarks/photos (300x451 to 1280x926 pixels, 3 with a face) hard-linked
--images times in all into a temporary folder. Both commands run as subprocesses (`python -m ferkit predict`)
and are timed end to end, wall clock, startup included: model loading, and for Ray starting (or joining) Ray
and its actors. That is what a user waits for; on a few hundred images the startup is a large part of it.
The single-process run uses --threads (default: every CPU this process may use); the Ray run gives each actor
one thread and starts as many actors as the cluster has CPUs (or --actors). The rows of the two runs are
compared with those of a single-process --threads 1 run (they must be equal, as tests/test_cluster.py checks on
other images). Runs alternate for --rounds rounds and medians are reported, with the load average: on a
shared machine other processes' load moves the figures.

Two CPU cores show the mechanism, not the speed-up: the Ray path can at best use the same two cores, and pays
Ray's startup. The gain comes from a cluster with more machines (or a machine with many more cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = Path(__file__).resolve().parent / "photos"


def make_inputs(folder: Path, images: int) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    for i in range(images):
        src = photos[i % len(photos)]
        dst = folder / f"{i % 16:02d}" / f"{i:06d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)  # same bytes, no copy; every name is a separate file to ferkit


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def same_rows(single_csv: Path, shards: Path) -> bool:
    """Whether the Ray shards hold the rows of the single-process CSV (compared as the CSV prints them)."""
    from ferkit.data.labels import FER2013_NAMES
    from ferkit.inference import batch, cluster

    with open(single_csv, newline="") as f:
        single = sorted(tuple(row) for row in list(csv.reader(f))[1:])
    table = cluster.read_rows(str(shards), "parquet", list(FER2013_NAMES))
    return single == sorted(tuple(str(batch.csv_cell(c, v)) for c, v in r.items()) for r in table.to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--ray", default="local", help="local | auto | HOST:PORT (as `ferkit predict --ray`)")
    ap.add_argument("--actors", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="single-process threads (default: all CPUs)")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--detector", default="retinaface")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each; medians are reported")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from ferkit.device import available_cpus

    common = ["--weights", args.weights, "--detector", args.detector, "--backend", args.backend, "--device", "cpu",
              "--no-progress"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ferkit-ray-bench-") as tmp:
        root = Path(tmp)
        make_inputs(root / "images", args.images)
        ferkit = [sys.executable, "-m", "ferkit", "predict", str(root / "images"), *common]
        # First a one-thread run: it warms the ONNX export cache and the OS file cache, and its rows are the
        # reference (one-thread actors give the rows of --threads 1; RetinaFace's landmarks, hence the face
        # crops, change in the last bits with torch's thread count).
        timed([*ferkit, "--csv", str(root / "reference.csv"), "--threads", "1"])
        single, ray, equal = [], [], True
        for k in range(args.rounds):  # alternated, so a burst of load from other processes hits both
            single.append(timed([*ferkit, "--csv", str(root / "single.csv"),
                                 *(["--threads", str(args.threads)] if args.threads else [])]))
            ray.append(timed([*ferkit, "--ray", args.ray, "--out", str(root / f"shards{k}"), "--batch-size",
                              str(args.batch_size), *(["--actors", str(args.actors)] if args.actors else [])]))
            equal = equal and same_rows(root / "reference.csv", root / f"shards{k}")
    single_s, ray_s = statistics.median(single), statistics.median(ray)
    result = {"images": args.images, "cpus": available_cpus(), "machine": platform.processor() or platform.machine(),
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "detector": args.detector, "backend": args.backend, "ray": args.ray, "actors": args.actors,
              "batch_size": args.batch_size, "rounds": args.rounds, "single_s": [round(t, 2) for t in single],
              "ray_s": [round(t, 2) for t in ray], "single_images_per_s": round(args.images / single_s, 1),
              "ray_images_per_s": round(args.images / ray_s, 1), "rows_equal_to_threads_1": equal}
    print(f"{args.images} images, {result['cpus']} CPU(s), detector {args.detector}, median of {args.rounds} "
          f"round(s), load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after:")
    print(f"  single process  {single_s:7.1f} s  {result['single_images_per_s']:7.1f} images/s")
    print(f"  Ray ({args.ray:<6})    {ray_s:7.1f} s  {result['ray_images_per_s']:7.1f} images/s   (startup included)")
    print(f"  Ray rows equal to single-process --threads 1 rows: {equal}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
