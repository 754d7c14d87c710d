"""Members vs ensembles: a bar chart of PrivateTest accuracy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ferkit.shared_files import replacing


def plot_members_vs_ensemble(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                             title: str = "Members vs ensembles (weights fitted on PublicTest)") -> None:
    """Horizontal bars of PrivateTest accuracy: members in grey, ensembles in blue, best member dashed.

    rows: dicts with 'name', 'kind' ('member' | 'ensemble'), 'private_accuracy' and (for the best-member line)
    'public_accuracy', e.g. `EnsembleReport.rows()`.
    """
    if not rows:
        raise ValueError("nothing to plot: no rows")
    names = [str(r["name"]) for r in rows]
    acc = np.array([float(r["private_accuracy"]) for r in rows])
    is_ens = np.array([r.get("kind") == "ensemble" for r in rows])
    fig = Figure(figsize=(8, 0.38 * len(rows) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, acc, color=np.where(is_ens, "#3b75af", "#bbbbbb"), height=0.7)
    for yi, a in zip(y, acc, strict=True):
        ax.text(a, yi, f" {a:.2%}", va="center", fontsize=8)
    members = [r for r in rows if r.get("kind") != "ensemble"]
    if members and all("public_accuracy" in r for r in members):
        best = max(members, key=lambda r: float(r["public_accuracy"]))
        ax.axvline(float(best["private_accuracy"]), color="#c44e52", ls="--", lw=1,
                   label=f"best member by PublicTest: {best['name']}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    lo = max(0.0, float(acc.min()) - 0.05)
    ax.set_xlim(lo, min(1.0, float(acc.max()) + 0.08))
    ax.set_xlabel("PrivateTest accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    with replacing(path) as tmp:  # atomic: a kill mid-write leaves the previous figure
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=110)
