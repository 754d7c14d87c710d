"""Cross-fitted distillation targets (issue #24): stratified folds, holdout=K/N runs, `ferkit crossfit` scoring
each fold with the run that never saw it, and teacher=FILE.npz joining those scores to a student's faces; with the
bad inputs each path takes (settings, run directories, targets files, data files)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import damage_file, synthetic_rows, write_csv
from test_training import small_config
from typer.testing import CliRunner

import ferkit.training.distill as distill
import ferkit.training.trainer as trainer
from ferkit.cli import app
from ferkit.data import load_dataset
from ferkit.models.predict import predict_proba
from ferkit.models.weights import load_model
from ferkit.training import TrainConfig, train
from ferkit.training.crossfit import CrossfitTargets, TargetsError, crossfit_targets, training_faces

runner = CliRunner()


def steps_of_first_epoch(run_dir: Path) -> int:
    return int(trainer._read_metrics(run_dir / "metrics.csv")[0]["step"])


# ---- folds and the holdout setting ------------------------------------------------------------------------------


def test_folds_are_stratified_disjoint_and_reproducible(tiny_csv: Path) -> None:
    faces = load_dataset(str(tiny_csv)).split("Training")  # 70 faces, 10 of each class
    fold = faces.folds(5)
    assert sorted(np.bincount(fold)) == [14] * 5  # every face in exactly one fold, folds of one size
    for f in range(5):  # each fold holds 2 faces of every class
        assert np.bincount(faces.labels[fold == f], minlength=7).tolist() == [2] * 7
    assert (faces.folds(5) == fold).all()
    assert not (faces.folds(5, seed=1) == fold).all()
    uneven = faces.folds(3)  # 70 = 24 + 23 + 23
    assert sorted(np.bincount(uneven)) == [23, 23, 24]


def test_folds_are_a_fixed_function_of_rows_and_labels() -> None:
    # No random generator: these folds are what any machine and NumPy build computes (pinned here), and they
    # follow the faces (their source rows), not their position in the array.
    from ferkit.data import FaceData, get_label_set

    rows = np.arange(100, 114)
    faces = FaceData(images=np.zeros((14, 48, 48), np.uint8), labels=np.repeat([0, 3], 7),
                     usage=np.full(14, "Training"), rows=rows, label_set=get_label_set("fer7"))
    assert faces.folds(3).tolist() == PINNED_FOLDS
    shuffled = faces.subset(np.arange(14)[::-1])
    assert shuffled.folds(3).tolist() == PINNED_FOLDS[::-1]


PINNED_FOLDS = [0, 0, 0, 1, 1, 2, 2, 1, 0, 2, 0, 1, 2, 1]


def test_five_folds_of_fer2013(real_csv: Path) -> None:
    # The folds a 5-fold cross-fit of FER2013 trains on: 28,709 faces in folds of 5,741-5,742, each class split
    # within one face (disgust's 436 faces: 87-88 a fold), pinned by count so a change to folds() shows.
    faces = load_dataset(str(real_csv)).split("Training")
    fold = faces.folds(5)
    assert np.bincount(fold).tolist() == [5742, 5742, 5742, 5742, 5741]
    per_class = np.stack([np.bincount(faces.labels[fold == k], minlength=7) for k in range(5)])
    assert (per_class.max(0) - per_class.min(0) <= 1).all() and per_class[:, 1].tolist() == [88, 87, 87, 87, 87]


@pytest.mark.parametrize("n", [0, 1, 71, 2.0, "2"])
def test_folds_refuse_impossible_counts(tiny_csv: Path, n: object) -> None:
    faces = load_dataset(str(tiny_csv)).split("Training")
    with pytest.raises(ValueError, match="folds: need 2 <= n <= 70"):
        faces.folds(n)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0/5", "6/5", "1/1", "1/101", "a/b", "1/5/2", "-1/5", "1.5/5", "1/", "/5", " 1/5",
                                   "3", "1/5 ", "\u0661/\u0665"])
def test_holdout_setting_is_checked(value: str) -> None:
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(holdout=value).validate()


def test_holdout_from_the_command_line_is_a_string() -> None:
    assert TrainConfig().override(["holdout=2/5"]).holdout == "2/5"
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig().override(["holdout=3"]).validate()  # JSON 3, kept as the text "3": not K/N


def test_a_holdout_run_trains_on_the_other_folds(tiny_csv: Path, tmp_path: Path) -> None:
    # 70 faces in batches of 16: 5 steps an epoch; without one fold of 5 (14 faces), 56 faces: 4 steps.
    whole = train(small_config(tiny_csv, tmp_path, run_name="whole", epochs=1))
    held = train(small_config(tiny_csv, tmp_path, run_name="held", epochs=1, holdout="1/5"))
    assert steps_of_first_epoch(whole.run_dir) == 5 and steps_of_first_epoch(held.run_dir) == 4
    faces = load_dataset(str(tiny_csv)).split("Training")
    cfg = small_config(tiny_csv, tmp_path, holdout="1/5")
    assert set(training_faces(faces_data := load_dataset(str(tiny_csv)), cfg).rows) == set(
        faces.rows[faces.folds(5) != 0])
    assert len(training_faces(faces_data, replace(cfg, limit_train=30))) == 24  # limit first, then the fold


# ---- ferkit crossfit ---------------------------------------------------------------------------------------------


def crossfit_runs(data: Path, out: Path, n: int = 2, **kw: object) -> list[Path]:
    return [train(small_config(data, out, run_name=f"fold{k}", epochs=1, holdout=f"{k}/{n}", **kw)).run_dir
            for k in range(1, n + 1)]


def test_crossfit_scores_each_fold_with_the_run_that_held_it_out(tiny_csv: Path, tmp_path: Path) -> None:
    runs = crossfit_runs(tiny_csv, tmp_path)
    out = tmp_path / "targets.npz"
    result = runner.invoke(app, ["crossfit", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fold 1/2" in result.output and "fold 2/2" in result.output and "70 training faces" in result.output
    targets = CrossfitTargets.load(out)
    faces = load_dataset(str(tiny_csv)).split("Training")
    assert (np.sort(targets.rows) == np.sort(faces.rows)).all() and targets.folds == 2
    fold = faces.folds(2)
    for k, run in enumerate(runs):
        model, meta = load_model(run / "best.safetensors")
        mine = fold == k
        expected = predict_proba(model, faces.images[mine], input_size=48, tta="flip")
        assert np.allclose(targets.for_faces(faces)[mine], expected, atol=1e-6)
        assert targets.runs[k]["holdout"] == f"{k + 1}/2" and targets.runs[k]["faces"] == 35
    assert json.loads(str(np.load(out)["meta"]))["held_out_accuracy"] == pytest.approx(targets.accuracy(), abs=1e-6)


def test_a_student_distils_from_the_targets_of_its_own_faces(tiny_csv: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    runs = crossfit_runs(tiny_csv, tmp_path)
    out = tmp_path / "targets.npz"
    crossfit_targets(runs).save(out)
    targets = CrossfitTargets.load(out)
    seen: list[torch.Tensor] = []
    real = distill.teacher_probabilities
    monkeypatch.setattr(distill, "teacher_probabilities", lambda *a: seen.append(real(*a)) or seen[-1])
    student = train(small_config(tiny_csv, tmp_path, run_name="student", epochs=1, teacher=str(out),
                                 limit_train=40))
    faces = load_dataset(str(tiny_csv)).split("Training").subset(np.arange(40))
    assert torch.equal(seen[0], torch.from_numpy(targets.for_faces(faces)))
    assert seen[0].shape == (40, 7)
    teacher = json.loads((student.run_dir / "manifest.json").read_text())["teacher"]
    assert teacher["path"] == str(out) and len(teacher["sha256"]) == 64


@pytest.mark.parametrize("case", ["plain run", "missing fold", "two fold counts", "not a run", "no weights",
                                  "other limit_train", "other data", "config not JSON", "config a list",
                                  "config with an unknown key", "manifest a list", "manifest data a string",
                                  "manifest not JSON", "no manifest"])
def test_crossfit_refuses_runs_that_do_not_make_one_crossfit(tiny_csv: Path, tmp_path: Path, case: str) -> None:
    runs = crossfit_runs(tiny_csv, tmp_path)
    data = None
    if case == "plain run":
        runs = [train(small_config(tiny_csv, tmp_path, run_name="plain", epochs=1)).run_dir]
        match = "trained on all the Training faces"
    elif case == "missing fold":
        runs, match = runs[:1], "no run holds out fold 2 of 2"
    elif case == "two fold counts":
        runs.append(train(small_config(tiny_csv, tmp_path, run_name="third", epochs=1, holdout="1/3")).run_dir)
        match = "one N for all"
    elif case == "not a run":
        runs, match = [*runs, tmp_path], "not a training run"
    elif case == "no weights":
        (runs[1] / "best.safetensors").unlink()
        match = "has no best.safetensors"
    elif case == "other limit_train":
        runs[1] = train(small_config(tiny_csv, tmp_path, run_name="short", epochs=1, holdout="2/2",
                                     limit_train=40)).run_dir
        match = "differ in limit_train"
    elif case == "other data":
        data = write_csv(tmp_path / "other.csv", synthetic_rows({"Training": 70, "PublicTest": 35}, seed=5))
        match = "score a run on the data it was trained on"
    elif case.startswith("config"):
        config = runs[1] / "config.json"
        text = {"config not JSON": '{"holdout": "2/', "config a list": "[1]",
                "config with an unknown key": json.dumps(json.loads(config.read_text()) | {"colour": 1})}[case]
        config.write_text(text)
        match = f"{config}: not a training config"
    else:
        manifest = runs[1] / "manifest.json"
        text = {"manifest a list": "[]", "manifest data a string": '{"data": "abc"}', "manifest not JSON": "{",
                "no manifest": None}[case]
        manifest.unlink() if text is None else manifest.write_text(text)
        match = ("trained on data None" if case == "manifest data a string"
                 else f"{manifest}: cannot tell what the run trained on")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        crossfit_targets(runs, data)


def test_the_folds_of_a_sweep_make_one_crossfit(tiny_csv: Path, tmp_path: Path) -> None:
    # The workflow `ferkit crossfit --help` teaches: the N holdout runs as one sweep, its trial directories gathered.
    result = runner.invoke(app, ["sweep", "--data", str(tiny_csv), "--name", "cf", "--out", str(tmp_path),
                                 "--no-progress", "holdout=1/2,2/2", "model=sixclass_cnn4", "epochs=1",
                                 "batch_size=16", "precision=fp32"])
    assert result.exit_code == 0, result.output
    trials = sorted((tmp_path / "cf").glob("trial-*"))
    result = runner.invoke(app, ["crossfit", *map(str, trials), "--out", str(tmp_path / "cf.npz")])
    assert result.exit_code == 0, result.output
    assert len(CrossfitTargets.load(tmp_path / "cf.npz").rows) == 70


def test_crossfit_on_an_image_folder(tmp_path: Path, cache_dir: Path) -> None:
    from PIL import Image

    from ferkit.data import get_label_set

    classes = get_label_set("fer7").classes
    for split, n in (("train", 28), ("val", 14)):
        for i, (label, pixels, _) in enumerate(synthetic_rows({split: n})):
            path = tmp_path / "faces" / split / classes[label] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array(pixels.split(), np.uint8).reshape(48, 48)).save(path)
    runs = crossfit_runs(tmp_path / "faces", tmp_path)
    targets = crossfit_targets(runs)  # the folder named in the runs' config.json
    assert len(targets.rows) == 28 and targets.runs[0]["faces"] == 14
    folder = load_dataset(str(tmp_path / "faces")).split("Training")
    assert targets.for_faces(folder).shape == (28, 7)


def test_crossfit_command_names_bad_arguments(tiny_csv: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["crossfit", str(tmp_path), "--out", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 2 and "must end in .npz" in result.output
    result = runner.invoke(app, ["crossfit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 2 and "not a training run" in result.output
    assert not (tmp_path / "t.npz").exists()


# ---- targets files as teachers -----------------------------------------------------------------------------------


@pytest.fixture
def targets_file(tiny_csv: Path, tmp_path: Path) -> Path:
    """Targets for tiny_csv's Training faces written as `ferkit crossfit` writes them (uniform probabilities:
    the file's checks and join are what these tests need, not a trained network's scores)."""
    faces = load_dataset(str(tiny_csv)).split("Training")
    path = tmp_path / "targets.npz"
    CrossfitTargets(np.full((len(faces), 7), 1 / 7, dtype=np.float32), faces.rows, faces.labels,
                    list(faces.label_set.classes), faces.sha256, 2).save(path)
    return path


def rewrite(path: Path, **changes: object) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("case", ["empty", "truncated", "not npz", "npy", "pickled", "no meta", "wrong format",
                                  "nan", "negative", "not summing to 1", "repeated face", "rows of another length",
                                  "integer probabilities", "classes of another length", "label out of range",
                                  "runs not a list", "one fold"])
def test_a_bad_targets_file_is_refused_before_training(tiny_csv: Path, tmp_path: Path, targets_file: Path,
                                                       case: str) -> None:
    probs = np.load(targets_file)["probabilities"]
    rows = np.load(targets_file)["rows"]
    if case in ("empty", "truncated", "not npz"):
        damage_file(targets_file, "text" if case == "not npz" else case, "probabilities\n0.5,0.5\n")
    elif case == "npy":
        with open(targets_file, "wb") as f:
            np.save(f, probs)
    elif case == "label out of range":
        rewrite(targets_file, labels=np.full(len(probs), 7))
    elif case in ("runs not a list", "one fold"):
        meta = json.loads(str(np.load(targets_file)["meta"]))
        rewrite(targets_file, meta=np.array(json.dumps(meta | ({"runs": 5} if case == "runs not a list" else
                                                                {"folds": 1}))))
    elif case == "pickled":
        rewrite(targets_file, meta=np.array([{"format": "x"}], dtype=object))
    elif case == "no meta":
        rewrite(targets_file, meta=None)
    elif case == "wrong format":
        rewrite(targets_file, meta=np.array(json.dumps({"format": "something-else/9"})))
    elif case == "nan":
        probs[3, 2] = np.nan
        rewrite(targets_file, probabilities=probs)
    elif case == "negative":
        probs[3, 2], probs[3, 3] = -0.1, probs[3, 3] + 0.1
        rewrite(targets_file, probabilities=probs)
    elif case == "not summing to 1":
        rewrite(targets_file, probabilities=probs * 2)
    elif case == "repeated face":
        rows[1] = rows[0]
        rewrite(targets_file, rows=rows)
    elif case == "rows of another length":
        rewrite(targets_file, rows=rows[:-1])
    elif case == "integer probabilities":
        rewrite(targets_file, probabilities=np.eye(7, dtype=np.int64)[np.arange(len(probs)) % 7])
    else:
        rewrite(targets_file, classes=np.array(["a", "b"]))
    assert zipfile.is_zipfile(targets_file) or case in ("empty", "truncated", "not npz", "npy")
    with pytest.raises(TargetsError, match=f"teacher targets {targets_file}"):
        CrossfitTargets.load(targets_file)
    with pytest.raises(ValueError, match="teacher targets"):
        train(small_config(tiny_csv, tmp_path, run_name="student", teacher=str(targets_file)))
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("case", ["other data", "other labels", "faces missing", "other classes", "online"])
def test_targets_that_do_not_fit_the_run_are_refused(tiny_csv: Path, tmp_path: Path, targets_file: Path,
                                                     case: str) -> None:
    cfg = small_config(tiny_csv, tmp_path, run_name="student", teacher=str(targets_file))
    targets = CrossfitTargets.load(targets_file)
    if case == "other data":
        other = write_csv(tmp_path / "other.csv", synthetic_rows({"Training": 70, "PublicTest": 35}, seed=5))
        cfg, match = replace(cfg, data=str(other)), "computed on other data than this run.s"
    elif case == "other labels":
        replace(targets, labels=(targets.labels + 1) % 7).save(targets_file)
        match = "70 of 70 faces carry another label"
    elif case == "faces missing":
        keep = np.arange(30)
        replace(targets, probabilities=targets.probabilities[keep], rows=targets.rows[keep],
                labels=targets.labels[keep]).save(targets_file)
        match = "no prediction for 40 of this run's 70"
    elif case == "other classes":
        cfg, match = replace(cfg, label_set="fer6"), "predicts"
    else:
        cfg, match = replace(cfg, distill_view="online"), "use distill_view=offline"
    with pytest.raises(ValueError, match=match):
        train(cfg)
