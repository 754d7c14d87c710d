"""Shared test fixtures: small synthetic FER2013-format data, and the real data when it is beside the repo."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests run beside (possibly) a background training job and on 2-core CI: keep each test on one thread.
torch.set_num_threads(1)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013.csv.gz"
REAL_FERPLUS = REAL_DATA.with_name("fer2013new.csv")


def synthetic_rows(n_per_split: dict[str, int], seed: int = 0, num_classes: int = 7) -> list[tuple[int, str, str]]:
    """(emotion, pixels, Usage) rows whose faces are learnable: each class has its own brightness pattern."""
    rng = np.random.default_rng(seed)
    rows = []
    for usage, n in n_per_split.items():
        for i in range(n):
            label = i % num_classes
            base = np.zeros((48, 48))
            base[:, label * 6:label * 6 + 6] = 200  # class-specific vertical stripe
            img = np.clip(base + rng.normal(60, 20, (48, 48)), 0, 255).astype(np.uint8)
            rows.append((label, " ".join(map(str, img.ravel())), usage))
    return rows


FILE_DAMAGES = ("empty", "truncated", "text")


def damage_file(path: Path, how: str, text: str = "not the file you want") -> None:
    """Damage a file as disks and users do: `how` is one of FILE_DAMAGES (emptied, cut after 200 bytes, replaced
    by text)."""
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "text":
        path.write_text(text)
    else:
        raise ValueError(f"unknown damage {how!r}; one of {FILE_DAMAGES}")


def write_csv(path: Path, rows: list[tuple], header: str = "emotion,pixels,Usage", gz: bool = False) -> Path:
    text = header + "\n" + "".join(",".join(str(f) for f in r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the decoded-array cache at a temp dir so tests never touch ~/.cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("FERKIT_CACHE", str(d))
    return d


@pytest.fixture
def tiny_csv(tmp_path: Path, cache_dir: Path) -> Path:
    """A valid 7-class CSV: 70 Training, 35 PublicTest, 35 PrivateTest faces."""
    return write_csv(tmp_path / "tiny.csv", synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35}))


@pytest.fixture
def real_csv() -> Path:
    if not REAL_DATA.is_file():
        pytest.skip(f"real FER2013 not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained ferkit_vgg_s saved like a trained one: the shipped architecture without depending on
    the shipped weights (same speed and shapes; predictions are meaningless)."""
    from ferkit.data import FER2013_NAMES
    from ferkit.models.registry import create_model
    from ferkit.models.weights import save_weights

    path = tmp_path_factory.mktemp("weights") / "vgg_s.safetensors"
    meta = {"model": "ferkit_vgg_s", "num_classes": 7, "classes": list(FER2013_NAMES), "label_set": "fer7",
            "input_size": 48, "normalize": "dataset", "model_kwargs": {}}
    torch.manual_seed(0)
    save_weights(create_model("ferkit_vgg_s"), path, meta)
    return path


@pytest.fixture(scope="module")
def rec(weights: Path):
    """A CPU Recognizer (RetinaFace detector) over the untrained `weights`."""
    from ferkit.inference import Recognizer

    return Recognizer(model=str(weights), device="cpu")
