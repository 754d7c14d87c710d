"""ONNX export (`ferkit export --format onnx`, ferkit.export) and the Recognizer's ONNX Runtime backend.

Skipped as a whole when onnx / onnxruntime are not installed (ferkit dependencies, but a broken environment may
lack them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from ferkit.cli import app  # noqa: E402
from ferkit.data.labels import FER2013_NAMES  # noqa: E402
from ferkit.ensembles.artifact import load_ensemble, save_ensemble  # noqa: E402
from ferkit.ensembles.combine import EnsembleWeights, apply_ensemble  # noqa: E402
from ferkit.export import (  # noqa: E402
    check_parity,
    export_onnx,
    file_sha256,
    read_onnx_metadata,
    resolve_exporter,
)
from ferkit.inference import Recognizer  # noqa: E402
from ferkit.inference.image_io import sample_image_path  # noqa: E402
from ferkit.inference.onnx_backend import OnnxClassifier  # noqa: E402
from ferkit.models.predict import predict_proba  # noqa: E402
from ferkit.models.registry import create_model  # noqa: E402
from ferkit.models.weights import load_model, save_weights  # noqa: E402

CLASSES = list(FER2013_NAMES)
SAMPLE = sample_image_path()
runner = CliRunner()
EXPORTERS = ["legacy"] + (["dynamo"] if resolve_exporter("auto") == "dynamo" else [])


def _meta(name: str, classes: list[str] = CLASSES, normalize: str = "dataset") -> dict:
    return {"model": name, "num_classes": len(classes), "classes": classes, "label_set": "fer7",
            "input_size": create_model(name).input_size, "normalize": normalize, "model_kwargs": {}}


def _random_faces(n: int, side: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8)


def _perturb_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch norms non-trivial running statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("w") / "vgg_s.safetensors"
    torch.manual_seed(0)
    save_weights(_perturb_bn(create_model("ferkit_vgg_s")), path, _meta("ferkit_vgg_s"))
    return path


@pytest.fixture(scope="module")
def onnx_file(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(weights, tmp_path_factory.mktemp("onnx") / "vgg_s.onnx")


def _parity(model: torch.nn.Module, meta: dict, path: Path, n: int = 20) -> float:
    faces = _random_faces(n, seed=n)
    ref = predict_proba(model, faces, input_size=meta["input_size"], norm=meta["normalize"])
    got = OnnxClassifier(path).predict_proba(faces, input_size=meta["input_size"], norm=meta["normalize"])
    assert got.shape == ref.shape == (n, len(meta["classes"]))
    return float(np.abs(got - ref).max())


def test_export_metadata_and_dynamic_batch(weights: Path, onnx_file: Path) -> None:
    meta = read_onnx_metadata(onnx_file)
    assert meta["classes"] == CLASSES and meta["input_size"] == 48 and meta["normalize"] == "dataset"
    assert meta["model"] == "ferkit_vgg_s" and meta["num_classes"] == 7
    assert meta["onnx"]["source_sha256"] == file_sha256(weights)
    assert meta["onnx"]["exporter"] == resolve_exporter("auto")
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "input" and out.name == "probabilities" and inp.shape[1:] == [1, 48, 48]
    assert isinstance(inp.shape[0], str)  # a named, dynamic batch axis
    for b in (1, 5, 64):
        probs = sess.run(None, {"input": np.random.default_rng(b).normal(size=(b, 1, 48, 48)).astype(np.float32)})[0]
        assert probs.shape == (b, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    props = {p.key: p.value for p in __import__("onnx").load(str(onnx_file)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["input_size"] == "48"


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_single_model_parity(weights: Path, tmp_path: Path, exporter: str) -> None:
    path = export_onnx(weights, tmp_path / f"{exporter}.onnx", exporter=exporter)
    model, meta = load_model(weights)
    assert _parity(model, meta, path) <= 1e-4
    assert check_parity(model, path, 48) <= 1e-4


def test_export_of_a_loaded_mini_xception_is_plain_convolutions(tmp_path: Path) -> None:
    # load_model returns channels_last modules and mini-Xception trains its strided shortcuts as slice + conv;
    # the export must still be the plain graph (slices, as_strided gathers and layout ops cost ~30 % of the
    # fast model's ONNX Runtime time at batch 1) and compute the same probabilities.
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    weights = tmp_path / "mx.safetensors"
    save_weights(_perturb_bn(create_model("mini_xception")), weights, _meta("mini_xception"))
    model, meta = load_model(weights)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    path = export_onnx((model, meta), tmp_path / "mx.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops.isdisjoint({"Slice", "Gather", "Range", "Shape", "Transpose"}), ops
    assert _parity(model, meta, path) <= 1e-4


def test_numpy_fast_path_and_small_batch_session_match_the_general_path(onnx_file: Path) -> None:
    from ferkit.inference.onnx_backend import SMALL_BATCH
    from ferkit.models.predict import preprocess

    clf = OnnxClassifier(onnx_file, threads=2)
    for n in (1, SMALL_BATCH, 9):
        faces = _random_faces(n, seed=n)
        fast = clf.predict_proba(faces, input_size=48)  # NumPy preprocessing; small batches on their session
        general = clf.session.run(None, {"input": preprocess(torch.as_tensor(faces), 48, "dataset").numpy()})[0]
        np.testing.assert_allclose(fast, general, atol=1e-6)
        chunked = clf.predict_proba(faces, input_size=48, batch_size=2)  # several batches, then concatenated
        np.testing.assert_allclose(chunked, general, atol=1e-6)
        mirrored = clf.session.run(None, {"input": preprocess(torch.as_tensor(faces[..., ::-1].copy()), 48,
                                                              "dataset").numpy()})[0]
        for size in (256, 2):  # flip TTA: faces and mirror images in one run, one batch or several
            flip = clf.predict_proba(faces, input_size=48, tta="flip", batch_size=size)
            np.testing.assert_allclose(flip, (general + mirrored) / 2, atol=1e-6)
    assert clf.predict_proba(_random_faces(0), input_size=48).shape == (0, 7)
    assert clf._small_session is not None  # timed and chosen on the first small batch
    assert clf._small_session in (clf.session,) or clf._small_session.get_session_options().intra_op_num_threads == 1
    single = OnnxClassifier(onnx_file, threads=1)
    single.predict_proba(_random_faces(1), input_size=48)
    assert single._small_session is single.session  # nothing to choose from with one thread


def test_other_input_size_and_normalization_parity(tmp_path: Path) -> None:
    """A 64-pixel model with per-image normalization: metadata and preprocessing travel with the file."""
    w = tmp_path / "am.safetensors"
    torch.manual_seed(1)
    save_weights(_perturb_bn(create_model("agrawal_mittal")), w, _meta("agrawal_mittal", normalize="per_image"))
    path = export_onnx(w, tmp_path / "am.onnx")
    meta = read_onnx_metadata(path)
    assert meta["input_size"] == 64 and meta["normalize"] == "per_image"
    model, meta = load_model(w)
    assert _parity(model, meta, path) <= 1e-4


@pytest.mark.parametrize("method", ["accuracy_weighted", "class_weighted", "vote", "log_linear"])
def test_saved_ensemble_parity(tmp_path: Path, method: str) -> None:
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append((_perturb_bn(create_model("frivas_cnn3"), seed), _meta("frivas_cnn3")))
    cw = np.random.default_rng(0).random((2, 7)) if method == "class_weighted" else None
    mw = np.array([1.0, 2.0]) if method == "vote" else np.array([0.4, 0.6])
    ens = save_ensemble(tmp_path / "ens.safetensors", members, EnsembleWeights(method, method, mw, cw))
    path = export_onnx(ens, tmp_path / "ens.onnx")
    meta = read_onnx_metadata(path)
    assert meta["ensemble"] is True and meta["method"] == method and meta["classes"] == CLASSES
    model, meta = load_ensemble(ens)
    assert _parity(model, meta, path) <= 1e-4


@pytest.mark.parametrize("method", ["vote", "log_linear"])
@pytest.mark.parametrize("tta", ["flip", "shift"])
def test_saved_ensemble_onnx_under_multi_view_tta(tmp_path: Path, method: str, tta: str) -> None:
    # The export carries the members' probabilities, so the ONNX backend can average each member over the views
    # before combining, as the ensemble was fitted (and as the torch backend does).
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append((_perturb_bn(create_model("frivas_cnn3"), seed), _meta("frivas_cnn3")))
    faces = _random_faces(30, seed=3)
    member_probs = np.stack([predict_proba(m, faces, input_size=48, tta=tta) for m, _ in members])
    weights = EnsembleWeights(method, method, np.array([1.0, 2.0]) if method == "vote" else np.array([0.7, 0.9]))
    ens = save_ensemble(tmp_path / "ens.safetensors", members, weights, tta=tta)
    got = OnnxClassifier(export_onnx(ens, tmp_path / "ens.onnx")).predict_proba(faces, input_size=48, tta=tta)
    assert got == pytest.approx(apply_ensemble(weights, member_probs), abs=1e-4)


def test_export_needs_metadata_for_a_bare_module(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta"):
        export_onnx(create_model("frivas_cnn3"), tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        export_onnx(tmp_path / "missing.safetensors", tmp_path / "x.onnx")


class _Branchy(torch.nn.Module):
    """Python control flow on a buffer's value (like tan_pca's PCA stage): torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(48 * 48, 7)
        self.register_buffer("k", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(self.k) > 0:
            x = x * 2
        return self.lin(x.flatten(1))


class _BakedBatch(torch.nn.Module):
    """`len(x)` becomes a constant under the TorchScript tracer: the graph then only takes the example's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(48 * 48, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(len(x), -1))


@pytest.mark.skipif("dynamo" not in EXPORTERS, reason="needs onnxscript (the dynamo exporter)")
def test_auto_exporter_falls_back_to_the_legacy_one(tmp_path: Path) -> None:
    path = export_onnx(_Branchy(), tmp_path / "b.onnx", meta=_meta("frivas_cnn3"))
    assert read_onnx_metadata(path)["onnx"]["exporter"].startswith("legacy (dynamo failed")
    with pytest.raises(Exception):  # noqa: B017 - forcing dynamo surfaces torch's own error
        export_onnx(_Branchy(), tmp_path / "c.onnx", meta=_meta("frivas_cnn3"), exporter="dynamo")


def test_a_wrong_export_is_refused_and_not_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch size 1"):
        export_onnx(_BakedBatch(), tmp_path / "bad.onnx", meta=_meta("frivas_cnn3"), exporter="legacy")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", "--format", "onnx", "--weights", str(weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "max |probability difference|" in result.stdout
    assert read_onnx_metadata(out)["classes"] == CLASSES
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format"),
    (["--weights", "missing.safetensors"], "not found"),
    (["--exporter", "magic"], "--exporter"),
])
def test_cli_export_usage_errors(weights: Path, args: list[str], message: str) -> None:
    base = ["export"] + ([] if "--weights" in args else ["--weights", str(weights)])
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# -- Recognizer(backend="onnx") ----------------------------------------------------------------------------

@pytest.mark.parametrize("tta", [False, "flip", "tencrop", "center", "shift"])
def test_recognizer_onnx_backend_matches_torch(weights: Path, cache_dir: Path, tta: bool | str) -> None:
    torch_rec = Recognizer(model=weights, device="cpu", tta=tta)
    onnx_rec = Recognizer(model=weights, device="cpu", tta=tta, backend="onnx")
    assert onnx_rec.backend == "onnx" and "backend='onnx'" in repr(onnx_rec)
    faces = _random_faces(9, seed=3)
    assert np.abs(onnx_rec.predict_proba(faces) - torch_rec.predict_proba(faces)).max() <= 1e-4
    a, b = torch_rec.detect_emotions(SAMPLE), onnx_rec.detect_emotions(SAMPLE)
    assert [f["box"] for f in a] == [f["box"] for f in b]
    assert b[0]["emotions"] == pytest.approx(a[0]["emotions"], abs=1e-4)
    assert len(list((cache_dir / "onnx").glob("*.onnx"))) == 1  # exported once, then reused


def test_recognizer_reuses_the_cached_export(weights: Path, cache_dir: Path) -> None:
    Recognizer(model=weights, device="cpu", backend="onnx")
    (cached,) = (cache_dir / "onnx").glob("*.onnx")
    stamp = cached.stat().st_mtime_ns
    Recognizer(model=weights, device="cpu", backend="onnx")
    assert cached.stat().st_mtime_ns == stamp


def test_recognizer_from_an_onnx_file(weights: Path, onnx_file: Path) -> None:
    rec = Recognizer(model=str(onnx_file), device="cpu", detector="none")
    assert rec.backend == "onnx" and rec.model is None and rec.classes == CLASSES and rec.input_size == 48
    ref = Recognizer(model=weights, device="cpu", detector="none")
    faces = _random_faces(4, seed=5)
    assert np.abs(rec.predict_proba(faces) - ref.predict_proba(faces)).max() <= 1e-4
    assert rec.classify_faces(faces[0], color="gray")["dominant"] in CLASSES


def test_recognizer_backend_errors(weights: Path, onnx_file: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Recognizer(model=weights, device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="fp32"):
        Recognizer(model=weights, device="cpu", backend="onnx", precision="bf16")
    with pytest.raises(ValueError, match="not both"):
        Recognizer(model=str(onnx_file), weights=weights, device="cpu")


def test_a_cached_export_is_used_without_importing_onnx_or_onnxscript(weights: Path, tmp_path: Path) -> None:
    # Importing onnx + onnxscript takes seconds: the default backend ("auto", ONNX Runtime on CPU) must not pay
    # them at every start, only when it exports (once per weights file).
    import os
    import subprocess
    import sys

    from ferkit.inference.onnx_backend import cached_export

    cached_export(weights, cache_dir=tmp_path / "onnx")
    code = ("import sys; from ferkit import Recognizer; "
            f"r = Recognizer(model={str(weights)!r}, detector='none', device='cpu'); "
            "print(r.backend, 'onnx' in sys.modules, 'onnxscript' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FERKIT_CACHE": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["onnx", "False", "False"]
