"""Test-time class-prior correction (--prior uniform): the arithmetic, where the prior comes from, bad values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import FER2013_NAMES
from ferkit.models.prior import TRAINING_COUNTS, adjust_prior, training_prior
from ferkit.models.registry import create_model
from ferkit.models.weights import WeightsError, load_model, save_weights

runner = CliRunner()
META = {"model": "sixclass_cnn4", "num_classes": 7, "classes": list(FER2013_NAMES), "label_set": "fer7",
        "input_size": 48, "normalize": "dataset", "model_kwargs": {}}


def test_uniform_prior_divides_by_the_training_frequencies() -> None:
    probs = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]], dtype=np.float32)
    prior = np.array(TRAINING_COUNTS["fer7"], dtype=np.float64)
    expected = probs / (prior / prior.sum())
    expected /= expected.sum()
    np.testing.assert_allclose(adjust_prior(probs, "uniform", META), expected, rtol=1e-6)
    assert adjust_prior(probs, "none", META) is probs
    # A recorded prior wins over the label set's table.
    recorded = META | {"class_prior": [1, 1, 1, 2, 1, 1, 1]}
    np.testing.assert_allclose(training_prior(recorded), np.array([1, 1, 1, 2, 1, 1, 1]) / 8)
    # Equal scores under the skewed FER2013 prior: the rarest class (disgust) wins after the correction.
    flat = np.full((1, 7), 1 / 7, dtype=np.float32)
    assert FER2013_NAMES[int(adjust_prior(flat, "uniform", META).argmax())] == "disgust"


@pytest.mark.parametrize("meta, message", [
    (META | {"label_set": "mine"}, "record no training class prior"),
    (META | {"class_prior": [1, 2, 3]}, "does not fit the 7 classes"),
    (META | {"class_prior": [1, 0, 1, 1, 1, 1, 1]}, "one positive, finite value per class"),
])
def test_unknown_or_bad_priors_are_clear_errors(meta: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        adjust_prior(np.full((1, 7), 1 / 7), "uniform", meta)
    with pytest.raises(ValueError, match="unknown prior 'flat'"):
        adjust_prior(np.full((1, 7), 1 / 7), "flat", META)


@pytest.mark.parametrize("prior", [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, "a"], [1, 1, 1, 1, 1, 1, -2],
                                   "uniform", [True] * 7])
def test_weights_with_a_bad_class_prior_do_not_load(tmp_path: Path, prior: object) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(create_model("sixclass_cnn4", num_classes=7), path, META | {"class_prior": prior})
    with pytest.raises(WeightsError, match="class_prior"):
        load_model(path)


@pytest.mark.parametrize("class_weights", ["none", "balanced"])
def test_trained_weights_record_their_class_prior(tmp_path: Path, cache_dir: Path, class_weights: str) -> None:
    from conftest import synthetic_rows, write_csv

    # Training: 35 faces, classes 0..6 five times each, plus 14 more of classes 0 and 1: a skewed prior.
    rows = synthetic_rows({"Training": 49, "PublicTest": 14})
    rows += [r for r in synthetic_rows({"Training": 14}, seed=1) if r[0] < 2] * 7
    data = write_csv(tmp_path / "skewed.csv", rows)
    result = runner.invoke(app, ["train", "--data", str(data), "--model", "sixclass_cnn4", "--epochs", "1",
                                 "--out", str(tmp_path), "--name", "r", "--no-progress", "--precision", "fp32",
                                 "--class-weights", class_weights])
    assert result.exit_code == 0, result.output
    _, meta = load_model(tmp_path / "r" / "best.safetensors")
    counts = np.bincount([r[0] for r in rows if r[2] == "Training"], minlength=7)
    # Balanced class weights already cancel the skew in the loss: the prior the model learns is uniform.
    expected = [1 / 7] * 7 if class_weights == "balanced" else counts / counts.sum()
    assert meta["class_prior"] == pytest.approx(expected, abs=1e-5)


def test_evaluate_and_recognizer_apply_the_prior(tiny_csv: Path, tmp_path: Path) -> None:
    from ferkit.inference import Recognizer

    path = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("sixclass_cnn4", num_classes=7), path, META)
    base = ["evaluate", "--data", str(tiny_csv), "--weights", str(path), "--json"]
    plain = json.loads(runner.invoke(app, base).stdout)
    adjusted = json.loads(runner.invoke(app, [*base, "--prior", "uniform"]).stdout)
    assert plain["prior"] == "none" and adjusted["prior"] == "uniform"
    assert {"balanced_accuracy", "macro_f1"} <= set(adjusted)
    assert plain["confusion_matrix"] != adjusted["confusion_matrix"]  # the untrained net's guesses move
    bad = runner.invoke(app, [*base, "--prior", "flat"])
    assert bad.exit_code == 2 and "unknown prior 'flat'" in bad.output

    faces = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    rec = Recognizer(model=str(path), detector="none", device="cpu", backend="torch")
    rec_uniform = Recognizer(model=str(path), detector="none", device="cpu", backend="torch", prior="uniform")
    np.testing.assert_allclose(rec_uniform.predict_proba(faces), adjust_prior(rec.predict_proba(faces), "uniform",
                                                                              META), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown prior"):
        Recognizer(model=str(path), detector="none", device="cpu", prior="skewed")


def test_predict_takes_the_prior(tmp_path: Path) -> None:
    from ferkit.inference.image_io import sample_image_path

    path = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("sixclass_cnn4", num_classes=7), path, META)
    base = ["predict", str(sample_image_path()), "--weights", str(path), "--detector", "none", "--json", "-",
            "--no-progress", "--device", "cpu", "--backend", "torch"]
    scores = {}
    for prior in ("none", "uniform"):
        result = runner.invoke(app, [*base, "--prior", prior])
        assert result.exit_code == 0, result.output
        scores[prior] = json.loads(result.stdout)["results"][0]["faces"][0]["emotions"]
    plain = np.array([[scores["none"][c] for c in FER2013_NAMES]])
    expected = adjust_prior(plain, "uniform", META)[0]
    np.testing.assert_allclose([scores["uniform"][c] for c in FER2013_NAMES], expected, atol=1e-3)
    bad = runner.invoke(app, [*base, "--prior", "flat"])
    assert bad.exit_code == 2 and "unknown prior 'flat'" in bad.output
