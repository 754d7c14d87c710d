"""`ferkit evaluate` without --precision scores in fp32, the precision its recorded accuracies (README, the shipped
models' manifests) were measured in, also on a CPU with native bf16 (where --precision auto picks bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ferkit import device
from ferkit.cli import app

runner = CliRunner()


def test_evaluate_defaults_to_fp32_even_where_auto_would_pick_bf16(tiny_csv: Path, weights: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    args = ["evaluate", "--data", str(tiny_csv), "--weights", str(weights), "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == "fp32"
    result = runner.invoke(app, [*args, "--precision", "auto"])  # asked for, auto still means bf16 here
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == "bfloat16"


def test_library_evaluate_ensemble_members_and_ensemble_cli_default_to_fp32(
        tiny_csv: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library, `ferkit ensemble` and the members it runs score in fp32 by default too: an accuracy that
    depended on whether the CPU has native bf16 would differ between machines for the same weights."""
    from ferkit.data import load_dataset
    from ferkit.ensembles import members
    from ferkit.evaluation import evaluate
    from ferkit.models.weights import load_model

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    model, meta = load_model(weights)
    data = load_dataset(tiny_csv)
    assert evaluate(model, meta, data, "PrivateTest", device="cpu").precision == "fp32"
    assert evaluate(model, meta, data, "PrivateTest", device="cpu", precision="auto").precision == "bfloat16"

    seen: list[str] = []
    scored = members.evaluate

    def recording_evaluate(*args, **kwargs):
        result = scored(*args, **kwargs)
        seen.append(result.precision)
        return result

    monkeypatch.setattr(members, "evaluate", recording_evaluate)
    members.predict_members([weights], data, device="cpu")
    assert seen and set(seen) == {"fp32"}
    seen.clear()
    result = runner.invoke(app, ["ensemble", "--weights", str(weights), str(weights), "--data", str(tiny_csv),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {"fp32"}
