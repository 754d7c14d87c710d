"""FER+ labels from the command line: --labels / --label-mode on train, evaluate, ensemble and reproduce, the
ferplus8 label set and the FER+ reference majority rule, on small synthetic FER2013 + FER+ file pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, REAL_FERPLUS, synthetic_rows, write_csv
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import load_dataset, load_fer2013_csv
from ferkit.data.ferplus import VOTE_COLUMNS

runner = CliRunner()
HEADER = "Usage,Image name," + ",".join(VOTE_COLUMNS)
# FER2013 emotion id -> its FER+ vote column
COLUMN_OF_EMOTION = {0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness", 5: "surprise", 6: "neutral"}


def _votes(**counts: int) -> list[int]:
    return [counts.get(c, 0) for c in VOTE_COLUMNS]


def _ferplus_pair(tmp_path: Path, counts: dict[str, int] | None = None) -> tuple[Path, Path, list[list[int]]]:
    """A FER2013 CSV and a FER+ file for it: most rows agree with FER2013 (8 votes, 2 for neutral), and the
    first rows of every split hold the special cases below."""
    rows = synthetic_rows(counts or {"Training": 42, "PublicTest": 21, "PrivateTest": 21}, seed=3)
    csv_path = write_csv(tmp_path / "fer2013.csv", rows)
    special = [
        _votes(unknown=10),  # all unknown: dropped
        _votes(neutral=4, anger=4, fear=2),  # a tie: the leftmost column (neutral) wins; not a clear majority
        _votes(contempt=6, neutral=4),  # contempt: a class in ferplus8 only
        _votes(happiness=4, sadness=3, surprise=3),  # no clear majority (4 of 10): dropped by 'clear' only
        _votes(happiness=5, fear=1, sadness=1, anger=1, neutral=2),  # clear once single votes are left out (5 of 7)
    ]
    votes, seen = [], {}
    for emotion, _, usage in rows:
        k = seen.get(usage, 0)
        seen[usage] = k + 1
        votes.append(special[k] if k < len(special) else _votes(**{COLUMN_OF_EMOTION[emotion]: 8, "neutral": 2}
                                                                    if emotion != 6 else {"neutral": 10}))
    lines = [f"{usage},fer{i:07d}.png," + ",".join(map(str, v)) for i, ((_, _, usage), v) in
             enumerate(zip(rows, votes, strict=True))]
    fp_path = tmp_path / "fer2013new.csv"
    fp_path.write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    return csv_path, fp_path, votes


@pytest.fixture
def pair(tmp_path: Path, cache_dir: Path) -> tuple[Path, Path, list[list[int]]]:
    return _ferplus_pair(tmp_path)


@pytest.fixture
def ferplus8_weights(tmp_path: Path) -> Path:
    import torch

    from ferkit.models.registry import create_model
    from ferkit.models.weights import save_weights

    path = tmp_path / "cnn_ferplus8.safetensors"
    classes = ["neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt"]
    torch.manual_seed(0)
    save_weights(create_model("sixclass_cnn4", num_classes=8), path,
                 {"model": "sixclass_cnn4", "num_classes": 8, "classes": classes, "label_set": "ferplus8",
                  "input_size": 48, "normalize": "dataset", "model_kwargs": {}})
    return path


def test_label_modes_and_the_ferplus8_label_set(pair: tuple[Path, Path, list[list[int]]]) -> None:
    csv_path, fp_path, _ = pair
    plain = load_dataset(str(csv_path), "ferplus8", labels=str(fp_path))
    clear = load_dataset(str(csv_path), "ferplus8", labels=str(fp_path), label_mode="clear")
    fer7 = load_dataset(str(csv_path), "fer7", labels=str(fp_path))
    train = plain.split("Training")
    names = [plain.label_set.classes[i] for i in train.labels[:4]]
    assert names == ["neutral", "contempt", "happy", "happy"]  # the tie went to neutral; unknown row dropped
    assert plain.dropped_per_split == {"Training": 1, "PublicTest": 1, "PrivateTest": 1}  # the all-unknown rows
    # + the tie (4 of 10) and the 4-of-10 rows: no clear majority
    assert clear.dropped_per_split == {"Training": 3, "PublicTest": 3, "PrivateTest": 3}
    assert fer7.dropped_per_split == {"Training": 2, "PublicTest": 2, "PrivateTest": 2}  # + contempt
    assert "FER+ dropped per split: Training 3, PublicTest 3, PrivateTest 3" in clear.summary()
    # The 5-votes-of-10 row survives 'clear': its single votes (fear, sadness, anger) are outliers.
    assert 4 in clear.split("Training").rows.tolist()
    soft = load_dataset(str(csv_path), "ferplus8", labels=str(fp_path), label_mode="soft")
    assert soft.soft_labels is not None and np.allclose(soft.soft_labels.sum(axis=1), 1)


def test_a_ferplus_file_of_another_length_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    csv_path, fp_path, _ = _ferplus_pair(tmp_path)
    lines = fp_path.read_text().splitlines()
    fp_path.write_text("\n".join(lines[:-1]) + "\n")  # one PrivateTest row short
    result = runner.invoke(app, ["evaluate", "--data", str(csv_path), "--labels", str(fp_path)])
    assert result.exit_code == 2 and "data rows" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--label-mode", "clear"], "needs --labels"),
    (["--labels", "nowhere.csv"], "labels file 'nowhere.csv' not found"),
    (["--labels", "{fp}", "--label-mode", "loudest"], "unknown --label-mode 'loudest'"),
])
def test_evaluate_label_option_errors(pair: tuple[Path, Path, list[list[int]]], ferplus8_weights: Path,
                                      args: list[str], message: str) -> None:
    csv_path, fp_path, _ = pair
    args = [a.replace("{fp}", str(fp_path)) for a in args]
    result = runner.invoke(app, ["evaluate", "--data", str(csv_path), "--weights", str(ferplus8_weights), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_evaluate_scores_against_ferplus_or_fer2013_labels(pair: tuple[Path, Path, list[list[int]]],
                                                           ferplus8_weights: Path) -> None:
    csv_path, fp_path, _ = pair
    base = ["evaluate", "--data", str(csv_path), "--weights", str(ferplus8_weights), "--split", "PrivateTest"]
    text = runner.invoke(app, [*base, "--labels", str(fp_path), "--label-mode", "clear"])
    assert text.exit_code == 0, text.output
    assert "dropped by the FER+ labels: 3 Training, 3 PublicTest, 3 PrivateTest" in text.output
    scored = json.loads(runner.invoke(app, [*base, "--labels", str(fp_path), "--label-mode", "clear", "--json"]).stdout)
    assert scored["num_samples"] == 21 - 3
    # The same 8-class network against FER2013's own labels (the cross table): all 21 faces, no contempt label.
    fer2013 = json.loads(runner.invoke(app, [*base, "--json"]).stdout)
    assert fer2013["num_samples"] == 21 and fer2013["classes"][-1] == "contempt"


def test_train_on_soft_ferplus_labels_records_them(pair: tuple[Path, Path, list[list[int]]], tmp_path: Path) -> None:
    csv_path, fp_path, _ = pair
    result = runner.invoke(app, ["train", "--data", str(csv_path), "--labels", str(fp_path), "--label-mode", "soft",
                                 "--label-set", "ferplus8", "--model", "sixclass_cnn4", "--epochs", "1",
                                 "--out", str(tmp_path / "runs"), "--name", "fp", "--no-progress",
                                 "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "fp"
    config = json.loads((run / "config.json").read_text())
    assert config["labels"] == str(fp_path) and config["label_mode"] == "soft"
    manifest = json.loads((run / "manifest.json").read_text())
    assert "FER+ dropped per split: Training 1" in manifest["data"]["summary"]
    from ferkit.models.weights import read_metadata

    assert read_metadata(run / "best.safetensors")["classes"][-1] == "contempt"


def test_train_soft_targets_change_what_is_learned(pair: tuple[Path, Path, list[list[int]]], tmp_path: Path) -> None:
    # Same data, same seed: training on the vote distribution must give other weights than on the majority.
    from safetensors.numpy import load_file

    csv_path, fp_path, _ = pair
    runs = {}
    for mode in ("majority", "soft"):
        result = runner.invoke(app, ["train", "--data", str(csv_path), "--labels", str(fp_path), "--label-mode",
                                     mode, "--label-set", "ferplus8", "--model", "sixclass_cnn4", "--epochs", "1",
                                     "--out", str(tmp_path / "runs"), "--name", mode, "--no-progress",
                                     "--precision", "fp32"])
        assert result.exit_code == 0, result.output
        runs[mode] = load_file(tmp_path / "runs" / mode / "last.safetensors")
    assert any(not np.array_equal(runs["majority"][k], runs["soft"][k]) for k in runs["soft"])


def test_train_label_mode_without_labels_is_a_clear_error(tiny_csv: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tiny_csv), "--label-mode", "soft", "--out",
                                 str(tmp_path / "runs"), "--no-progress"])
    assert result.exit_code == 2 and "needs FER+ labels" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ensemble_from_predictions_refuses_labels(pair: tuple[Path, Path, list[list[int]]], tmp_path: Path) -> None:
    npz = tmp_path / "a.npz"
    npz.write_bytes(b"")
    result = runner.invoke(app, ["ensemble", "--from-predictions", str(npz), "--labels", str(pair[1])])
    assert result.exit_code == 2 and "--labels applies when ensembles run models" in result.output


def test_ensemble_runs_members_on_ferplus_labels(pair: tuple[Path, Path, list[list[int]]],
                                                 ferplus8_weights: Path) -> None:
    csv_path, fp_path, _ = pair
    result = runner.invoke(app, ["ensemble", "--weights", str(ferplus8_weights), str(ferplus8_weights), "--data",
                                 str(csv_path), "--labels", str(fp_path), "--label-mode", "clear", "--method",
                                 "mean", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_private"] == 18 and report["classes"][-1] == "contempt"


def test_reproduce_on_ferplus_labels_is_its_own_row(pair: tuple[Path, Path, list[list[int]]], tmp_path: Path) -> None:
    from ferkit.reproduce import reproduce

    csv_path, fp_path, _ = pair
    results = tmp_path / "results"
    reproduce("sixclass_cnn4", csv_path, runs_dir=tmp_path / "runs", results_dir=results,
              extra=["epochs=1", "precision=fp32"], progress=False)
    reproduce("sixclass_cnn4", csv_path, runs_dir=tmp_path / "runs", results_dir=results,
              extra=[f"labels={fp_path}", "epochs=1", "precision=fp32"], progress=False)
    with open(results / "seeds.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"sixclass_cnn4", "sixclass_cnn4_ferplus"}  # the FER2013 row is still there
    assert f"labels={fp_path}" in rows["sixclass_cnn4_ferplus"]["command"]
    assert (tmp_path / "runs" / "repro-sixclass_cnn4_ferplus" / "best.safetensors").is_file()
    assert (results / "predictions" / "sixclass_cnn4_ferplus.npz").is_file()


@pytest.mark.skipif(not (REAL_DATA.is_file() and REAL_FERPLUS.is_file()), reason="needs ../shared/data")
def test_real_ferplus_clear_majority_gives_the_literature_splits() -> None:
    """With 7 classes, FER+'s reference majority rule leaves the split sizes FER+ papers cite."""
    data = load_dataset(str(REAL_DATA), "fer7", labels=str(REAL_FERPLUS), label_mode="clear")
    sizes = [int((data.usage == s).sum()) for s in ("Training", "PublicTest", "PrivateTest")]
    assert sizes == [24941, 3186, 3137]
    full = load_fer2013_csv(REAL_DATA)
    assert sum(data.dropped_per_split.values()) == len(full) - len(data)
