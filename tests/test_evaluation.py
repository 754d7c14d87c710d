"""Evaluation: metrics against hand-computed values, plots, evaluate() on tiny data, the `evaluate` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import FER2013_NAMES, load_dataset
from ferkit.device import cpu_has_native_bf16, resolve_precision
from ferkit.evaluation import (
    classification_report,
    confusion_matrix,
    evaluate,
    format_report,
    load_probs,
    plot_confusion_matrix,
    plot_error_gallery,
    save_probs,
    select_tta,
    write_artifacts,
)
from ferkit.models import create_model
from ferkit.models.weights import save_weights

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "ferkit_vgg_s"

# Hand-worked 3-class example (classes a, b, c); class c is never predicted.
#   true a: predicted a a a b   -> 3 right of 4
#   true b: predicted b b a     -> 2 right of 3
#   true c: predicted a b a     -> 0 right of 3
# Column sums (predicted counts): a=6, b=4, c=0.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
NAMES = ["a", "b", "c"]
CM = [[3, 1, 0],
      [1, 2, 0],
      [2, 1, 0]]
# precision = TP / predicted, recall = TP / support, F1 = 2PR / (P + R); 0/0 -> 0.
EXPECTED = {
    "a": {"precision": 3 / 6, "recall": 3 / 4, "f1": 0.6, "support": 4},      # 2*.5*.75/1.25
    "b": {"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7, "support": 3},    # 2*.5*(2/3)/(7/6)
    "c": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3},
}
EXPECTED_ACCURACY = 0.5  # 5 of 10
EXPECTED_MACRO = {"precision": 1 / 3, "recall": 17 / 36, "f1": 41 / 105, "support": 10}
# weighted: (4*a + 3*b + 3*c) / 10
EXPECTED_WEIGHTED = {"precision": 0.35, "recall": 0.5, "f1": 2.88 / 7, "support": 10}


def assert_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


# ---- metrics -----------------------------------------------------------------------------------


def test_confusion_matrix_counts() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == CM
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], 3)


def test_classification_report_matches_hand_computed_values() -> None:
    report = classification_report(Y_TRUE, Y_PRED, NAMES)
    assert list(report["per_class"]) == NAMES
    for name in NAMES:
        assert_metrics(report["per_class"][name], EXPECTED[name])
    assert report["accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    assert_metrics(report["macro_avg"], EXPECTED_MACRO)
    assert_metrics(report["weighted_avg"], EXPECTED_WEIGHTED)
    assert report["num_samples"] == 10
    json.dumps(report)  # plain Python types only


def test_classification_report_class_absent_everywhere() -> None:
    # Class 2 neither occurs nor is predicted: every ratio is 0/0 -> 0.0; it still counts in the macro mean.
    report = classification_report([0, 1, 1], [0, 1, 0], ["x", "y", "z"])
    assert_metrics(report["per_class"]["z"], {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0})
    assert report["per_class"]["x"]["precision"] == pytest.approx(0.5)
    assert report["macro_avg"]["recall"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_format_report_lists_every_class_and_average() -> None:
    text = format_report(classification_report(Y_TRUE, Y_PRED, NAMES))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    for name in NAMES:
        assert any(line.split()[:1] == [name] for line in lines if line.strip())
    assert "0.7500" in text and "0.5714" in text  # recall of a, F1 of b
    acc_line = next(line for line in lines if line.strip().startswith("accuracy"))
    assert acc_line.split() == ["accuracy", "0.5000", "10"]
    assert any(line.strip().startswith("macro avg") for line in lines)
    assert any(line.strip().startswith("weighted avg") for line in lines)


# ---- plots -------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_confusion_matrix_counts_and_normalized(tmp_path: Path) -> None:
    cm = np.array(CM)
    plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png", normalize=False)
    plot_confusion_matrix(cm, NAMES, tmp_path / "cm_norm.png", normalize=True)
    assert_png(tmp_path / "cm.png")
    assert_png(tmp_path / "cm_norm.png")
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png", normalize=False)


def test_plot_error_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 48, 48), dtype=np.uint8)
    probs = np.full((10, 3), 0.2)
    probs[np.arange(10), Y_PRED] = 0.6
    drawn = plot_error_gallery(images, np.array(Y_TRUE), np.array(Y_PRED), probs, NAMES, tmp_path / "err.png")
    assert drawn == 5  # 5 of the 10 are wrong
    assert_png(tmp_path / "err.png")
    assert plot_error_gallery(images, np.array(Y_TRUE), np.array(Y_PRED), probs, NAMES, tmp_path / "err2.png",
                              max_images=2) == 2
    # No mistakes: still a (small) valid PNG.
    right = np.array(Y_TRUE)
    assert plot_error_gallery(images, right, right, probs, NAMES, tmp_path / "none.png") == 0
    assert (tmp_path / "none.png").read_bytes()[:8] == PNG_MAGIC


# ---- evaluate() --------------------------------------------------------------------------------


def weights_meta(label_set: str = "fer7") -> dict:
    classes = list(FER2013_NAMES) if label_set == "fer7" else [n for n in FER2013_NAMES if n != "disgust"]
    return {"model": MODEL, "num_classes": len(classes), "classes": classes, "label_set": label_set,
            "input_size": 48, "normalize": "dataset", "model_kwargs": {}}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised (untrained) model saved the way the trainer saves one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(create_model(MODEL), path, weights_meta())
    return path


@pytest.fixture
def loaded(weights_file: Path) -> tuple[torch.nn.Module, dict]:
    from ferkit.models.weights import load_model

    return load_model(weights_file)


def test_evaluate_on_tiny_data(tiny_csv: Path, loaded: tuple, weights_file: Path, tmp_path: Path) -> None:
    model, meta = loaded
    data = load_dataset(str(tiny_csv), meta["label_set"])
    result = evaluate(model, meta, data, "test", precision="fp32", device="cpu", weights_path=weights_file)
    assert result.split == "PrivateTest" and result.tta == "none" and result.num_samples == 35
    assert result.probs.shape == (35, 7) and result.probs.dtype == np.float32
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.accuracy == pytest.approx(float(np.mean(result.probs.argmax(1) == result.labels)))
    np.testing.assert_array_equal(result.labels, data.split("PrivateTest").labels)
    np.testing.assert_array_equal(result.rows, data.split("PrivateTest").rows)
    assert result.confusion_matrix.sum() == 35
    np.testing.assert_array_equal(result.confusion_matrix.sum(axis=1),
                                  np.bincount(result.labels, minlength=7))

    js = result.to_json()
    json.dumps(js)
    for key in ("accuracy", "per_class", "confusion_matrix", "macro_avg", "weighted_avg", "split",
                "num_samples", "tta", "model", "weights_sha256", "data_sha256"):
        assert key in js, key
    assert list(js["per_class"]) == list(FER2013_NAMES)
    assert set(js["per_class"]["happy"]) == {"precision", "recall", "f1", "support"}
    assert js["model"] == MODEL and len(js["weights_sha256"]) == 64 and js["data_sha256"] == data.sha256

    path = save_probs(result, tmp_path / "probs.npz")
    back = load_probs(path)
    np.testing.assert_array_equal(back["probs"], result.probs)
    assert back["probs"].dtype == np.float32
    np.testing.assert_array_equal(back["labels"], result.labels)
    np.testing.assert_array_equal(back["rows"], result.rows)
    assert back["classes"] == list(FER2013_NAMES) and back["split"] == "PrivateTest" and back["tta"] == "none"


def test_evaluate_tta_and_bf16(tiny_csv: Path, loaded: tuple) -> None:
    model, meta = loaded
    data = load_dataset(str(tiny_csv), "fer7")
    few = data.subset(np.flatnonzero(data.usage == "PublicTest")[:4])  # ten-crop is 10 forward passes
    for tta in ("flip", "tencrop", "center"):
        r = evaluate(model, meta, few, "val", tta=tta, precision="fp32", device="cpu")
        assert r.probs.shape == (4, 7) and r.tta == tta
        np.testing.assert_allclose(r.probs.sum(axis=1), 1.0, atol=1e-5)
    r = evaluate(model, meta, few, "val", precision="bf16", device="cpu")  # bf16 autocast on CPU
    assert r.precision == "bfloat16"
    np.testing.assert_allclose(r.probs.sum(axis=1), 1.0, atol=1e-3)
    r = evaluate(model, meta, few, "val", precision="auto", device="cpu")
    assert r.precision == ("bfloat16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="TTA"):
        evaluate(model, meta, few, "val", tta="mirror")
    with pytest.raises(ValueError, match="no Training rows"):
        evaluate(model, meta, few, "train", precision="fp32")


def test_evaluate_rejects_label_set_mismatch(tiny_csv: Path, loaded: tuple) -> None:
    model, meta = loaded
    data6 = load_dataset(str(tiny_csv), "fer6")
    with pytest.raises(ValueError, match="label-set mismatch"):
        evaluate(model, meta, data6, "test", precision="fp32")
    with pytest.raises(ValueError, match="label-set mismatch"):
        evaluate(model, weights_meta("fer6"), load_dataset(str(tiny_csv), "fer7"), "test", precision="fp32")


def test_write_artifacts(tiny_csv: Path, loaded: tuple, tmp_path: Path) -> None:
    model, meta = loaded
    data = load_dataset(str(tiny_csv), "fer7")
    result = evaluate(model, meta, data, "PrivateTest", precision="fp32", device="cpu")
    paths = write_artifacts(result, data.split("PrivateTest").images, tmp_path / "eval")
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "errors.png"):
        assert_png(paths[name])
    report = paths["report.txt"].read_text()
    assert "happy" in report and "weighted avg" in report and "accuracy" in report
    metrics = json.loads(paths["metrics.json"].read_text())
    assert metrics["accuracy"] == pytest.approx(result.accuracy) and metrics["num_samples"] == 35


def test_select_tta_chooses_on_public_test_and_breaks_ties_by_fewer_views(
        tiny_csv: Path, loaded: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from ferkit.models.predict import TTA_MODES, TTA_VIEW_COUNTS, tta_views

    ev = importlib.import_module("ferkit.evaluation.evaluate")  # the module: the package's `evaluate` is the function
    model, meta = loaded
    data = load_dataset(str(tiny_csv), "fer7")
    # The view counts the tie-break uses are tta_views' own.
    assert {m: tta_views(torch.zeros(2, 1, 48, 48), m, 40 if m in ("tencrop", "center") else None).shape[0]
            for m in TTA_MODES} == TTA_VIEW_COUNTS
    # Real evaluations: every mode scored on PublicTest, the chosen one the most accurate, each as evaluate gives.
    selection = select_tta(model, meta, data, precision="fp32", device="cpu")
    assert list(selection.results) == list(TTA_MODES)
    assert all(r.split == "PublicTest" and r.tta == m for m, r in selection.results.items())
    assert selection.accuracies[selection.chosen] == max(selection.accuracies.values())
    alone = evaluate(model, meta, data, "PublicTest", tta="shift", precision="fp32", device="cpu")
    assert selection.accuracies["shift"] == alone.accuracy
    js = selection.to_json()
    json.dumps(js)
    assert js["selected_on"] == "PublicTest" and js["chosen"] == selection.chosen and js["views"]["tencrop"] == 10
    # The rule, with scores set by hand: the best PublicTest accuracy; a tie goes to fewer views, then to order.
    scores = {"none": 0.5, "flip": 0.7, "tencrop": 0.7, "center": 0.6, "shift": 0.7}
    asked: list[tuple[str, str]] = []

    def fake_evaluate(model, meta, data, split, tta, **kwargs):
        asked.append((split, tta))
        return ev.EvaluationResult(scores[tta], {}, np.zeros((7, 7)), np.zeros((0, 7)), np.zeros(0), np.zeros(0),
                                   split, tta, list(FER2013_NAMES))

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    assert ev.select_tta(model, meta, data).chosen == "flip"  # 0.7 with 2 views, not shift's 5 or tencrop's 10
    assert {split for split, _ in asked} == {"PublicTest"}  # never the reported split
    scores.update(none=0.6)
    assert ev.select_tta(model, meta, data, modes=("center", "none")).chosen == "center"  # equal views: order
    assert ev.select_tta(model, meta, data, modes=("none", "none")).results.keys() == {"none"}  # asked once
    assert ev.select_tta(model, meta, data, modes=("tencrop", "shift")).chosen == "shift"  # fewer views, not order
    assert ev.select_tta(model, meta, data, modes=("shift", "flip")).chosen == "flip"


def test_select_tta_refuses_bad_modes_and_data_without_public_test(tiny_csv: Path, loaded: tuple) -> None:
    model, meta = loaded
    data = load_dataset(str(tiny_csv), "fer7")
    for modes in ((), ("flip", "mirror"), ("auto",)):
        with pytest.raises(ValueError, match="TTA modes"):
            select_tta(model, meta, data, modes=modes)
    test_only = data.subset(np.flatnonzero(data.usage == "PrivateTest"))
    with pytest.raises(ValueError, match="TTA is selected on PublicTest.*no PublicTest rows"):
        select_tta(model, meta, test_only)


# ---- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, ["evaluate", *args])


def test_cli_json_and_save_probs(tiny_csv: Path, weights_file: Path, tmp_path: Path) -> None:
    probs = tmp_path / "p.npz"
    res = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--json", "--precision", "fp32",
              "--save-probs", str(probs), "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)  # stdout holds the JSON object and nothing else
    for key in ("accuracy", "per_class", "confusion_matrix", "macro_avg", "weighted_avg"):
        assert key in js
    assert js["split"] == "PrivateTest" and js["num_samples"] == 35 and len(js["confusion_matrix"]) == 7
    back = load_probs(probs)
    assert back["probs"].shape == (35, 7)
    assert js["accuracy"] == pytest.approx(float(np.mean(back["probs"].argmax(1) == back["labels"])))
    assert js["artifacts"]["probs"] == str(probs)
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "errors.png", "report.txt"):
        assert (tmp_path / "out" / name).is_file(), name
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"] == js["accuracy"]


def test_cli_text_report_with_flip(tiny_csv: Path, weights_file: Path) -> None:
    res = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--split", "val", "--tta", "flip",
              "--precision", "fp32")
    assert res.exit_code == 0, res.output
    assert "PublicTest" in res.stdout and "tta=flip" in res.stdout
    assert "weighted avg" in res.stdout and "surprise" in res.stdout


def test_cli_tta_select_reports_the_mode_chosen_on_public_test(tiny_csv: Path, weights_file: Path,
                                                               tmp_path: Path) -> None:
    res = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--tta", "select", "--json",
              "--precision", "fp32")
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)
    chosen = js["tta_selection"]["chosen"]
    assert js["split"] == "PrivateTest" and js["tta"] == chosen
    assert js["tta_selection"]["selected_on"] == "PublicTest" and len(js["tta_selection"]["accuracy"]) == 5
    plain = json.loads(cli("--weights", str(weights_file), "--data", str(tiny_csv), "--tta", chosen, "--json",
                           "--precision", "fp32").stdout)
    assert js["accuracy"] == plain["accuracy"]  # the reported split scored under the chosen mode
    # Reporting PublicTest itself: the selection's own evaluation, the same number.
    val = json.loads(cli("--weights", str(weights_file), "--data", str(tiny_csv), "--tta", "select", "--split",
                         "val", "--json", "--precision", "fp32").stdout)
    assert val["accuracy"] == val["tta_selection"]["accuracy"][val["tta"]] == max(
        val["tta_selection"]["accuracy"].values())
    assert val["weights_sha256"] == js["weights_sha256"] == plain["weights_sha256"] and len(js["weights_sha256"]) == 64
    text = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--tta", "select", "--precision", "fp32")
    assert text.exit_code == 0 and f"tta chosen {chosen} on PublicTest" in text.stdout
    # A data file without PublicTest rows: a clear error naming the split, no traceback.
    test_only = tmp_path / "test_only.csv"
    lines = tiny_csv.read_text().splitlines()
    test_only.write_text("\n".join([lines[0], *(ln for ln in lines[1:] if ln.endswith("PrivateTest"))]) + "\n")
    res = cli("--weights", str(weights_file), "--data", str(test_only), "--tta", "select")
    assert res.exit_code == 2 and "TTA is selected on PublicTest" in res.stderr and "Traceback" not in res.output


def test_cli_tta_select_scores_public_test_once_per_mode(tiny_csv: Path, weights_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Reporting PublicTest reuses the chosen mode's evaluation (5 passes, one per mode); another split is one more.
    import importlib

    import ferkit.evaluation as package

    module = importlib.import_module("ferkit.evaluation.evaluate")
    real, calls = module.evaluate, []

    def counting(model, meta, data, split, *args, **kwargs):
        calls.append((split, kwargs.get("tta")))
        return real(model, meta, data, split, *args, **kwargs)

    monkeypatch.setattr(module, "evaluate", counting)  # what select_tta calls
    monkeypatch.setattr(package, "evaluate", counting)  # what the CLI calls
    for split, passes in (("val", 5), ("test", 6)):
        calls.clear()
        res = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--tta", "select", "--split", split,
                  "--json", "--precision", "fp32")
        assert res.exit_code == 0, res.output
        assert len(calls) == passes and calls[:5] == [("PublicTest", m) for m in
                                                      ("none", "flip", "tencrop", "center", "shift")]


def test_cli_missing_data_file(weights_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    res = cli("--weights", str(weights_file), "--data", str(missing))
    assert res.exit_code == 2
    assert "nope.csv" in res.stderr and "Traceback" not in res.output


def test_cli_user_errors(tiny_csv: Path, weights_file: Path, tmp_path: Path) -> None:
    res = cli("--weights", str(tmp_path / "gone.safetensors"), "--data", str(tiny_csv))
    assert res.exit_code == 2 and "gone.safetensors" in res.stderr
    res = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--split", "holdout")
    assert res.exit_code == 2 and "holdout" in res.stderr
    res = cli("--weights", str(weights_file), "--data", str(tiny_csv), "--tta", "mirror")
    assert res.exit_code == 2 and "mirror" in res.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels,Usage\n9,1 2 3,PrivateTest\n")
    res = cli("--weights", str(weights_file), "--data", str(bad))
    assert res.exit_code == 2 and "line 2" in res.stderr and "Traceback" not in res.output
    six = tmp_path / "six.safetensors"
    save_weights(create_model(MODEL, num_classes=6), six, weights_meta("fer6"))
    res = cli("--weights", str(six), "--data", str(tiny_csv), "--split", "PublicTest", "--json",
              "--precision", "fp32")
    assert res.exit_code == 0, res.output  # data is loaded with the weights' label set (disgust dropped)
    assert list(json.loads(res.stdout)["per_class"]) == [n for n in FER2013_NAMES if n != "disgust"]


def test_cli_help_has_examples() -> None:
    res = runner.invoke(app, ["evaluate", "--help"])
    assert res.exit_code == 0
    assert "Examples" in res.stdout and "--save-probs" in res.stdout and "--json" in res.stdout


def test_cli_missing_default_weights(tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ferkit.models.weights as weights_module

    absent = tmp_path / "ferkit_default.safetensors"
    monkeypatch.setattr(weights_module, "default_weights_path", lambda: absent)
    res = cli("--data", str(tiny_csv))
    assert res.exit_code == 2
    assert "default weights" in res.stderr and "--weights" in res.stderr


def test_auto_precision_follows_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a CPU without native bf16 (AVX2 only) bf16 autocast is emulated and ~10x slower than fp32,
    # so "auto" must fall back to fp32 there; explicit choices are always honoured.
    import ferkit.device as device_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    assert resolve_precision("fp32", cpu) is None
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", cpu)
