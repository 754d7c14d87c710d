"""Weights files are not trusted (issue #26): metadata sizes are bounded and consistent, tensors finite and as
recorded (tensors_sha256), run directories stand for their best.safetensors, saved ensembles' weights are finite
and non-negative, and no NaN reaches a prediction or its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FILE_DAMAGES, damage_file
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import FER2013_NAMES
from ferkit.ensembles import EnsembleWeights, fit_ensemble, load_ensemble, save_ensemble
from ferkit.inference import Recognizer, batch
from ferkit.models import create_model
from ferkit.models.predict import NonFiniteOutputError, predict_proba
from ferkit.models.weights import (
    DIGEST_KEY,
    WeightsError,
    find_weights,
    load_model,
    read_metadata,
    resolve_weights,
    save_weights,
)

runner = CliRunner()
CLASSES = list(FER2013_NAMES)


def small_meta(**kw: Any) -> dict[str, Any]:
    return {"model": "tan_mlp", "num_classes": 7, "classes": CLASSES, "label_set": "fer7", "input_size": 48,
            "normalize": "dataset", "model_kwargs": {}} | kw


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A tan_mlp (an MLP: four tensors, fast to load) saved by ferkit."""
    torch.manual_seed(0)
    path = tmp_path / "small.safetensors"
    save_weights(create_model("tan_mlp"), path, small_meta())
    return path


def rewrite(path: Path, out: Path, meta: dict[str, Any] | None = None,
            tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Copy a weights file with its metadata and/or tensors replaced as they are (no new digest): what an
    edited or forged file looks like."""
    state = load_file(str(path)) | (tensors or {})
    save_file(state, str(out), metadata={"ferkit": json.dumps(read_metadata(path) if meta is None else meta)})
    return out


# ---- tensors: digest and finiteness ---------------------------------------------------------------------

def test_saving_records_a_digest_that_loading_verifies(small: Path, tmp_path: Path) -> None:
    meta = read_metadata(small)
    assert len(meta[DIGEST_KEY]) == 64
    load_model(small)
    weight = load_file(str(small))["net.1.weight"].clone()
    weight[0, 0] += 1.0
    tampered = rewrite(small, tmp_path / "tampered.safetensors", tensors={"net.1.weight": weight})
    with pytest.raises(WeightsError, match=f"tampered.safetensors.*{DIGEST_KEY}"):
        load_model(tampered)


def test_files_without_a_digest_still_load(small: Path, tmp_path: Path) -> None:
    # The shipped weights predate tensors_sha256: a file that records none loads (unverified).
    meta = read_metadata(small)
    del meta[DIGEST_KEY]
    _, loaded = load_model(rewrite(small, tmp_path / "old.safetensors", meta))
    assert DIGEST_KEY not in loaded


def test_resaving_replaces_a_stale_digest(small: Path, tmp_path: Path) -> None:
    model, meta = load_model(small)
    out = tmp_path / "half.safetensors"
    save_weights(model, out, meta, half=True)  # other bytes (fp16) than the digest `meta` carries
    assert read_metadata(out)[DIGEST_KEY] != meta[DIGEST_KEY]
    load_model(out)


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "metadata_not_json"])
def test_unreadable_weights_files_are_weights_errors_naming_the_file(small: Path, tmp_path: Path,
                                                                     damage: str) -> None:
    # safetensors raises its own error type, which callers catching ValueError missed: `ferkit crossfit` over a
    # run with a damaged best.safetensors ended in a traceback.
    path = tmp_path / f"{damage}.safetensors"
    if damage in FILE_DAMAGES:
        path.write_bytes(small.read_bytes())
        damage_file(path, damage)
    else:
        save_file(load_file(str(small)), str(path), metadata={"ferkit": "{not json"})
    with pytest.raises(WeightsError, match=f"{damage}.safetensors: "):
        load_model(path)


def test_cli_output_files_that_cannot_be_written_fail_before_the_work(small: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("notes")
    (tmp_path / "adir.npz").mkdir()
    runner = CliRunner()
    for args, message in (
            (["crossfit", str(tmp_path / "no-run"), "--out", str(afile / "t.npz")], "cannot write a file into"),
            (["crossfit", str(tmp_path / "no-run"), "--out", str(tmp_path / "adir.npz")], "is a folder, not a file"),
            (["ensemble", "--weights", str(small), "--data", str(tmp_path / "none.csv"), "--method", "mean",
              "--save", str(afile / "e.safetensors")], "--save .* cannot write a file into"),
            (["ensemble", "--weights", str(small), "--data", str(tmp_path / "none.csv"), "--method", "mean",
              "--save", str(tmp_path / "adir.npz")], "is a folder, not a file")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message.split(" .* ")[-1] in result.output, (args, result.output)
        # Checked before the runs are read or the members run: the missing run and data are not what it says.
        assert "Traceback" not in result.output and "no-run" not in result.output and "none.csv" not in result.output
    assert afile.read_text() == "notes"
    # The check makes no folders: a command refused by a later check leaves nothing behind.
    result = runner.invoke(app, ["ensemble", "--weights", str(small), "--data", str(tmp_path / "none.csv"),
                                 "--method", "all", "--save", str(tmp_path / "new" / "sub" / "e.safetensors")])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_naming_the_tensor(small: Path, tmp_path: Path, bad: float) -> None:
    bias = load_file(str(small))["net.3.bias"].clone()
    bias[3] = bad
    meta = read_metadata(small)
    del meta[DIGEST_KEY]  # the digest would catch it too; finiteness is checked on its own
    path = rewrite(small, tmp_path / "nan.safetensors", meta, {"net.3.bias": bias})
    with pytest.raises(WeightsError, match=r"nan.safetensors: tensor net.3.bias holds NaN or infinite"):
        load_model(path)


# ---- metadata ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"input_size": 60000}, "'input_size' is 60000; expected an integer in 8..256"),
    ({"input_size": "48"}, "'input_size' is '48'"),
    ({"num_classes": 2_000_000_000}, "'num_classes' is 2000000000"),
    ({"num_classes": 7.0}, "'num_classes' is 7.0"),
    ({"classes": CLASSES[:6] + ["angry"]}, "'classes' names 'angry' more than once"),
    ({"classes": CLASSES[:6]}, "lists 6 class names for num_classes 7"),
    ({"classes": CLASSES[:6], "num_classes": 6}, "tensor net.3.bias has shape \\[7\\], the model needs \\[6\\]"),
    ({"normalize": "imagenet"}, "'normalize' is 'imagenet'; expected one of dataset, per_image, none"),
    ({"model_kwargs": {"hidden": 10**9}}, "'model_kwargs.hidden' is 1000000000"),
    ({"model_kwargs": {"hidden": 301}}, "tensor net.1.bias has shape \\[300\\], the model needs \\[301\\]"),
    ({"model_kwargs": {"depth": 3}}, "cannot build 'tan_mlp'"),
    ({"model_kwargs": [1]}, "'model_kwargs' is \\[1\\]; expected an object"),
])
def test_inconsistent_or_oversized_metadata_is_refused(small: Path, tmp_path: Path, change: dict,
                                                       message: str) -> None:
    path = rewrite(small, tmp_path / "bad.safetensors", read_metadata(small) | change)
    with pytest.raises(WeightsError, match=f"bad.safetensors.*{message}"):
        load_model(path)


def test_an_input_size_the_architecture_cannot_take_fails_at_load(weights: Path, tmp_path: Path) -> None:
    # ferkit_vgg_s's classifier is sized for 48-pixel faces: 40 used to fail on every file of a predict batch.
    path = rewrite(weights, tmp_path / "vgg40.safetensors", read_metadata(weights) | {"input_size": 40})
    with pytest.raises(WeightsError, match="vgg40.safetensors: the model cannot run on input_size 40"):
        load_model(path)


def test_onnx_file_metadata_is_checked_too(small: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from ferkit.export import export_onnx

    model, meta = load_model(small)
    path = export_onnx((model, meta | {"normalize": "imagenet"}), tmp_path / "bad.onnx")
    with pytest.raises(WeightsError, match="bad.onnx: metadata field 'normalize' is 'imagenet'"):
        Recognizer(model=str(path), detector="none", device="cpu")


# ---- run directories ---------------------------------------------------------------------------------------

def test_a_run_directory_stands_for_its_best_weights(small: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run directory .*x has no best.safetensors"):
        find_weights(run)
    with pytest.raises(FileNotFoundError, match="has no best.safetensors"):
        load_model(run)
    (run / "best.safetensors").write_bytes(small.read_bytes())
    assert resolve_weights(run) == run / "best.safetensors" == find_weights(str(run))
    assert load_model(run)[1]["model"] == "tan_mlp"
    assert Recognizer(model=str(run), detector="none", device="cpu").weights_path == run / "best.safetensors"


def test_cli_weights_run_directory(small: Path, tmp_path: Path, tiny_csv: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    args = ["evaluate", "--data", str(tiny_csv), "--weights", str(run), "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "has no best.safetensors" in result.output, result.output
    (run / "best.safetensors").write_bytes(small.read_bytes())
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == str(run / "best.safetensors")


# ---- ensembles ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [[0.5, float("nan")], [1.0, -0.5], [float("inf"), 1.0], []])
def test_ensemble_weights_must_be_finite_and_non_negative(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="member weights must be"):
        EnsembleWeights("mean", "mean", np.array(weights))
    with pytest.raises(ValueError, match="member weights must be"):
        EnsembleWeights.from_json({"method": "mean", "member_weights": weights})


def test_class_weights_must_be_finite_and_non_negative() -> None:
    with pytest.raises(ValueError, match="class weights must be finite and non-negative"):
        EnsembleWeights("class_weighted", "class_weighted", np.ones(2), class_weights=np.array([[1, np.nan]] * 2))


def save_two_member_ensemble(small: Path, tmp_path: Path) -> Path:
    probs = np.full((2, 7, 7), 1 / 7)
    weights = fit_ensemble("mean", probs, np.arange(7))
    return save_ensemble(tmp_path / "ens.safetensors", [small, small], weights)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["weights"].update(member_weights=[0.5, float("nan")]), "member weights must be finite"),
    (lambda m: m["weights"].update(member_weights=[0.5, -1]), "member weights must be finite"),
    (lambda m: m.update(members=[], num_members=0), "needs a non-empty 'members' list"),
    (lambda m: m.update(tta="rotate"), "'tta' is 'rotate'"),
    (lambda m: m["members"][1].update(input_size=60000), r"\(member 1\): metadata field 'input_size' is 60000"),
    (lambda m: m["members"][0].update(classes=CLASSES[::-1]), r"\(member 0\): classes .* differs"),
])
def test_saved_ensembles_are_checked_on_load(small: Path, tmp_path: Path, edit: Any, message: str) -> None:
    path = save_two_member_ensemble(small, tmp_path)
    assert load_ensemble(path)[0].ensemble_weights.num_members == 2
    meta = read_metadata(path)
    edit(meta)
    bad = rewrite(path, tmp_path / "bad_ens.safetensors", meta)
    with pytest.raises(WeightsError, match=f"bad_ens.safetensors.*{message}"):
        load_model(bad)  # an ensemble loads through load_model too


def test_saved_ensemble_tensors_are_verified(small: Path, tmp_path: Path) -> None:
    path = save_two_member_ensemble(small, tmp_path)
    assert DIGEST_KEY not in read_metadata(path)["members"][0]  # the ensemble's own digest covers them
    bias = load_file(str(path))["m1.net.3.bias"] + 1
    with pytest.raises(WeightsError, match=DIGEST_KEY):
        load_ensemble(rewrite(path, tmp_path / "t.safetensors", tensors={"m1.net.3.bias": bias}))


# ---- no NaN in predictions ---------------------------------------------------------------------------------

class NaNModel(nn.Module):
    """Outputs NaN scores for the second face of a batch (as an overflowing fp16 model would)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 7) * self.scale
        out[1::2] = float("nan")
        return out


def test_predictions_refuse_non_finite_outputs() -> None:
    faces = np.zeros((4, 48, 48), np.uint8)
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite probabilities for 2 of 4 face"):
        predict_proba(NaNModel(), faces, input_size=48, batch_size=2)


class FakeRecognizer:
    """detect_faces finds one face per file; describe fails like a model giving NaN for 'bad.png'."""

    detector = "fake"

    def detect_faces(self, path: Path) -> tuple[np.ndarray, list, np.ndarray]:
        return np.zeros((8, 8, 3), np.uint8), [path], np.zeros((1, 48, 48), np.uint8)

    def describe(self, dets: list, faces: np.ndarray) -> list[dict[str, Any]]:
        if dets[0].name == "bad.png":
            raise NonFiniteOutputError("the model produced NaN or infinite probabilities for 1 of 1 face(s)")
        return [{"box": [0, 0, 8, 8], "emotions": {"happy": 1.0}, "dominant": "happy", "face_score": 1.0}]


def test_a_non_finite_output_fails_its_file_not_the_batch(tmp_path: Path) -> None:
    for name in ("a.png", "bad.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    entries, _ = batch.run(FakeRecognizer(), [tmp_path / n for n in ("a.png", "bad.png", "c.png")], progress=False)
    assert [bool(e.faces) for e in entries] == [True, False, True]
    assert "NaN" in entries[1].error and entries[0].error is None and entries[2].error is None


def test_json_output_refuses_nan(tmp_path: Path) -> None:
    entry = batch.Entry("x.png", faces=[{"emotions": {"happy": float("nan")}}])
    with pytest.raises(ValueError, match="not JSON compliant"):
        batch.write_json([entry], tmp_path / "r.json", {})


def test_cli_predict_with_bad_weights_metadata_exits_2_naming_the_file(small: Path, tmp_path: Path) -> None:
    bad = rewrite(small, tmp_path / "bad.safetensors", read_metadata(small) | {"normalize": "imagenet"})
    photo = Path(__file__).resolve().parents[1] / "src" / "ferkit" / "assets" / "astronaut.jpg"
    result = runner.invoke(app, ["predict", str(photo), str(photo), "--weights", str(bad), "--detector", "none",
                                 "--no-progress", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "bad.safetensors: metadata field 'normalize'" in result.output and "Traceback" not in result.output
