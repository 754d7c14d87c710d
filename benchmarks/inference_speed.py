"""Inference speed on this machine: emotion classification (faces/s) and photos end to end (images/s).

Run:  python benchmarks/inference_speed.py [--seconds 3] [--repeats 3] [--weights W.safetensors | --model NAME]
                                           [--threads N] [--json results.json] [--fer-python FER_VENV_PYTHON]
                                           [--rounds N]   (alternate ferkit and fer N times; medians + ratios)
                                           [--tta flip]   (ferkit averages each face with its mirror image)

(a) Classification: `Recognizer.predict_proba` on 48x48 uint8 faces (preprocessing included, no detection)
    at batch 1 and batch 64: the default `Recognizer()` (backend "auto": ONNX Runtime on CPU when installed),
    PyTorch fp32, PyTorch bf16 autocast, and ONNX Runtime (fp32, `Recognizer(backend="onnx")`).
(b) End to end: `Recognizer.detect_emotions` on a 640x480 photo (the bundled astronaut, resized to 480x480
    and padded to 640x480; one face), for each detector, with the PyTorch and the ONNX Runtime classifier.
(c) The `fer` package (Justin Shenk's FER, TFLite mini-Xception) on the same inputs: in this interpreter, or
    with --fer-python /path/to/venv/bin/python in a separate venv (fer's dependency pins clash with ferkit's;
    see docs/detection.md); when neither can import fer, a message says why it was skipped.

The model: --weights, else --model NAME (untrained, random weights: same speed as trained), else the
shipped default weights when installed, else an untrained ferkit_vgg_s; the choice is printed. Every
timing runs for about --seconds after a warm-up and reports the best of --repeats rounds (robust to bursts of
load from other processes); torch, OpenCV and ONNX Runtime get the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPEATS = 3


def rate(fn: Callable[[], Any], items: int, seconds: float, warmup: int = 2, min_calls: int = 3) -> float:
    """Items per second of `fn` (which handles `items` items per call): the best of REPEATS rounds of about
    `seconds` / REPEATS each, so a burst of load from another process does not set the number."""
    for _ in range(warmup):
        fn()
    best = 0.0
    for _ in range(REPEATS):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / REPEATS and calls >= min_calls:
                break
        best = max(best, items * calls / elapsed)
    return best


def benchmark_photo() -> np.ndarray:
    """BGR 640x480: the bundled 512x512 astronaut resized to 480x480, centred, padded with grey."""
    import cv2

    from ferkit.inference.image_io import sample_image_path

    img = cv2.resize(cv2.imread(str(sample_image_path())), (480, 480), interpolation=cv2.INTER_AREA)
    return cv2.copyMakeBorder(img, 0, 0, 80, 80, cv2.BORDER_CONSTANT, value=(127, 127, 127))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_weights(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """(weights file, description) following the --weights / --model / shipped / untrained rule."""
    import torch

    from ferkit.data.labels import FER2013_NAMES
    from ferkit.models.registry import create_model, get_spec
    from ferkit.models.weights import default_weights_path, resolve_weights, save_weights

    if args.weights:
        path = resolve_weights(args.weights)
        return path, f"weights {args.weights}" + (f" ({path})" if str(path) != args.weights else "")
    shipped = default_weights_path()
    if args.model is None and shipped.is_file():
        return shipped, f"shipped default weights {shipped}"
    name = args.model or "ferkit_vgg_s"
    torch.manual_seed(0)
    path = tmp / f"{name}-untrained.safetensors"
    meta = {"model": name, "num_classes": 7, "classes": list(FER2013_NAMES), "label_set": "fer7",
            "input_size": get_spec(name).input_size, "normalize": "dataset", "model_kwargs": {}}
    save_weights(create_model(name), path, meta)
    why = "" if args.model else f" (shipped weights {shipped} not installed)"
    return path, f"untrained {name}, random weights{why}"


def bench_ferkit(args: argparse.Namespace, weights: Path, results: dict[str, Any], e2e: bool = True) -> None:
    from ferkit.inference import Recognizer

    faces = {b: np.random.default_rng(b).integers(0, 256, (b, 48, 48), dtype=np.uint8) for b in (1, 64)}
    # "default": Recognizer() as users get it (backend "auto": ONNX Runtime on CPU when installed, else torch).
    configs = [("default", {}), ("torch fp32", {"backend": "torch", "precision": "fp32"}),
               ("torch bf16 autocast", {"backend": "torch", "precision": "bf16"})]
    if args.onnx:
        try:
            import onnxruntime  # noqa: F401

            configs.append(("onnxruntime fp32", {"backend": "onnx"}))
        except ImportError:
            print("onnxruntime not installed: skipping the ONNX Runtime rows (pip install onnxruntime)")
    print("\n(a) classification, faces/s (Recognizer.predict_proba on 48x48 uint8 faces, no detection)")
    print(f"{'backend':<22} {'batch 1':>10} {'batch 64':>10}")
    recs = {}
    for label, kw in configs:
        start = time.perf_counter()
        rec = Recognizer(model=weights, detector="none", device="cpu", tta=args.tta, **kw)
        setup = time.perf_counter() - start
        recs[label] = rec
        row = {f"batch{b}": rate(lambda f=f, r=rec: r.predict_proba(f), b, args.seconds) for b, f in faces.items()}
        row["setup_s"] = setup
        results["classification"][label] = row
        note = f"   (setup {setup:.1f} s incl. ONNX export)" if rec.backend == "onnx" else ""
        if label == "default":
            note += f"   (backend {rec.backend}, {rec.threads} thread(s))"
        print(f"{label:<22} {row['batch1']:>10.1f} {row['batch64']:>10.1f}{note}", flush=True)

    if not e2e:
        return
    photo = benchmark_photo()
    print("\n(b) end to end, images/s (Recognizer.detect_emotions on a 640x480 photo with one face)")
    print(f"{'detector':<12} {'classifier':<22} {'images/s':>9} {'faces':>6}")
    for det in args.detectors:
        for label, kw in configs:
            if "bf16" in label:
                continue
            rec = Recognizer(model=weights, detector=det, device="cpu", tta=args.tta, **kw)
            n_faces = len(rec.detect_emotions(photo))
            r = rate(lambda rec=rec: rec.detect_emotions(photo), 1, args.seconds)
            results["end_to_end"][f"{det} + {label}"] = {"images_per_s": r, "faces": n_faces}
            print(f"{det:<12} {label:<22} {r:>9.2f} {n_faces:>6}", flush=True)


def load_fer() -> tuple[Any, Any, tuple[int, int]]:
    """(the fer module, a default FER() — Haar + quantized TFLite mini-Xception —, its classifier's input
    size). Imports only fer, so it works in a venv without ferkit (benchmarks/fer_package_accuracy.py uses it)."""
    import fer

    try:
        from fer import FER
    except ImportError:  # fer 25.x no longer re-exports FER from the package root
        from fer.fer import FER
    detector = FER()
    return fer, detector, tuple(getattr(detector, "_FER__emotion_target_size", (64, 64)))


def measure_fer(photo_path: str, seconds: float) -> dict[str, Any]:
    """Time the `fer` package in *this* interpreter: its TFLite classifier one face per call (how
    `detect_emotions` runs it), a batch of 64 through the same call, and `detect_emotions` end to end
    (Haar + TFLite). Imports only numpy, cv2 and fer, so it also runs in a separate venv that has no ferkit."""
    import cv2

    fer, detector, size = load_fer()
    row: dict[str, Any] = {"version": getattr(fer, "__version__", "?"), "input": list(size)}
    for b in (1, 64):
        faces = np.random.default_rng(b).uniform(-1, 1, (b, *size)).astype(np.float32)
        row[f"batch{b}"] = rate(lambda f=faces: detector._classify_emotions(f), b, seconds)
    photo = cv2.imread(photo_path)
    row["faces"] = len(detector.detect_emotions(photo))
    row["end_to_end_images_per_s"] = rate(lambda: detector.detect_emotions(photo), 1, seconds)
    return row


def bench_fer(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """(c): in this interpreter, or with --fer-python in another one (fer needs TensorFlow and an OpenCV < 5
    whose pins clash with ferkit's; see docs/detection.md), run as `--fer-only` and read back its JSON."""
    import subprocess
    import sys

    import cv2

    print("\n(c) the `fer` package (mini-Xception, TFLite)")
    with tempfile.TemporaryDirectory() as tmp:
        photo_path = str(Path(tmp) / "photo.png")
        cv2.imwrite(photo_path, benchmark_photo())
        python = args.fer_python or sys.executable
        cmd = [python, __file__, "--fer-only", photo_path, "--seconds", str(args.seconds),
               "--repeats", str(REPEATS), "--threads", str(results["threads"])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        msg = f"skipped: fer could not run with {python} ({err}); pass --fer-python (see docs/detection.md)"
        print(msg)
        results["fer"] = {"skipped": msg}
        return
    row = json.loads(lines[-1])
    row["python"] = python
    results["fer"] = row
    print(f"fer {row['version']}: classification {row['batch1']:.1f} faces/s (batch 1), {row['batch64']:.1f} "
          f"faces/s (batch 64); end to end {row['end_to_end_images_per_s']:.2f} images/s "
          f"(Haar, {row['faces']} face(s))")
    for label, ours in results["classification"].items():
        print(f"ferkit {label} / fer: {ours['batch1'] / row['batch1']:.2f}x at batch 1, "
              f"{ours['batch64'] / row['batch64']:.2f}x at batch 64")


def summarize_rounds(rounds: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """Medians over rounds into `results` (classification rows, fer, and the per-round ferkit/fer ratios)."""
    batches = ("batch1", "batch64")
    for label in rounds[0]["classification"]:
        results["classification"][label] = {
            b: float(np.median([r["classification"][label][b] for r in rounds])) for b in batches}
        results["classification"][label]["per_round"] = [r["classification"][label] for r in rounds]
    fer_rounds = [r["fer"] for r in rounds if "batch1" in r.get("fer", {})]
    if len(fer_rounds) != len(rounds):
        if rounds[0].get("fer"):
            results["fer"] = rounds[0]["fer"]
        return
    results["fer"] = {**fer_rounds[0], **{b: float(np.median([f[b] for f in fer_rounds])) for b in batches},
                      "per_round": fer_rounds}
    print("\n(d) ferkit / fer, per round (each ratio from one round's back-to-back measurements) and median")
    results["ratio_vs_fer"] = {}
    for label in rounds[0]["classification"]:
        ratios = {b: [r["classification"][label][b] / r["fer"][b] for r in rounds] for b in batches}
        results["ratio_vs_fer"][label] = {b: {"per_round": v, "median": float(np.median(v))} for b, v in ratios.items()}
        for b, v in ratios.items():
            print(f"{label:<22} {b:<8} " + " ".join(f"{x:5.2f}x" for x in v) + f"   median {np.median(v):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="Timing length per measurement.")
    p.add_argument("--repeats", type=int, default=3, help="Timing rounds per measurement; the best one is reported.")
    p.add_argument("--rounds", type=int, default=1,
                   help="Repeat (a) and (c) this many times, alternating, and report medians and per-round "
                        "ferkit/fer ratios ((b) runs in the first round only).")
    p.add_argument("--weights", help="A ferkit .safetensors file (model or saved ensemble), or a shipped model's "
                                     "name (default).")
    p.add_argument("--model", help="Registry model name to time untrained (ignored with --weights).")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default).")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="ferkit's test-time augmentation (flip: each face and its mirror image, averaged).")
    p.add_argument("--detectors", nargs="+", default=["retinaface", "haar"])
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="Skip (b), the end-to-end timing.")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="Skip the ONNX Runtime rows.")
    p.add_argument("--no-fer", dest="fer", action="store_false", help="Skip (c), the fer package.")
    p.add_argument("--fer-python", help="Python of a separate venv that has `fer` + TensorFlow, for (c).")
    p.add_argument("--fer-only", metavar="PHOTO", help=argparse.SUPPRESS)  # internal: (c) in the fer venv
    p.add_argument("--json", help="Also write the results to this JSON file.")
    args = p.parse_args()

    global REPEATS
    REPEATS = max(1, args.repeats)
    if args.fer_only:  # child process of bench_fer: maybe a venv without ferkit or torch
        import cv2

        cv2.setNumThreads(args.threads or 0)
        print(json.dumps(measure_fer(args.fer_only, args.seconds)))
        return

    # isort: off
    import ferkit  # noqa: F401  before torch, as ferkit's commands do: OpenMP then waits passively (ferkit/__init__)
    import cv2
    import torch
    # isort: on

    if args.threads:
        torch.set_num_threads(args.threads)
    cv2.setNumThreads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FERKIT_CACHE"] = tmp  # ONNX exports of (possibly random) weights go to a scratch cache
        weights, desc = pick_weights(args, Path(tmp))
        cpu = cpu_name()
        print(f"model: {desc}; test-time augmentation: {args.tta}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU {cpu}, {os.cpu_count()} cores; "
              f"~{args.seconds:g} s per measurement, best of {REPEATS} rounds")
        from ferkit.training.report import git_commit

        results: dict[str, Any] = {"model": desc, "tta": args.tta, "git_commit": git_commit(),
                                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                                   "seconds": args.seconds, "rounds": args.rounds,
                                   "classification": {}, "end_to_end": {}}
        # Rounds alternate ferkit and fer, so each ferkit/fer ratio compares the two under the same machine
        # load (this shared machine's speed drifts by tens of percent over minutes); the medians are reported.
        rounds = []
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"\n===== round {r + 1} of {args.rounds}")
            one: dict[str, Any] = {"threads": results["threads"], "classification": {}, "end_to_end": {}}
            bench_ferkit(args, weights, one, e2e=args.e2e and r == 0)
            if args.fer:
                bench_fer(args, one)
            rounds.append(one)
    results["end_to_end"] = rounds[0]["end_to_end"]
    if args.rounds == 1:
        results["classification"] = rounds[0]["classification"]
        if "fer" in rounds[0]:
            results["fer"] = rounds[0]["fer"]
    else:
        summarize_rounds(rounds, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
