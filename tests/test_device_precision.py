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
