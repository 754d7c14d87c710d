"""Ensembles: every method on hand-computed examples, greedy selection, no PrivateTest leakage into fitting,
prediction files (and their mismatch errors), the saved-ensemble round trip, snapshot ensembles, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data import load_dataset
from ferkit.data.labels import LABEL_SETS
from ferkit.ensembles import (
    METHODS,
    EnsembleModel,
    EnsembleWeights,
    accuracy_weighted,
    apply_ensemble,
    canonical_method,
    class_weighted,
    evaluate_methods,
    fit_ensemble,
    format_table,
    greedy_selection,
    load_ensemble,
    load_prediction_files,
    log_linear,
    log_linear_selection,
    majority_vote,
    mean,
    member_accuracies,
    per_class_precision,
    plot_members_vs_ensemble,
    predict_members,
    save_ensemble,
    snapshot_members,
)
from ferkit.ensembles import predictions as predictions_module
from ferkit.evaluation import evaluate
from ferkit.models import create_model
from ferkit.models.predict import predict_proba
from ferkit.models.weights import load_model, save_weights
from ferkit.training import TrainConfig, train

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---- a hand-worked 2-member, 2-class example ----------------------------------------------------------------
# PublicTest (fitting): labels 0 0 1 1.
#   A predicts 0 0 1 0 -> accuracy 3/4; precision: class 0 = 2/3 (3 predicted, 2 right), class 1 = 1/1.
#   B predicts 1 0 0 0 -> accuracy 1/4; precision: class 0 = 1/3, class 1 = 0/1.
PUB_LABELS = np.array([0, 0, 1, 1])
PUB = np.array([
    [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],  # A
    [[0.4, 0.6], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]],  # B
])
# PrivateTest (reporting): labels 1 0.
PRIV_LABELS = np.array([1, 0])
PRIV = np.array([
    [[0.3, 0.7], [0.6, 0.4]],  # A
    [[0.9, 0.1], [0.3, 0.7]],  # B
])
# mean:              face 0 [0.60, 0.40] -> 0 (wrong), face 1 [0.45, 0.55] -> 1 (wrong): accuracy 0
# accuracy_weighted: w = (0.75, 0.25) / 1.0; face 0 [0.45, 0.55] -> 1, face 1 [0.525, 0.475] -> 0: accuracy 1
# class_weighted:    W = [[2/3, 1], [1/3, 0]]; face 0 S = [2/3*.3 + 1/3*.9, .7] = [.5, .7] -> [5/12, 7/12];
#                    face 1 S = [2/3*.6 + 1/3*.3, .4] = [.5, .4] -> [5/9, 4/9]: accuracy 1
MEAN_PRIV = [[0.6, 0.4], [0.45, 0.55]]
ACC_PRIV = [[0.45, 0.55], [0.525, 0.475]]
CLASS_PRIV = [[5 / 12, 7 / 12], [5 / 9, 4 / 9]]


def test_mean_by_hand() -> None:
    assert mean(PRIV) == pytest.approx(np.array(MEAN_PRIV))
    w = fit_ensemble("mean", PUB, PUB_LABELS)
    assert w.member_weights == pytest.approx([0.5, 0.5])
    assert apply_ensemble(w, PRIV) == pytest.approx(np.array(MEAN_PRIV))


def test_accuracy_weighted_by_hand() -> None:
    assert member_accuracies(PUB, PUB_LABELS) == pytest.approx([0.75, 0.25])
    w = fit_ensemble("accuracy_weighted", PUB, PUB_LABELS)
    assert w.member_weights == pytest.approx([0.75, 0.25])
    assert apply_ensemble(w, PRIV) == pytest.approx(np.array(ACC_PRIV))
    assert accuracy_weighted(PRIV, [0.75, 0.25]) == pytest.approx(np.array(ACC_PRIV))
    assert accuracy_weighted(PRIV, [0.6, 0.2]) == pytest.approx(np.array(ACC_PRIV))  # only ratios matter
    assert accuracy_weighted(PRIV, [0.0, 0.0]) == pytest.approx(np.array(MEAN_PRIV))  # all zero -> uniform
    # Public accuracy of the fitted ensemble: faces 0-2 right, face 3 [0.65, 0.35] wrong.
    assert w.public_accuracy == pytest.approx(0.75)


def test_class_weighted_by_hand() -> None:
    assert per_class_precision(PUB, PUB_LABELS) == pytest.approx(np.array([[2 / 3, 1.0], [1 / 3, 0.0]]))
    w = fit_ensemble("class_weighted", PUB, PUB_LABELS)
    assert w.class_weights == pytest.approx(np.array([[2 / 3, 1.0], [1 / 3, 0.0]]))
    assert apply_ensemble(w, PRIV) == pytest.approx(np.array(CLASS_PRIV))
    # A face whose weighted scores are all zero falls back to the plain mean.
    out = class_weighted([[[1.0, 0.0]], [[0.5, 0.5]]], [[0.0, 1.0], [0.0, 0.0]])
    assert out == pytest.approx(np.array([[0.75, 0.25]]))


def test_majority_vote_by_hand() -> None:
    probs = np.array([
        [[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]],  # A votes 0, 0
        [[0.4, 0.35, 0.25], [0.1, 0.9, 0.0]],  # B votes 0, 1
        [[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]],  # C votes 2, 2
    ])
    out = majority_vote(probs)
    # Face 0: votes 2/3 for class 0 although the mean prefers class 2 (0.4167 > 0.3333).
    # Face 1: a three-way tie, broken by the summed probability: class 1 (1.6) beats 0 (1.0) and 2 (0.4).
    assert list(out.argmax(1)) == [0, 1]
    assert list(mean(probs).argmax(1)) == [2, 1]
    eps = 1e-3  # min(1e-3, 0.5 / 3 votes)
    votes = np.array([[2 / 3, 0, 1 / 3], [1 / 3, 1 / 3, 1 / 3]])
    summed = np.array([[1 / 3, 0.25, 1.25 / 3], [1 / 3, 1.6 / 3, 0.4 / 3]])
    assert out == pytest.approx((votes + eps * summed) / (1 + eps))
    assert out.sum(1) == pytest.approx([1.0, 1.0])
    w = fit_ensemble("majority_vote", probs, np.array([0, 1]))
    assert w.method == "vote" and w.member_weights == pytest.approx([1, 1, 1])
    assert apply_ensemble(w, probs) == pytest.approx(out)


def test_greedy_selection_known_answer() -> None:
    # All faces are class 0; each entry is P(class 0).
    #   A right on faces 0-3 (4/6), B right on faces 2-5 (4/6), C right on faces 0-4 (5/6, the best single).
    # Step 1 picks C. Step 2: C+B is right everywhere (face 5: (0.4 + 0.9) / 2), C+A and C+C stay at 5/6.
    # Nothing beats 6/6, so the shortest best prefix [C, B] is kept.
    p0 = np.array([[0.9, 0.9, 0.9, 0.9, 0.45, 0.45],
                   [0.45, 0.45, 0.9, 0.9, 0.9, 0.9],
                   [0.9, 0.9, 0.9, 0.9, 0.9, 0.4]])
    probs = np.stack([p0, 1 - p0], axis=-1)
    labels = np.zeros(6, dtype=int)
    w = greedy_selection(probs, labels, "mean")
    assert w.method == "greedy" and w.combiner == "mean"
    assert w.selected == (2, 1)
    assert w.member_weights == pytest.approx([0.0, 0.5, 0.5])
    assert w.public_accuracy == 1.0
    assert fit_ensemble("greedy", probs, labels).selected == (2, 1)
    # Capped at one member: the best single member.
    assert greedy_selection(probs, labels, max_members=1).selected == (2,)
    # Without replacement nobody is chosen twice, even with many steps.
    no_rep = greedy_selection(probs, labels, "vote", max_members=10, replacement=False)
    assert len(set(no_rep.selected)) == len(no_rep.selected)


def test_greedy_with_replacement_counts_become_weights() -> None:
    # All faces are class 0; each entry is P(class 0).
    p0 = np.array([[0.99, 0.2, 0.99, 0.95],   # A: right on 0, 2, 3 (3/4)
                   [0.2, 0.2, 0.2, 0.2],      # B: never right
                   [0.9, 0.7, 0.9, 0.45]])    # C: right on 0, 1, 2 (3/4, lower NLL than A)
    probs = np.stack([p0, 1 - p0], axis=-1)
    labels = np.zeros(4, dtype=int)
    # Step 1: A and C tie at 3/4; C has the lower NLL. Step 2: C+A (3/4, face 1 at 0.45) beats C+C on NLL.
    # Step 3: C again: weights 2/3, 1/3 get face 1 right ((1.4 + 0.2) / 3 = 0.533) and face 3 (0.617): 4/4.
    w = greedy_selection(probs, labels, "mean", max_members=3)
    assert w.selected == (2, 0, 2)
    assert w.member_weights == pytest.approx([1 / 3, 0.0, 2 / 3])
    assert w.public_accuracy == 1.0
    assert (apply_ensemble(w, probs).argmax(1) == 0).all()
    # Without replacement the best prefix of C, A, B is C alone.
    no_rep = greedy_selection(probs, labels, "mean", max_members=3, replacement=False)
    assert no_rep.selected == (2,) and no_rep.public_accuracy == 0.75


def test_log_linear_by_hand() -> None:
    # Face 0 of PRIV: A [0.3, 0.7], B [0.9, 0.1]. Weights (1, 1): the normalized product
    # [0.27, 0.07] / 0.34; weights (2, 0): A squared, [0.09, 0.49] / 0.58; all zero: uniform.
    assert log_linear(PRIV, [1, 1])[0] == pytest.approx([0.27 / 0.34, 0.07 / 0.34])
    assert log_linear(PRIV, [2, 0])[0] == pytest.approx([0.09 / 0.58, 0.49 / 0.58])
    assert log_linear(PRIV, [0, 0]) == pytest.approx(np.full((2, 2), 0.5))
    # An exact 0 counts as LOG_FLOOR (1e-6), so one member cannot veto a class the other is sure of.
    out = log_linear([[[0.0, 1.0]], [[1 - 1e-9, 1e-9]]], [1, 1])
    assert out[0] == pytest.approx([1e-6 / (1e-6 + 1e-6), 0.5], rel=1e-3)
    with pytest.raises(ValueError, match="non-negative"):
        log_linear(PRIV, [1, -1])


def test_log_linear_fit_tempers_an_overconfident_member() -> None:
    # Member A says [0.9, 0.1] on every face but only 3 faces in 4 are class 0. The likelihood is best when
    # the pooled P(class 0) = 0.9^w / (0.9^w + 0.1^w) equals 3/4: w = log 3 / log 9 = 0.5.
    # Member B is uniform (log P constant over classes: it cannot move the output) and gets weight 0;
    # a copy of A shares A's weight evenly (the optimum only fixes their sum).
    labels = np.array([0, 0, 0, 1] * 5)
    a = np.tile([0.9, 0.1], (20, 1))
    b = np.full((20, 2), 0.5)
    w = fit_ensemble("log_linear", np.stack([a, b]), labels)
    assert w.method == w.combiner == "log_linear"
    assert w.member_weights == pytest.approx([0.5, 0.0], abs=1e-5)
    assert apply_ensemble(w, np.stack([a, b]))[0] == pytest.approx([0.75, 0.25], abs=1e-5)
    assert w.public_accuracy == pytest.approx(0.75)
    twins = fit_ensemble("geometric", np.stack([a, a]), labels)
    assert twins.member_weights == pytest.approx([0.25, 0.25], abs=1e-5)


def network_members(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four members on 3 classes: `strong` (right on 70 % of faces), its TTA copy `strong_flip` (the same network
    under flip: near-identical), `other` (right on a different 60 %, so it adds to `strong`), `noise` (uniform-ish
    random guesses, adds nothing)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)

    def member(p_right: float, jitter: float = 0.0) -> np.ndarray:
        right = rng.random(n) < p_right
        guess = np.where(right, y, (y + rng.integers(1, 3, n)) % 3)
        p = np.full((n, 3), 0.15)
        p[np.arange(n), guess] = 0.7
        p = p + jitter * rng.random((n, 3))
        return p / p.sum(1, keepdims=True)

    strong = member(0.7)
    flip = strong + 0.01 * rng.random((n, 3))
    probs = np.stack([strong, flip / flip.sum(1, keepdims=True), member(0.6), member(1 / 3, jitter=0.5)])
    return probs, y


def test_log_linear_capped_to_networks_chooses_by_likelihood_and_groups_tta_copies() -> None:
    probs, y = network_members()
    groups = ["strong", "strong", "other", "noise"]
    one = log_linear_selection(probs, y, 1, groups)
    assert one.selected == (0, 1) and one.used_members() in ([0], [1], [0, 1])  # the strong network, both views
    two = fit_ensemble("log_linear", probs, y, max_members=2, groups=groups)
    assert two.selected == (0, 1, 2) and two.member_weights[3] == 0.0
    # its weights are the plain log_linear fit restricted to the chosen members
    alone = fit_ensemble("log_linear", probs[[0, 1, 2]], y)
    assert two.member_weights[:3] == pytest.approx(alone.member_weights, abs=1e-4)
    assert two.public_accuracy == pytest.approx(alone.public_accuracy)
    # without groups each member is a network: one pick is one member
    assert len(log_linear_selection(probs, y, 1).selected) == 1
    # a cap at or above the number of networks is the plain fit (no selection recorded)
    full = fit_ensemble("log_linear", probs, y, max_members=3, groups=groups)
    plain = fit_ensemble("log_linear", probs, y)
    assert full.selected == () and full.member_weights == pytest.approx(plain.member_weights)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_members": 0}, "max_members must be positive"),
    ({"max_members": -2}, "max_members must be positive"),
    ({"max_members": 1, "groups": ["a", "b"]}, "groups name 2"),
])
def test_log_linear_selection_bad_values(kwargs: dict, message: str) -> None:
    probs, y = network_members(n=30)
    with pytest.raises(ValueError, match=message):
        log_linear_selection(probs, y, **kwargs)


def test_member_networks_strip_only_the_members_own_tta_suffix() -> None:
    members = random_members(m=4)
    members.names = ["vgg_flip", "vgg", "net_flip", "x_shift"]
    members.ttas = ["flip", "none", "none", "flip"]  # net_flip was not run under flip: its name is just a name
    assert predictions_module.member_networks(members) == ["vgg", "vgg", "net_flip", "x_shift"]
    members.ttas = []
    assert predictions_module.member_networks(members) == members.names


def test_cli_log_linear_max_members_counts_networks(tmp_path: Path) -> None:
    probs, y = network_members()
    files = []
    for name, p in zip(("strong", "strong_flip", "other", "noise"), probs, strict=True):
        path = write_predictions(tmp_path / f"{name}.npz", p, y, p, y, classes=("a", "b", "c"))
        if name.endswith("_flip"):  # as `ferkit ensemble --tta flip --save-predictions` writes it, renamed
            data = dict(np.load(path))
            np.savez_compressed(path, **(data | {"tta": np.array("flip")}))
        files.append(path)
    result = runner.invoke(app, ["ensemble", "--from-predictions", *map(str, files), "--method", "log_linear",
                                 "--max-members", "2", "--json"])
    assert result.exit_code == 0, result.output
    ens = json.loads(result.stdout)["ensembles"][0]
    assert ens["name"] == "log_linear(2 networks)"
    # the members it uses: `other` and the strong network's (one or both of its views: near-twins share weight)
    assert ens["selected"][-1] == "other" and set(ens["selected"][:-1]) <= {"strong", "strong_flip"}
    assert ens["selected"][:-1] and ens["member_weights"]["noise"] == 0.0
    table = runner.invoke(app, ["ensemble", *map(str, files), "--method", "log_linear", "--max-members", "1"])
    assert table.exit_code == 0 and "log_linear(1 network)" in table.output


def test_capped_log_linear_records_and_counts_only_the_members_it_uses(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    # A chosen network whose member the refit sets to 0 is neither counted in the name nor recorded as a member.
    from ferkit.ensembles.records import report_rows

    members = random_members(m=3)
    members.names, members.ttas = ["a", "a_flip", "b"], ["none", "flip", "none"]
    fitted = EnsembleWeights("log_linear", "log_linear", np.array([0.0, 0.8, 0.0]), selected=(0, 1, 2))
    monkeypatch.setattr(predictions_module, "fit_ensemble", lambda *a, **k: fitted)
    report = evaluate_methods(members, ["log_linear"], max_members=2)
    row = report.ensembles[0]
    assert row["name"] == "log_linear(1 network)" and row["selected"] == ["a_flip"]
    assert report_rows(report, "capped", "cmd")[0]["members"] == "a_flip"


def test_capped_log_linear_never_sees_privatetest() -> None:
    members = random_members(seed=4, m=5)
    members.names = ["a", "a_flip", "b", "c", "d"]
    members.ttas = ["none", "flip", "none", "none", "none"]
    clean = evaluate_methods(members, ["log_linear"], max_members=2).weights["log_linear"]
    members.private.labels = (members.private.labels + 1) % 3
    members.private.probs = members.private.probs[:, :, ::-1].copy()
    corrupted = evaluate_methods(members, ["log_linear"], max_members=2).weights["log_linear"]
    assert clean.selected and corrupted.to_json() == clean.to_json()


def test_method_names_and_weights_json_round_trip() -> None:
    assert canonical_method("majority_vote") == "vote" and canonical_method("Accuracy-Weighted") == "accuracy_weighted"
    with pytest.raises(ValueError, match="unknown ensemble method"):
        canonical_method("boosting")
    for method in METHODS:
        w = fit_ensemble(method, PUB, PUB_LABELS)
        again = EnsembleWeights.from_json(json.loads(json.dumps(w.to_json())))
        assert apply_ensemble(again, PRIV) == pytest.approx(apply_ensemble(w, PRIV))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="members, faces, classes"):
        fit_ensemble("mean", PUB[0], PUB_LABELS)
    with pytest.raises(ValueError, match="labels"):
        fit_ensemble("accuracy_weighted", PUB, PUB_LABELS[:3])
    with pytest.raises(ValueError, match="fitted for 2 members"):
        apply_ensemble(fit_ensemble("mean", PUB, PUB_LABELS), PRIV[:1])


# ---- fitting never sees PrivateTest -------------------------------------------------------------------------


def random_members(seed: int = 0, m: int = 4, n: int = 60, c: int = 3):
    rng = np.random.default_rng(seed)

    def split() -> predictions_module.SplitProbs:
        logits = rng.normal(size=(m, n, c))
        labels = rng.integers(0, c, n)
        logits[:, np.arange(n), labels] += rng.uniform(0, 2, size=(m, 1))  # members of different skill
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        return predictions_module.SplitProbs(p, labels, np.arange(n))

    return predictions_module.MemberSet(names=[f"m{i}" for i in range(m)], classes=list("abc"), public=split(),
                                        private=split())


def test_corrupted_private_labels_and_probs_give_identical_weights() -> None:
    members = random_members()
    clean = evaluate_methods(members)
    members.private.labels = (members.private.labels + 1) % 3
    members.private.probs = members.private.probs[:, :, ::-1].copy()
    corrupted = evaluate_methods(members)
    for method in METHODS:
        assert corrupted.weights[method].to_json() == clean.weights[method].to_json(), method
    for a, b in zip(clean.ensembles, corrupted.ensembles, strict=True):
        assert a["public_accuracy"] == b["public_accuracy"]


def test_only_public_arrays_reach_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    members = random_members(1)
    seen = []
    real_fit = predictions_module.fit_ensemble

    def spy(method, public_probs, public_labels, **kw):
        seen.append((public_probs, public_labels))
        return real_fit(method, public_probs, public_labels, **kw)

    monkeypatch.setattr(predictions_module, "fit_ensemble", spy)
    evaluate_methods(members)
    assert len(seen) == len(METHODS)
    for probs, labels in seen:
        assert probs is members.public.probs and labels is members.public.labels


# ---- prediction files ---------------------------------------------------------------------------------------


def write_predictions(path: Path, pub: np.ndarray, pub_labels, priv: np.ndarray, priv_labels,
                      classes=("a", "b"), pub_rows=None, priv_rows=None) -> Path:
    """A file as `ferkit reproduce` writes it (probabilities stored as float16)."""
    np.savez_compressed(path, classes=np.array(classes), model="toy", tta="none",
                        public_probs=np.asarray(pub, np.float16), public_labels=np.asarray(pub_labels),
                        public_rows=np.arange(len(pub)) if pub_rows is None else np.asarray(pub_rows),
                        private_probs=np.asarray(priv, np.float16), private_labels=np.asarray(priv_labels),
                        private_rows=np.arange(100, 100 + len(priv)) if priv_rows is None else np.asarray(priv_rows))
    return path


@pytest.fixture
def prediction_files(tmp_path: Path) -> list[Path]:
    d = tmp_path / "predictions"
    d.mkdir()
    return [write_predictions(d / f"{name}.npz", PUB[i], PUB_LABELS, PRIV[i], PRIV_LABELS)
            for i, name in enumerate(("alpha", "beta"))]


def test_prediction_files_every_method(prediction_files: list[Path]) -> None:
    members = load_prediction_files(prediction_files)
    assert members.names == ["alpha", "beta"] and members.classes == ["a", "b"]
    assert members.public.probs.shape == (2, 4, 2) and members.private.probs.shape == (2, 2, 2)
    report = evaluate_methods(members)
    by = {r["method"]: r for r in report.ensembles}
    assert set(by) == set(METHODS)
    assert by["mean"]["private_accuracy"] == 0.0 and by["mean"]["public_accuracy"] == 0.75
    assert by["accuracy_weighted"]["private_accuracy"] == 1.0
    assert by["class_weighted"]["private_accuracy"] == 1.0
    assert by["accuracy_weighted"]["member_weights"] == pytest.approx({"alpha": 0.75, "beta": 0.25})
    assert report.best_member["name"] == "alpha" and report.best_member["private_accuracy"] == 1.0
    text = format_table(report)
    for word in ("alpha", "beta", "best", "greedy(mean)", "class_weighted", "PrivateTest"):
        assert word in text


def test_prediction_file_mismatches_name_the_file(tmp_path: Path, prediction_files: list[Path]) -> None:
    good = prediction_files[0]
    cases = {
        "classes": write_predictions(tmp_path / "classes.npz", PUB[1], PUB_LABELS, PRIV[1], PRIV_LABELS,
                                     classes=("a", "c")),
        "rows": write_predictions(tmp_path / "rows.npz", PUB[1], PUB_LABELS, PRIV[1], PRIV_LABELS,
                                  pub_rows=[0, 1, 2, 7]),
        "labels": write_predictions(tmp_path / "labels.npz", PUB[1], [0, 0, 1, 0], PRIV[1], PRIV_LABELS),
        "faces": write_predictions(tmp_path / "faces.npz", PUB[1][:3], PUB_LABELS[:3], PRIV[1], PRIV_LABELS,
                                   pub_rows=[0, 1, 2]),
    }
    for what, path in cases.items():
        with pytest.raises(ValueError, match=str(path.name)) as err:
            load_prediction_files([good, path])
        assert what in str(err.value) or "rows" in str(err.value), what
    one_split = tmp_path / "one_split.npz"
    np.savez(one_split, probs=PUB[0], labels=PUB_LABELS, rows=np.arange(4), classes=np.array(["a", "b"]),
             split=np.array("PublicTest"))
    with pytest.raises(ValueError, match="one_split.npz.*both test"):
        load_prediction_files([good, one_split])
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_prediction_files([good, junk])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_prediction_files([good, tmp_path / "missing.npz"])


@pytest.mark.parametrize("damage, message", [
    ("sum20", r"PublicTest rows are not probabilities \(face 0: .*sum 20"),
    ("negative", "PublicTest rows are not probabilities"),
    ("strings", "PublicTest probabilities are <U.*, not floating-point numbers"),
    ("complex", "PublicTest probabilities are complex128, not floating-point numbers"),
    ("float_labels", "PublicTest labels are float64, not whole numbers"),
    ("label_range", r"PublicTest labels hold class indices outside 0..1"),
    ("no_faces", "no PublicTest faces"),
])
def test_prediction_files_that_are_not_probabilities_are_refused(tmp_path: Path, prediction_files: list[Path],
                                                                 damage: str, message: str) -> None:
    # Accepted before, they combined into silently wrong ensembles: a member whose rows sum to 20 dropped the
    # accuracy-weighted ensemble from 0.95 to 0.07; files without faces scored 0.0000 with exit status 0.
    pub, labels, rows = PUB[1].astype(np.float64), np.asarray(PUB_LABELS), np.arange(len(PUB[1]))
    if damage == "sum20":
        pub = pub * 20
    elif damage == "negative":
        pub = pub - 0.5
    elif damage == "strings":
        pub = pub.astype(str)
    elif damage == "complex":
        pub = pub.astype(np.complex128)
    elif damage == "float_labels":
        labels = labels.astype(np.float64)
    elif damage == "label_range":
        labels = labels + 5
    else:
        pub, labels, rows = pub[:0], labels[:0], rows[:0]
    path = tmp_path / f"{damage}.npz"
    np.savez(path, classes=np.array(["a", "b"]), model="toy", tta="none", public_probs=pub, public_labels=labels,
             public_rows=rows, private_probs=PRIV[1], private_labels=np.asarray(PRIV_LABELS),
             private_rows=np.arange(100, 100 + len(PRIV[1])))
    members = [path] if damage in ("no_faces", "label_range") else [prediction_files[0], path]
    with pytest.raises(ValueError, match=f"{damage}.npz: {message}"):
        load_prediction_files(members)


def test_cli_from_predictions_json(prediction_files: list[Path]) -> None:
    # As the shell expands results/predictions/*.npz: the first file follows the option, the rest are arguments.
    result = runner.invoke(app, ["ensemble", "--from-predictions", *map(str, prediction_files),
                                 "--method", "accuracy_weighted", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [e["method"] for e in out["ensembles"]] == ["accuracy_weighted"]
    ens = out["ensembles"][0]
    assert ens["public_accuracy"] == 0.75 and ens["private_accuracy"] == 1.0
    assert ens["member_weights"] == pytest.approx({"alpha": 0.75, "beta": 0.25})
    assert [m["name"] for m in out["members"]] == ["alpha", "beta"]
    assert out["fitted_on"] == "PublicTest" and out["num_private"] == 2


def test_cli_method_all_table_and_plot(prediction_files: list[Path], tmp_path: Path) -> None:
    png = tmp_path / "members.png"
    result = runner.invoke(app, ["ensemble", *map(str, prediction_files), "--method", "all", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    for name in ("mean", "accuracy_weighted", "class_weighted", "vote", "greedy(mean)", "best", "alpha"):
        assert name in result.stdout, name
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_record_writes_and_replaces_rows(prediction_files: list[Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ferkit.ensembles.records import ENSEMBLES_COLUMNS, read_records, render_table

    records = tmp_path / "results" / "ensembles.csv"
    base = ["ensemble", "--from-predictions", *map(str, prediction_files), "--records", str(records)]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/ferkit", *base, "--method", "all", "--record", "pair"])
    assert runner.invoke(app, sys.argv[1:]).exit_code == 0
    assert runner.invoke(app, [*base, "--method", "mean", "--record", "other"]).exit_code == 0
    rows = {r["name"]: r for r in read_records(records)}
    assert set(rows) == {f"pair/{m}" for m in ("mean", "accuracy_weighted", "class_weighted", "vote",
                                                "greedy(mean)", "log_linear")} | {"other/mean"}
    aw = rows["pair/accuracy_weighted"]
    assert list(aw) == list(ENSEMBLES_COLUMNS)
    assert aw["members"] == "alpha;beta" and aw["public_test"] == "0.7500" and aw["private_test"] == "1.0000"
    assert aw["best_member"] == "alpha" and aw["best_member_private_test"] == "1.0000" and aw["gain_points"] == "+0.00"
    assert rows["pair/mean"]["gain_points"] == "-100.00"
    assert aw["command"].startswith("ferkit ensemble --from-predictions") and "--record pair" in aw["command"]
    # Re-recording a name replaces its rows and keeps the others.
    assert runner.invoke(app, [*base, "--method", "vote", "--record", "pair"]).exit_code == 0
    assert [r["name"] for r in read_records(records)] == ["other/mean", "pair/vote"]
    table = render_table(read_records(records))
    assert "| pair | vote | alpha, beta |" in table and "**" in table
    bad = runner.invoke(app, [*base, "--method", "mean", "--record", "a/b"])
    assert bad.exit_code == 2 and "record name" in bad.output


def test_cli_label_set_keeps_one_label_set_of_a_mixed_glob(tmp_path: Path) -> None:
    # results/predictions/ holds 7-class systems and 6-class ones (no disgust): --label-set picks one group.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=(2, 20))  # the same faces for every member, labels valid in both sets
    files = {}
    for name, label_set in (("seven_a", "fer7"), ("seven_b", "fer7"), ("six", "fer6")):
        classes = LABEL_SETS[label_set].classes
        probs = rng.dirichlet(np.ones(len(classes)), size=(2, 20))
        files[name] = write_predictions(tmp_path / f"{name}.npz", probs[0], labels[0], probs[1],
                                        labels[1], classes=classes)
    everything = [str(p) for p in files.values()]
    mixed = runner.invoke(app, ["ensemble", *everything])
    assert mixed.exit_code == 2 and "--label-set" in mixed.output and "Traceback" not in mixed.output
    kept = runner.invoke(app, ["ensemble", *everything, "--label-set", "fer7", "--method", "mean", "--json"])
    assert kept.exit_code == 0, kept.output
    assert [m["name"] for m in json.loads(kept.stdout)["members"]] == ["seven_a", "seven_b"]
    assert "left out 1 member(s)" in kept.stderr and "six.npz" in kept.stderr
    too_few = runner.invoke(app, ["ensemble", *everything, "--label-set", "fer6"])
    assert too_few.exit_code == 2 and "at least two members" in too_few.output
    unknown = runner.invoke(app, ["ensemble", *everything, "--label-set", "fer9"])
    assert unknown.exit_code == 2 and "fer9" in unknown.output


@pytest.mark.parametrize("args, message", [
    (["--method", "stacking"], "unknown ensemble method"),
    (["--save", "x.safetensors", "--method", "mean"], "--save needs the members' weights"),
    (["--save", "x.safetensors"], "single --method"),
    (["--tta", "flip"], "--tta"),
    (["--max-members", "0"], "--max-members"),
])
def test_cli_user_errors_exit_2(prediction_files: list[Path], args: list[str], message: str) -> None:
    result = runner.invoke(app, ["ensemble", "--from-predictions", *map(str, prediction_files), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_member_errors_exit_2(prediction_files: list[Path], tmp_path: Path) -> None:
    bad = write_predictions(tmp_path / "other_classes.npz", PUB[1], PUB_LABELS, PRIV[1], PRIV_LABELS,
                            classes=("x", "y"))
    for args, message in ([[str(prediction_files[0]), str(bad)], "other_classes.npz"],
                          [[str(prediction_files[0])], "at least two members"],
                          [[str(prediction_files[0]), str(tmp_path / "gone.npz")], "gone.npz"],
                          [[], "no members"],
                          [[str(prediction_files[0]), str(tmp_path / "w.safetensors")], "not a mix"],
                          [["--weights", str(tmp_path / "w.safetensors"), "--snapshots", str(tmp_path)], "only one"]):
        result = runner.invoke(app, ["ensemble", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


# ---- saved ensembles ----------------------------------------------------------------------------------------

FER6 = LABEL_SETS["fer6"]


def member_meta(**kw) -> dict:
    return {"model": "sixclass_cnn4", "num_classes": 6, "classes": list(FER6.classes), "label_set": "fer6",
            "input_size": 48, "normalize": "dataset", "model_kwargs": {}} | kw


@pytest.fixture
def two_members(tmp_path: Path) -> list[Path]:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("sixclass_cnn4", num_classes=6)
        path = tmp_path / f"member{seed}.safetensors"
        save_weights(model, path, member_meta())
        paths.append(path)
    return paths


@pytest.mark.parametrize("method", METHODS)
def test_saved_ensemble_round_trip(two_members: list[Path], tmp_path: Path, method: str) -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(12, 48, 48), dtype=np.uint8)
    labels = rng.integers(0, 6, 12)
    member_probs = np.stack([predict_proba(load_model(p)[0], faces, input_size=48) for p in two_members])
    weights = fit_ensemble(method, member_probs, labels)
    out = save_ensemble(tmp_path / "ens.safetensors", two_members, weights, tta="flip")
    ens, meta = load_ensemble(out)
    assert isinstance(ens, EnsembleModel) and meta["ensemble"] and meta["tta"] == "flip"
    assert meta["method"] == weights.method and meta["classes"] == list(FER6.classes)
    assert [m["model"] for m in meta["members"]] == ["sixclass_cnn4"] * len(weights.used_members())
    expected = apply_ensemble(weights, member_probs)
    got = predict_proba(ens, faces, input_size=48)
    assert got == pytest.approx(expected, abs=1e-5)
    # The forward pass returns log-probabilities, so ferkit's softmax recovers the combined probabilities.
    with torch.no_grad():
        log_probs = ens(torch.randn(3, 1, 48, 48))
    assert torch.allclose(torch.exp(log_probs).sum(-1), torch.ones(3), atol=1e-5)
    # load_model loads an ensemble file transparently.
    same, meta2 = load_model(out)
    assert isinstance(same, EnsembleModel) and meta2 == meta


@pytest.mark.parametrize("method", ["vote", "log_linear", "class_weighted", "accuracy_weighted"])
@pytest.mark.parametrize("tta", ["flip", "shift"])
def test_saved_ensemble_under_multi_view_tta_matches_the_fitted_one(two_members: list[Path], tmp_path: Path,
                                                                     method: str, tta: str) -> None:
    # Fitting combines each member's TTA-averaged probabilities; the saved file must do the same, not combine
    # view by view and average afterwards (the same only for linear combiners).
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 256, size=(40, 48, 48), dtype=np.uint8)
    member_probs = np.stack([predict_proba(load_model(p)[0], faces, input_size=48, tta=tta) for p in two_members])
    weights = fit_ensemble(method, member_probs, rng.integers(0, 6, 40))
    ens, _ = load_ensemble(save_ensemble(tmp_path / "ens.safetensors", two_members, weights, tta=tta))
    got = predict_proba(ens, faces, input_size=48, tta=tta)
    assert got == pytest.approx(apply_ensemble(weights, member_probs), abs=1e-5)


def test_cli_save_half_halves_the_file_and_keeps_the_predictions(two_members: list[Path], tiny_csv: Path,
                                                                   tmp_path: Path) -> None:
    paths = {}
    for half in (False, True):
        paths[half] = tmp_path / f"ens_{half}.safetensors"
        args = ["ensemble", "--weights", *map(str, two_members), "--data", str(tiny_csv), "--method", "mean",
                "--save", str(paths[half]), "--json"]
        result = runner.invoke(app, args + (["--half"] if half else []))
        assert result.exit_code == 0, result.output
    assert paths[True].stat().st_size < 0.6 * paths[False].stat().st_size
    faces = np.random.default_rng(2).integers(0, 256, size=(8, 48, 48), dtype=np.uint8)
    full, halved = (predict_proba(load_model(paths[h])[0], faces, input_size=48) for h in (False, True))
    assert halved.dtype == full.dtype and halved == pytest.approx(full, abs=2e-3)
    # --half without --save has nothing to act on: refused, not ignored
    bad = runner.invoke(app, ["ensemble", "--weights", *map(str, two_members), "--data", str(tiny_csv), "--half"])
    assert bad.exit_code == 2 and "--half applies to --save" in bad.output


def test_saved_ensemble_evaluates_like_a_model(two_members: list[Path], tiny_csv: Path, tmp_path: Path) -> None:
    data = load_dataset(str(tiny_csv), "fer6")
    members = predict_members(two_members, data, device="cpu", precision="fp32")
    weights = fit_ensemble("accuracy_weighted", members.public.probs, members.public.labels)
    path = save_ensemble(tmp_path / "ens.safetensors", two_members, weights)
    model, meta = load_model(path)
    result = evaluate(model, meta, data, "PrivateTest", device="cpu", precision="fp32")
    expected = apply_ensemble(weights, members.private.probs)
    assert result.probs == pytest.approx(expected, abs=1e-5)
    assert result.model_name == "ensemble:accuracy_weighted"


def test_weights_members_saved_as_predictions_give_the_same_ensembles(two_members: list[Path], tiny_csv: Path,
                                                                     tmp_path: Path) -> None:
    # --save-predictions turns models run once into prediction files; ensembling those must give the same numbers.
    out_dir = tmp_path / "predictions"
    ran = runner.invoke(app, ["ensemble", "--weights", *map(str, two_members), "--data", str(tiny_csv), "--json",
                              "--precision", "fp32", "--device", "cpu", "--save-predictions", str(out_dir)])
    assert ran.exit_code == 0, ran.output
    files = sorted(out_dir.glob("*.npz"))
    assert [f.name for f in files] == ["member0.npz", "member1.npz"]
    members = load_prediction_files(files)
    assert members.models == ["sixclass_cnn4"] * 2 and members.ttas == ["none"] * 2
    assert members.classes == list(FER6.classes) and members.public.probs.shape == (2, 30, 6)
    replayed = runner.invoke(app, ["ensemble", "--from-predictions", *map(str, files), "--json"])
    assert replayed.exit_code == 0, replayed.output
    first, second = json.loads(ran.stdout), json.loads(replayed.stdout)
    for a, b in zip(first["members"] + first["ensembles"], second["members"] + second["ensembles"], strict=True):
        assert (a["name"], a["public_accuracy"], a["private_accuracy"]) == \
            (b["name"], b["public_accuracy"], b["private_accuracy"])
    refused = runner.invoke(app, ["ensemble", "--from-predictions", *map(str, files), "--save-predictions",
                                  str(tmp_path / "again")])
    assert refused.exit_code == 2 and "already are prediction files" in refused.output


def test_one_weights_file_with_save_predictions_only_writes_its_predictions(two_members: list[Path],
                                                                            tiny_csv: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "predictions"
    base = ["ensemble", "--weights", str(two_members[0]), "--data", str(tiny_csv), "--precision", "fp32",
            "--device", "cpu"]
    ran = runner.invoke(app, [*base, "--save-predictions", str(out_dir), "--json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout) == {"artifacts": {"predictions": str(out_dir / "member0.npz")}}
    written = load_prediction_files([out_dir / "member0.npz"])
    direct = predict_members(two_members[:1], load_dataset(str(tiny_csv), "fer6"), device="cpu", precision="fp32")
    assert written.private.probs == pytest.approx(direct.private.probs, abs=1e-6)
    # Anything that needs a combination still needs two members.
    for extra in ([], ["--save-predictions", str(out_dir), "--record", "solo"]):
        refused = runner.invoke(app, [*base, *extra])
        assert refused.exit_code == 2 and "at least two members" in refused.output


def test_greedy_ensemble_saves_only_chosen_members(two_members: list[Path], tmp_path: Path) -> None:
    weights = EnsembleWeights("greedy", "mean", np.array([0.0, 1.0]), selected=(1,))
    ens, meta = load_ensemble(save_ensemble(tmp_path / "g.safetensors", two_members, weights))
    assert len(ens.members) == 1 and meta["weights"]["member_weights"] == [1.0]
    faces = np.random.default_rng(1).integers(0, 256, size=(4, 48, 48), dtype=np.uint8)
    alone = predict_proba(load_model(two_members[1])[0], faces, input_size=48)
    assert predict_proba(ens, faces, input_size=48) == pytest.approx(alone, abs=1e-5)


def test_auto_tta_runs_each_member_under_its_own_view(two_members: list[Path], tiny_csv: Path,
                                                     tmp_path: Path) -> None:
    model, _ = load_model(two_members[1])
    cropped = tmp_path / "cropped.safetensors"
    save_weights(model, cropped, member_meta(train_view="crop"))
    members = predict_members([two_members[0], cropped], load_dataset(str(tiny_csv), "fer6"), device="cpu",
                              precision="fp32")
    assert members.ttas == ["none", "center"]
    # One saved ensemble runs all members under one view, so mixed views need an explicit --tta to --save.
    base = ["ensemble", "--weights", str(two_members[0]), str(cropped), "--data", str(tiny_csv), "--method", "mean",
            "--device", "cpu", "--precision", "fp32"]
    refused = runner.invoke(app, [*base, "--save", str(tmp_path / "ens.safetensors")])
    assert refused.exit_code == 2 and "different views" in refused.output
    saved = runner.invoke(app, [*base, "--tta", "center", "--save", str(tmp_path / "ens.safetensors")])
    assert saved.exit_code == 0, saved.output
    assert load_ensemble(tmp_path / "ens.safetensors")[1]["tta"] == "center"


def test_members_must_share_preprocessing(two_members: list[Path], tmp_path: Path) -> None:
    model, _ = load_model(two_members[0])
    weights = EnsembleWeights("mean", "mean", np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="normalize"):
        save_ensemble(tmp_path / "x.safetensors", [two_members[0], (model, member_meta(normalize="imagenet"))],
                      weights)
    with pytest.raises(ValueError, match="classes"):
        save_ensemble(tmp_path / "x.safetensors", [two_members[0], (model, member_meta(classes=list("abcdef")))],
                      weights)
    nested = save_ensemble(tmp_path / "ok.safetensors", two_members, weights)
    with pytest.raises(ValueError, match="nested"):
        save_ensemble(tmp_path / "y.safetensors", [two_members[0], nested], weights)


# ---- snapshot ensembles -------------------------------------------------------------------------------------


def test_snapshot_ensemble_from_a_tiny_run(tiny_csv: Path, tmp_path: Path) -> None:
    # fer6 drops the 10 disgust faces: 60 training faces, batch 16 -> 4 steps; save_every=2 keeps steps 2 and 4.
    cfg = TrainConfig(model="sixclass_cnn4", data=str(tiny_csv), label_set="fer6", epochs=1, batch_size=16,
                      save_every=2, precision="fp32", progress=False, out_dir=str(tmp_path / "runs"),
                      run_name="snap", device="cpu")
    run = train(cfg).run_dir
    snaps = snapshot_members(run, last_k=9)
    assert [p.name for p in snaps] == ["step0000002.safetensors", "step0000004.safetensors"]
    assert snapshot_members(run, last_k=1) == snaps[-1:]
    with pytest.raises(FileNotFoundError, match="save_every"):
        snapshot_members(tmp_path)
    members = predict_members(snaps, tiny_csv, device="cpu", precision="fp32")
    assert members.names == ["step0000002", "step0000004"] and members.public.probs.shape == (2, 30, 6)
    report = evaluate_methods(members, ["mean", "greedy"])
    assert [r["method"] for r in report.ensembles] == ["mean", "greedy"]

    saved = tmp_path / "snap_ens.safetensors"
    png = tmp_path / "snap.png"
    result = runner.invoke(app, ["ensemble", "--snapshots", str(run), "--last", "2", "--data", str(tiny_csv),
                                 "--method", "mean", "--precision", "fp32", "--device", "cpu", "--save", str(saved),
                                 "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    mean_private = out["ensembles"][0]["private_accuracy"]
    assert mean_private == pytest.approx(report.ensembles[0]["private_accuracy"])
    assert out["artifacts"]["ensemble"] == str(saved) and png.read_bytes()[:8] == PNG_MAGIC
    evaluated = runner.invoke(app, ["evaluate", "--weights", str(saved), "--data", str(tiny_csv), "--json",
                                    "--precision", "fp32", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(mean_private)
    missing = runner.invoke(app, ["ensemble", "--snapshots", str(run)])
    assert missing.exit_code == 2 and "--data" in missing.output


def test_plot_members_vs_ensemble(tmp_path: Path) -> None:
    rows = [{"kind": "member", "name": "a", "public_accuracy": 0.5, "private_accuracy": 0.55},
            {"kind": "member", "name": "b", "public_accuracy": 0.6, "private_accuracy": 0.58},
            {"kind": "ensemble", "name": "mean", "public_accuracy": 0.65, "private_accuracy": 0.63}]
    plot_members_vs_ensemble(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
