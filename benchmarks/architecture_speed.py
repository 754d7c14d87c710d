"""Which MiniXception shape is fastest in ONNX Runtime per face, for its multiply-adds?

Run:  python benchmarks/architecture_speed.py [--rounds 5] [--seconds 2] [--threads N] [--json out.json]
                                              [--variant JSON ...] [--weights NAME=FILE ...] [--no-variants]

Each variant of `mini_xception` below and each --variant (untrained: speed does not depend on the weights), and
each --weights file (a trained model, e.g. `fast=fast` or `s2w2=runs/fast_s2w2/best.safetensors`), is exported to
ONNX and timed
through `Recognizer(model=FILE.onnx).predict_proba` on uint8 faces at batch 1 and 64, like
benchmarks/inference_speed.py. The variants are timed in turn, round after round (--rounds), so a change in the
machine's speed hits all of them alike; the table reports each variant's faces/s relative to the first one
(the published shape that `fast` uses), as the median over rounds of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from inference_speed import cpu_name, rate  # benchmarks/ is on sys.path when this script runs

VARIANTS: dict[str, dict[str, Any]] = {  # name -> mini_xception model_kwargs
    "published (stem 8, widths 16/32/64/128)": {},
    "stem 16": {"stem": 16},
    "stem 16, widths 32/32/64/128": {"stem": 16, "widths": (32, 32, 64, 128)},
    "stem 8, widths 32/64/128/128": {"widths": (32, 64, 128, 128)},
    "stem 16, stride-2 stem": {"stem": 16, "stem_stride": 2},
    "stem 16, stride-2 stem, widths 32/64/128/256": {"stem": 16, "stem_stride": 2, "widths": (32, 64, 128, 256)},
}
BATCHES = (1, 64)


def export_variant(kwargs: dict[str, Any], out: Path) -> tuple[Path, int, int]:
    """Export an untrained mini_xception built with `kwargs` to `out`; returns (path, parameters, FLOPs)."""
    from ferkit.data.labels import FER2013_NAMES
    from ferkit.export import export_onnx
    from ferkit.models import count_flops, count_parameters, create_model

    model = create_model("mini_xception", num_classes=len(FER2013_NAMES), **kwargs).eval()
    meta = {"model": "mini_xception", "classes": list(FER2013_NAMES), "input_size": 48, "model_kwargs": kwargs}
    return export_onnx((model, meta), out), count_parameters(model), count_flops(model)


def export_weights(weights: str) -> tuple[Path, int, int]:
    """Export a trained weights file (or shipped name) through the same cache Recognizer(backend="onnx") uses."""
    from ferkit.inference.onnx_backend import cached_export
    from ferkit.models import count_flops, count_parameters
    from ferkit.models.weights import load_model, resolve_weights

    path = resolve_weights(weights)
    model, _ = load_model(path)
    return cached_export(path), count_parameters(model), count_flops(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="times each variant is measured, interleaved")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--weights", nargs="*", default=[], metavar="NAME=FILE",
                        help="also time these trained weights files or shipped names")
    parser.add_argument("--variant", nargs="*", default=[], metavar="JSON",
                        help="also time these shapes: mini_xception model_kwargs as JSON, e.g. "
                             "'{\"stem\": 16, \"stem_stride\": 2, \"widths\": [48, 96, 192, 384]}'")
    parser.add_argument("--no-variants", action="store_true", help="skip the built-in list of shapes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    from ferkit import __version__
    from ferkit.inference import Recognizer
    from ferkit.training.report import git_commit

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "ferkit": __version__,
                               "git_commit": git_commit(), "rounds": args.rounds, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, tuple[Path, int, int]] = {}
        if not args.no_variants:
            for i, (name, kwargs) in enumerate(VARIANTS.items()):
                files[name] = export_variant(kwargs, Path(tmp) / f"variant{i}.onnx")
        for i, text in enumerate(args.variant):
            files[text] = export_variant(json.loads(text), Path(tmp) / f"extra{i}.onnx")
        for item in args.weights:
            name, _, weights = item.partition("=")
            files[name] = export_weights(weights or name)
        if not files:
            parser.error("nothing to time: give --variant or --weights, or drop --no-variants")
        recognizers = {name: Recognizer(model=path, detector="none", device="cpu") for name, (path, _, _) in
                       files.items()}
        batches = {b: np.random.default_rng(b).integers(0, 256, (b, 48, 48), dtype=np.uint8) for b in BATCHES}
        rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in files}
        print(f"{len(files)} models, {args.rounds} rounds, {results['threads']} thread(s) on {results['cpu']}")
        for rec in recognizers.values():  # first calls allocate ONNX Runtime's buffers: keep them out of round 1
            for faces in batches.values():
                for _ in range(20):
                    rec.predict_proba(faces)
        for r in range(args.rounds):
            for name, rec in recognizers.items():
                for b, faces in batches.items():
                    rates[name][b].append(rate(lambda f=faces, m=rec: m.predict_proba(f), b, args.seconds))
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    baseline = next(iter(files))
    print(f"\n{'model':<48} {'params':>8} {'MFLOPs':>7} " + " ".join(f"{f'batch {b}':>17}" for b in BATCHES))
    for name, (_, params, flops) in files.items():
        row: dict[str, Any] = {"params": params, "flops": flops}
        cells = []
        for b in BATCHES:
            ratios = [x / y for x, y in zip(rates[name][b], rates[baseline][b], strict=True)]
            row[f"batch{b}"] = {"faces_per_s": rates[name][b], "ratio_vs_first": ratios,
                                "median_ratio": statistics.median(ratios)}
            cells.append(f"{statistics.median(rates[name][b]):>8.0f}/s {statistics.median(ratios):>5.2f}x")
        results["variants"][name] = row
        print(f"{name:<48} {params:>8,} {flops / 1e6:>7.2f} " + " ".join(cells))
    print(f"(faces/s: median over rounds; x: median per-round ratio to '{baseline}')")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
