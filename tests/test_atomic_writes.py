"""Result files are written atomically (shared_files.replacing): a failure mid-write leaves the previous file
intact and no temporary file behind; figures keep their format though written under a temporary name."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from ferkit.ensembles.predictions import load_prediction_files, save_prediction_file

PNG = b"\x89PNG\r\n\x1a\n"


def split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(3), 4), np.array([0, 1, 2, 0]), np.arange(4)


def test_a_failed_predictions_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ferkit.ensembles.predictions as predictions

    path = save_prediction_file(tmp_path / "predictions" / "m.npz", ["a", "b", "c"], "m", "none", split(0), split(1))
    before = path.read_bytes()
    real = np.savez_compressed

    def disk_full(file, **arrays):  # half the file lands, then the disk is full
        real(file, **arrays)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predictions.np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_prediction_file(path, ["a", "b", "c"], "m", "flip", split(2), split(3))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.npz"]
    monkeypatch.undo()
    assert load_prediction_files([path]).ttas == ["none"]


def test_figures_keep_their_format(tmp_path: Path) -> None:
    from ferkit.training.report import plot_curves

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.4}
               for e in (1, 2)]
    plot_curves(history, tmp_path / "curves.png")
    plot_curves(history, tmp_path / "curves.svg")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "curves.svg"]
