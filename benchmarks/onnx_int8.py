"""Does int8 quantization make a ferkit model faster in ONNX Runtime, and what does it cost in accuracy?

Run:  python benchmarks/onnx_int8.py --data fer2013.csv.gz [--weights fast] [--calibration 1024]
                                     [--seconds 3] [--threads N] [--json out.json]

The fp32 ONNX export of --weights (the cached export `Recognizer(backend="onnx")` uses) is quantized with
`onnxruntime.quantization.quantize_static` in six ways (QDQ and QOperator formats, per-tensor and
per-channel weights, all convs or only the dense, non-depthwise ones; uint8 activations, int8 weights),
calibrated on the first --calibration Training faces (min-max). For fp32 and each int8 file it prints PublicTest
accuracy (the validation split: this is a go/no-go check, not a reported result) and classification faces/s at
batch 1 and 64 through
`Recognizer(model=FILE.onnx).predict_proba` on uint8 faces, timed like benchmarks/inference_speed.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from inference_speed import cpu_name, rate  # benchmarks/ is on sys.path when this script runs

VARIANTS = {  # name -> (quant_format, per_channel, which convs: "all", or "dense" = not depthwise (group 1))
    "int8 QDQ per-tensor": ("QDQ", False, "all"),
    "int8 QDQ per-channel": ("QDQ", True, "all"),
    "int8 QOperator per-tensor": ("QOperator", False, "all"),
    "int8 QOperator per-channel": ("QOperator", True, "all"),
    # ONNX Runtime's int8 depthwise kernels are its weak spot; the dense convs (the 3x3 stem, the 1x1 pointwise
    # and shortcut convs) hold most of the multiply-adds and map onto VNNI int8 GEMMs.
    "int8 QDQ per-channel, dense convs only": ("QDQ", True, "dense"),
    "int8 QOperator per-channel, dense convs only": ("QOperator", True, "dense"),
}


def dense_conv_nodes(path: Path) -> list[str]:
    """Names of the Conv nodes of an ONNX file that are not depthwise/grouped (group attribute 1)."""
    import onnx

    names = []
    for node in onnx.load(str(path)).graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group == 1:
            names.append(node.name)
    return names


def quantize(fp32: Path, out: Path, calibration: np.ndarray, quant_format: str, per_channel: bool,
             convs: str = "all") -> Path:
    """Statically quantize `fp32` to `out`, calibrated on `calibration` (uint8 faces (N, 48, 48)); `convs="dense"`
    quantizes only the non-depthwise Conv nodes (everything else stays fp32)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ferkit.inference.onnx_backend import _normalized

    class Faces(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(_normalized(calibration[i:i + 64])[:, None] for i in range(0, len(calibration), 64))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    only = {"nodes_to_quantize": dense_conv_nodes(fp32)} if convs == "dense" else {}
    quantize_static(str(fp32), str(out), Faces(), quant_format=getattr(QuantFormat, quant_format),
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **only)
    return out


def measure(path: Path, public: tuple[np.ndarray, np.ndarray], seconds: float) -> dict[str, float]:
    from ferkit.inference import Recognizer

    rec = Recognizer(model=path, detector="none", device="cpu")
    faces, labels = public
    row = {"public_test": float((rec.predict_proba(faces).argmax(1) == labels).mean())}
    for b in (1, 64):
        batch = np.random.default_rng(b).integers(0, 256, (b, 48, 48), dtype=np.uint8)
        row[f"batch{b}"] = rate(lambda f=batch: rec.predict_proba(f), b, seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="FER2013 CSV (.csv or .csv.gz)")
    parser.add_argument("--weights", default="fast", help="weights file or shipped name (default: fast)")
    parser.add_argument("--calibration", type=int, default=1024, help="Training faces used to calibrate")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    from ferkit import __version__
    from ferkit.data import load_dataset
    from ferkit.inference.onnx_backend import cached_export
    from ferkit.models.weights import resolve_weights
    from ferkit.training.report import git_commit

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    train, public = data.split("Training"), data.split("PublicTest")
    fp32 = cached_export(resolve_weights(args.weights))
    results: dict[str, Any] = {"weights": str(args.weights), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                               "ferkit": __version__, "git_commit": git_commit(), "data_sha256": data.sha256,
                               "variants": {}}
    print(f"{args.weights}: {fp32.name}; {results['threads']} thread(s) on {results['cpu']}")
    print(f"{'variant':<28} {'PublicTest':>10} {'batch 1':>9} {'batch 64':>9}   (faces/s)")
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": fp32}
        for name, (fmt, per_channel, convs) in VARIANTS.items():
            files[name] = quantize(fp32, Path(tmp) / f"{fmt}-{per_channel}-{convs}.onnx",
                                   train.images[:args.calibration], fmt, per_channel, convs)
        for name, path in files.items():
            row = measure(path, (public.images, public.labels), args.seconds)
            results["variants"][name] = row
            print(f"{name:<28} {row['public_test']:>10.2%} {row['batch1']:>9.0f} {row['batch64']:>9.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
