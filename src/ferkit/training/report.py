"""What a run leaves behind for a reader: the manifest (how to reproduce it) and the curves PNG."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferkit.shared_files import replacing, write_text


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD commit of the repository ferkit runs from, with '-dirty' for uncommitted changes.

    Outside git (a copy of the tree without .git, e.g. one sent to a GPU machine) it is $FERKIT_GIT_COMMIT, which
    whoever made the copy sets to the commit it was made from; '' when that is unset too.
    """
    cwd = cwd or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FERKIT_GIT_COMMIT", "")


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def library_versions() -> dict[str, str]:
    import ferkit

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "ferkit": ferkit.__version__}


def command_line() -> str:
    """This process's command; under torchrun with several processes, the torchrun command that starts it."""
    args = [Path(sys.argv[0]).name, *sys.argv[1:]]
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "LOCAL_WORLD_SIZE" in os.environ:
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        module = ["-m", "ferkit"] if Path(sys.argv[0]).parent.name == "ferkit" else [sys.argv[0]]
        args = ["torchrun", *(["--nnodes", nodes] if nodes != "1" else []), "--nproc_per_node",
                os.environ["LOCAL_WORLD_SIZE"], *module, *sys.argv[1:]]
    return shlex.join(args)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A run's JSON record (config.json, manifest.json) as a dict: OSError when it cannot be read, ValueError
    when it is not JSON (json.JSONDecodeError is one) or not an object."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch, train vs PublicTest, as a two-panel PNG (from metrics.csv's rows: numbers,
    and val_weights's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="PublicTest")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="PublicTest")
    averaged = [h for h in history if h.get("val_weights", "raw") != "raw"]
    if averaged:  # a run with weight averaging: its trained weights' own accuracy, the average's control
        ax_acc.plot(epochs, [h.get("raw_val_acc", math.nan) for h in history], "--", marker=".",
                    label=f"PublicTest, raw weights (not the {averaged[0]['val_weights']} average)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with replacing(path) as tmp:  # atomic: a kill mid-write leaves the previous figure
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=110)
    plt.close(fig)
