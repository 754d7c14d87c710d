"""The models shipped inside the package ("default", "fast"): present, loadable without pickle, documented by
their manifests, and (where the real data is beside the checkout) scoring on FER2013 exactly what their
manifests record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import FER2013_NAMES, file_sha256
from ferkit.inference import Recognizer
from ferkit.inference.image_io import sample_image_path
from ferkit.models.weights import (
    SHIPPED_MODELS,
    load_model,
    read_metadata,
    shipped_manifest_path,
    shipped_weights_path,
)

runner = CliRunner()
shipped = pytest.mark.parametrize("name", list(SHIPPED_MODELS))


def manifest(name: str = "default") -> dict:
    return json.loads(shipped_manifest_path(name).read_text())


def private_test_accuracy(name: str) -> float:
    return next(e["result"]["accuracy"] for e in manifest(name)["evaluations"]
                if e["result"]["split"] == "PrivateTest" and e["result"]["tta"] == "none")


@shipped
def test_shipped_weights_are_installed_compact_and_described(name: str) -> None:
    weights = shipped_weights_path(name)
    assert weights.is_file(), f"the shipped model {weights} is missing (see tools/ship_model.py)"
    assert weights.stat().st_size < 10_000_000
    meta = read_metadata(weights)
    assert meta["classes"] == list(FER2013_NAMES) and meta["num_classes"] == 7 and meta["label_set"] == "fer7"
    m = manifest(name)
    assert m["weights_sha256"] == file_sha256(weights)  # the manifest describes this very file
    training = m["training"]
    for key in ("command", "config", "data", "git_commit", "versions", "hardware", "train_seconds"):
        assert key in training
    splits = {(e["result"]["split"], e["result"]["tta"]) for e in m["evaluations"]}
    assert {("PublicTest", "none"), ("PrivateTest", "none")} <= splits
    for e in m["evaluations"]:
        assert e["command"].startswith("ferkit evaluate") and e["result"]["data_sha256"] == training["data"]["sha256"]


@shipped
def test_shipped_model_loads_and_reads_the_sample_photo(name: str) -> None:
    model, meta = load_model(name)  # a shipped model's name; safetensors, no pickle
    assert meta["model"] == manifest(name)["model"]
    faces = Recognizer(model=name, device="cpu").detect_emotions(sample_image_path())
    assert len(faces) == 1  # the astronaut
    assert faces[0]["dominant"] == "happy"  # she is smiling broadly; an untrained model would be near uniform
    assert faces[0]["emotions"]["happy"] > 0.5


@shipped
def test_shipped_model_accuracy_on_real_data_matches_its_manifest(real_csv: Path, name: str) -> None:
    recorded = next(e["result"] for e in manifest(name)["evaluations"]
                    if e["result"]["split"] == "PrivateTest" and e["result"]["tta"] == "none")
    # The documented command (README: `ferkit evaluate --data fer2013.csv.gz --split S --json`), default precision
    # included: it must reproduce the documented number on any CPU, also one with native bf16.
    result = runner.invoke(app, ["evaluate", "--weights", name, "--data", str(real_csv), "--split", "PrivateTest",
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output)
    assert measured["num_samples"] == 3589 and measured["precision"] == "fp32"
    # Thread count and CPU can flip a prediction or two on a near-tie; more than a handful is a real change.
    assert measured["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-3)
    changed = np.abs(np.array(measured["confusion_matrix"]) - np.array(recorded["confusion_matrix"])).sum()
    assert changed <= 8


def test_results_figure_marks_the_shipped_model_from_its_manifest() -> None:
    from ferkit.reproduce import shipped_model_accuracy

    assert shipped_model_accuracy() == (manifest()["model"], private_test_accuracy("default"))


def test_the_fast_model_is_a_fraction_of_the_default_models_compute() -> None:
    # What "fast" promises: a small share of the default model's FLOPs per face (its measured speed and
    # accuracy against the `fer` package are in the README and benchmarks/results/inference_speed_fast.json).
    from ferkit.models import count_flops
    from ferkit.models.weights import load_model, resolve_weights

    fast, default = (load_model(resolve_weights(n))[0] for n in ("fast", "default"))  # as shipped, model_kwargs too
    assert count_flops(fast) < count_flops(default) / 10
    assert manifest("fast")["training"]["config"]["teacher"].endswith(".safetensors")  # distilled from a teacher
