"""Make a training run's best weights the model shipped inside ferkit, with its manifest and measured accuracy.

Run:  python tools/ship_model.py runs/<name> --data fer2013.csv.gz [--tta flip] [--as default|fast]
      python tools/ship_model.py runs/<name> --data fer2013.csv.gz --labels fer2013new.csv --as ferplus

1. Writes `src/ferkit/weights/ferkit_<as>.safetensors` (the shipped model called --as: "default", the most
   accurate, or "fast", the compact one): the run's best.safetensors with float tensors stored as fp16 (half
   the size; the model computes in fp32 after loading).
2. Scores *that file* with `ferkit evaluate --json` (the CLI, in a subprocess) on PublicTest and PrivateTest,
   with and without the TTA given by --tta; with --labels, against FER+ majority, FER+ clear-majority and
   FER2013 labels (each result says which in "labels").
3. Writes `src/ferkit/weights/ferkit_<as>.manifest.json`: the training manifest (command, config, data
   sha256, git commits, versions, hardware, wall time), the evaluation commands and their JSON results
   (accuracy, macro F1, per-class recall), the weights' sha256 and size, and this script's command;
   and copies the run's metrics.csv and curves.png next to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def evaluate(weights: Path, name: str, data: str, split: str, tta: str, labels: str | None = None,
             label_mode: str = "majority") -> tuple[str, dict]:
    """`ferkit evaluate --weights NAME` on the shipped file (which must be `weights`: checked by its sha256);
    with `labels`, scored against FER+ labels under `label_mode`."""
    cmd = ["ferkit", "evaluate", "--weights", name, "--data", data, "--split", split,
           "--tta", tta, "--precision", "fp32", "--json"]
    if labels:
        cmd += ["--labels", labels, "--label-mode", label_mode]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    from ferkit.data import file_sha256

    if result["weights_sha256"] != file_sha256(weights):
        raise SystemExit(f"`ferkit evaluate --weights {name}` scored another file than {weights}")
    keep = {k: result[k] for k in ("split", "tta", "num_samples", "accuracy", "data_sha256", "weights_sha256")}
    keep["labels"] = label_mode if labels else "fer2013"  # which labels it was scored against
    keep["macro_f1"] = result["macro_avg"]["f1"]
    keep["per_class_recall"] = {c: v["recall"] for c, v in result["per_class"].items()}
    keep["confusion_matrix"] = result["confusion_matrix"]
    return " ".join(cmd), keep


def run_class_prior(run_dir: Path) -> list[float]:
    """The class prior a run trained towards (training.trainer.class_prior), from its config's data and labels."""
    from ferkit.data import load_dataset
    from ferkit.training import TrainConfig
    from ferkit.training.trainer import class_prior

    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    data = load_dataset(cfg.data, cfg.label_set, skip_bad_rows=cfg.skip_bad_rows, labels=cfg.labels or None,
                        label_mode=cfg.label_mode).split("Training")
    return [round(float(v), 6) for v in class_prior(data, cfg.label_mode, cfg.class_weights)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="A ferkit training run directory (holds best.safetensors).")
    p.add_argument("--data", required=True, help="FER2013 CSV used for the evaluation.")
    p.add_argument("--tta", default="flip", help="TTA also reported beside plain evaluation (none|flip|tencrop).")
    p.add_argument("--labels", default=None,
                   help="FER+ votes (fer2013new.csv): also score against FER+ majority and clear-majority labels.")
    p.add_argument("--note", default="", help="Free text kept in the manifest (e.g. what a -dirty commit held).")
    p.add_argument("--as", dest="shipped_as", default="default",
                   help="Which shipped model this run becomes: a name in ferkit.models.weights.SHIPPED_MODELS.")
    args = p.parse_args()

    from ferkit.data import file_sha256
    from ferkit.models.weights import (
        load_model,
        read_metadata,
        save_weights,
        shipped_manifest_path,
        shipped_weights_path,
    )

    best = args.run_dir / "best.safetensors"
    model, _ = load_model(best)
    meta = read_metadata(best)
    # The editable install: these are the files under src/ferkit/weights/.
    shipped, manifest_path = shipped_weights_path(args.shipped_as), shipped_manifest_path(args.shipped_as)
    shipped.parent.mkdir(parents=True, exist_ok=True)
    if "class_prior" not in meta:  # runs from before training recorded it: the same mean training target
        meta = meta | {"class_prior": run_class_prior(args.run_dir)}
    save_weights(model, shipped, meta | {"source_run": args.run_dir.name}, half=True)
    print(f"wrote {shipped} ({shipped.stat().st_size / 1e6:.1f} MB)")

    evaluations = []
    # A FER+ model is scored against the labels it was trained on first (FER+ majority), then FER+'s protocol
    # (clear majorities) and FER2013's own labels; a FER2013 model against FER2013's.
    label_views = [(args.labels, "majority"), (args.labels, "clear"), (None, "majority")] if args.labels else [
        (None, "majority")]
    for labels, mode in label_views:
        for split in ("PublicTest", "PrivateTest"):
            for tta in dict.fromkeys(("none", args.tta)):
                cmd, result = evaluate(shipped, args.shipped_as, args.data, split, tta, labels, mode)
                evaluations.append({"command": cmd, "result": result})
                print(f"{split:<12} tta={tta:<8} labels={result['labels']:<8} accuracy {result['accuracy']:.4f}")

    train_manifest = json.loads((args.run_dir / "manifest.json").read_text())
    manifest = {
        "weights": shipped.name, "weights_sha256": file_sha256(shipped),
        "weights_bytes": shipped.stat().st_size, "storage": "fp16 tensors (computed in fp32 after loading)",
        "model": meta.get("model"), "best_epoch": meta.get("epoch"),
        "evaluations": evaluations, "training": train_manifest,
        "shipped_by": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "note": args.note,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for name in ("metrics.csv", "curves.png"):
        if (args.run_dir / name).is_file():
            shutil.copy(args.run_dir / name, shipped.with_name(f"{shipped.stem}.{name}"))
    print(f"wrote {manifest_path}")


if __name__ == "__main__":
    main()
