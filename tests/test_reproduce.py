"""Reproduction recipes: every recipe is valid, and one tiny end-to-end run records its results row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_rows, write_csv
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.models import list_models
from ferkit.reproduce import RECIPES, SEEDS_COLUMNS, read_seeds, reproduce
from ferkit.training import RESUME_SETTINGS, TrainConfig


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_valid_config(name: str) -> None:
    recipe = RECIPES[name]
    cfg = TrainConfig(model=recipe.model).override(list(recipe.overrides))
    cfg.validate()
    assert recipe.model in list_models(recipe.model)  # timm:NAME too (list_models("timm:...") asks timm)
    assert 0 < recipe.reported < 1



RECORDED_RUNS = Path(__file__).resolve().parent.parent / "results" / "runs"


@pytest.mark.parametrize("name", ["ferkit_vgg_s_e120"])
def test_own_recipe_rebuilds_its_recorded_run(name: str) -> None:
    """ferkit's own recipes were measured from runs trained with `ferkit train` before they became recipes: the
    recipe must give exactly that run's config (run settings and where it ran aside), or its seeds row's command
    would not reproduce its numbers."""
    # Read as a resume reads it: a setting added since the run was trained takes its default.
    recorded = TrainConfig.from_dict(json.loads((RECORDED_RUNS / name / "config.json").read_text())).to_dict()
    recipe = RECIPES[name]
    rebuilt = TrainConfig(model=recipe.model).override(list(recipe.overrides)).to_dict()
    where = {"out_dir", "run_name", "data", *RESUME_SETTINGS}
    differ = {k for k in set(rebuilt) | set(recorded) if k not in where and rebuilt.get(k) != recorded.get(k)}
    assert not differ, {k: (rebuilt.get(k), recorded.get(k)) for k in differ}


def test_reproduce_writes_row_predictions_and_manifest(tiny_csv: Path, tmp_path: Path) -> None:
    row = reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                    extra=["epochs=1", "precision=fp32"], progress=False)
    results = tmp_path / "results"
    with open(results / "seeds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and set(SEEDS_COLUMNS) <= set(rows[0])
    assert rows[0]["registry_name"] == "sixclass_cnn4" and rows[0]["classes"] == "6"
    assert rows[0]["epochs"] == rows[0]["planned_epochs"] == "1"
    assert rows[0]["command"].startswith("ferkit reproduce sixclass_cnn4") and "epochs=1" in rows[0]["command"]
    pred = np.load(results / "predictions" / "sixclass_cnn4.npz")
    # The 6-class label set drops disgust: 35 PublicTest faces of which 5 are disgust.
    assert pred["public_probs"].shape == (30, 6) and pred["private_probs"].shape == (30, 6)
    acc = float((pred["private_probs"].argmax(1) == pred["private_labels"]).mean())
    assert abs(acc - float(row["private_test"])) < 1e-3
    for f in ("manifest.json", "config.json", "metrics.csv", "curves.png", "evaluation.json"):
        assert (results / "runs" / "sixclass_cnn4" / f).is_file()

    # Running it again resumes the finished run (no new epochs) and replaces the row instead of adding one;
    # the recorded command keeps the overrides the run was started with. Without a progress choice the run's
    # config.json is left as it was (its manifest's copy of it stays the same).
    config = (results / "runs" / "sixclass_cnn4" / "config.json").read_bytes()
    reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=results)
    assert (results / "runs" / "sixclass_cnn4" / "config.json").read_bytes() == config
    with open(results / "seeds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and "epochs=1" in rows[0]["command"]
    with pytest.raises(ValueError, match="started with overrides"):
        reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=results, extra=["epochs=2"],
                  progress=False)
    # Run settings may change on resume; the recorded command carries their latest values.
    reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=results,
              extra=["threads=1", "time_limit=30"], progress=False)
    with open(results / "seeds.csv", newline="") as f:
        command = next(csv.DictReader(f))["command"]
    assert command.endswith("epochs=1 precision=fp32 threads=1 time_limit=30"), command


GOOD_SEEDS = ("name,system,registry_name,classes,reported,public_test,private_test,epochs,planned_epochs,"
              "train_minutes,hardware,command\n"
              "frivas_cnn1,F-Riv 1,frivas_cnn1,7,0.6350,0.6503,0.6545,50,50,38.3,cpu,x\n")


@pytest.mark.parametrize("damage, message", [
    (b"\xff\xfe\x00binary", "seeds.csv is not a readable CSV table"),
    (GOOD_SEEDS.encode() + b"tan_mlp,a,b,7,0.25,0.4,0.4,20,20,0.5,cpu,x,EXTRA\n", "seeds.csv line 3 is damaged"),
    (GOOD_SEEDS.encode() + b"tan_mlp,a,b,7\n", "seeds.csv line 3 is damaged .'tan_mlp'"),
    (GOOD_SEEDS.encode() + b"tan_mlp,a,b,7,abc,0.4,0.4,20,20,0.5,cpu,x\n", "seeds.csv line 3 is damaged"),
    (b"name,system\nx,y\n", "seeds.csv lacks the columns registry_name"),
    (GOOD_SEEDS.replace("0.6350", "63.50").encode(), "seeds.csv line 2 is damaged .'frivas_cnn1'"),
    ("folder", "seeds.csv is not a file"),
])
def test_a_damaged_results_table_stops_reproduce_before_training(tiny_csv: Path, tmp_path: Path, damage: object,
                                                                message: str) -> None:
    # Before, the error came after training, with the predictions and run record already rewritten beside a table
    # that could not take the row, and --list / --report failed with tracebacks.
    results = tmp_path / "results"
    results.mkdir()
    if damage == "folder":
        (results / "seeds.csv").mkdir()
    else:
        (results / "seeds.csv").write_bytes(damage)
    before = (results / "seeds.csv").read_bytes() if damage != "folder" else None
    with pytest.raises(ValueError, match=message):
        reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=results,
                  extra=["epochs=1", "precision=fp32"], progress=False)
    assert not (tmp_path / "runs").exists() and not (results / "predictions").exists()
    if before is not None:
        assert (results / "seeds.csv").read_bytes() == before
    for args in (["--list"], ["--report"]):
        listed = CliRunner().invoke(app, ["reproduce", *args, "--results", str(results)])
        assert listed.exit_code == 2 and "seeds.csv" in listed.output and "Traceback" not in listed.output, args


def test_a_results_table_from_before_the_newer_columns_still_reads_and_gains_them(tiny_csv: Path,
                                                                                   tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    old = GOOD_SEEDS.replace(",planned_epochs", "").replace(",command", "").replace(",50,50,38.3,cpu,x", ",50,38.3,cpu")
    (results / "seeds.csv").write_text(old)
    assert [r["name"] for r in read_seeds(results / "seeds.csv")] == ["frivas_cnn1"]
    assert CliRunner().invoke(app, ["reproduce", "--list", "--results", str(results)]).exit_code == 0
    reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=results,
              extra=["epochs=1", "precision=fp32"], progress=False)
    rows = {r["name"]: r for r in read_seeds(results / "seeds.csv")}
    assert list(rows) == ["frivas_cnn1", "sixclass_cnn4"]  # recipe order
    assert rows["sixclass_cnn4"]["planned_epochs"] == "1" and rows["frivas_cnn1"]["planned_epochs"] == ""
    assert rows["frivas_cnn1"]["private_test"] == "0.6545"


def test_reproduce_refuses_destinations_that_are_files_before_training(tiny_csv: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("notes")
    for kwargs, message in (({"runs_dir": afile, "results_dir": tmp_path / "r"}, "--runs .*afile is a file"),
                            ({"runs_dir": tmp_path / "runs", "results_dir": afile}, "--results .*afile is a file")):
        with pytest.raises(ValueError, match=message):
            reproduce("sixclass_cnn4", tiny_csv, extra=["epochs=1"], progress=False, **kwargs)
    assert afile.read_text() == "notes" and not (tmp_path / "runs").exists()
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "predictions").write_text("not a folder")
    with pytest.raises(ValueError, match="predictions is a file, not a folder"):
        reproduce("sixclass_cnn4", tiny_csv, runs_dir=tmp_path / "runs", results_dir=tmp_path / "r2",
                  extra=["epochs=1"], progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, message", [("[1, 2]", "must hold a JSON list of key=value strings"),
                                              ("[\"epochs=1\"", "reproduce_overrides.json is damaged")])
def test_a_damaged_overrides_file_is_named(tiny_csv: Path, tmp_path: Path, content: str, message: str) -> None:
    kwargs = dict(runs_dir=tmp_path / "runs", results_dir=tmp_path / "results", progress=False)
    reproduce("sixclass_cnn4", tiny_csv, extra=["epochs=1", "precision=fp32"], **kwargs)
    (tmp_path / "runs" / "repro-sixclass_cnn4" / "reproduce_overrides.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        reproduce("sixclass_cnn4", tiny_csv, **kwargs)


def test_reproduce_evaluates_with_the_runs_skip_bad_rows(tmp_path: Path, cache_dir: Path) -> None:
    # A CSV with a malformed row trains with skip_bad_rows=true; the evaluation must read it the same way.
    rows = synthetic_rows({"Training": 70, "PublicTest": 35, "PrivateTest": 35})
    bad = write_csv(tmp_path / "bad.csv", [*rows[:10], (0, "1 2 3", "PrivateTest"), *rows[10:]])
    row = reproduce("sixclass_cnn4", bad, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                    extra=["epochs=1", "precision=fp32", "skip_bad_rows=true"], progress=False)
    assert 0 <= float(row["private_test"]) <= 1
    # Re-reporting the run with other data is refused: its numbers would mix two datasets.
    with pytest.raises(ValueError, match="other data"):
        reproduce("sixclass_cnn4", write_csv(tmp_path / "other.csv", rows), runs_dir=tmp_path / "runs",
                  results_dir=tmp_path / "results", progress=False)


def test_cli_reproduce_list_and_unknown_system(tiny_csv: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["reproduce", "--list"])
    assert listed.exit_code == 0 and "khaireddin_vgg" in listed.output
    bad = runner.invoke(app, ["reproduce", "nope", "--data", str(tiny_csv)])
    assert bad.exit_code == 2 and "unknown system" in bad.output


def test_cli_reproduce_list_shows_the_settings_a_row_was_measured_with() -> None:
    # bokanyi_deep's recipe says 80 epochs; its row was measured with epochs=160 early_stopping=20.
    rows = {row["name"]: row for row in _seed_rows()}
    listed = CliRunner().invoke(app, ["reproduce", "--list"])
    block = listed.output.split("\nbokanyi_deep ")[1].split("\nagrawal_mittal ")[0]
    assert f"measured by: {rows['bokanyi_deep']['command']}" in block and "epochs=160" in block


def test_cli_reproduce_into_another_results_dir_leaves_the_docs_alone(tiny_csv: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A side experiment (--results elsewhere) must not render its one-row table into the project's page.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    page = "# Results\n\n<!-- seeds-table:start -->\nold table\n<!-- seeds-table:end -->\n"
    (tmp_path / "docs" / "results.md").write_text(page)
    args = ["reproduce", "sixclass_cnn4", "--data", str(tiny_csv), "--no-progress", "epochs=1", "precision=fp32"]
    side = CliRunner().invoke(app, [*args, "--runs", "side/runs", "--results", "side/results"])
    assert side.exit_code == 0, side.output
    assert (tmp_path / "side" / "results" / "seeds.csv").is_file()
    assert (tmp_path / "docs" / "results.md").read_text() == page
    assert not (tmp_path / "docs" / "results.png").exists()
    # The project's own results/ does refresh it.
    own = CliRunner().invoke(app, args)
    assert own.exit_code == 0, own.output
    assert "sixclass_cnn4" in (tmp_path / "docs" / "results.md").read_text()
    assert (tmp_path / "docs" / "results.png").is_file()


def test_report_refreshes_only_the_table_and_draws_the_figure(tmp_path: Path) -> None:
    from ferkit.reproduce import TABLE_END, TABLE_START, upsert_row, write_report

    results = tmp_path / "results"
    results.mkdir()
    row = {"system": "F-Riv model 3", "registry_name": "frivas_cnn3", "classes": "7", "reported": "0.6700",
           "public_test": "0.6600", "private_test": "0.6500", "epochs": "50", "train_minutes": "90.0",
           "hardware": "cpu", "command": "ferkit reproduce frivas_cnn3 --data fer2013.csv.gz"}
    upsert_row(results / "seeds.csv", "frivas_cnn3", row)
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nintro stays\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nnotes stay\n")
    write_report(results, doc, tmp_path / "fig.png", shipped=("ferkit_vgg_s", 0.68))
    text = doc.read_text()
    assert "intro stays" in text and "notes stay" in text and "old table" not in text
    assert "| F-Riv model 3 | `frivas_cnn3` | 7 | 67.0% | 66.00% | **65.00%** | -2.0 ⚠ | 50 | 90.0 |" in text
    # A run cut short by its time limit shows the schedule it was cut from.
    upsert_row(results / "seeds.csv", "frivas_cnn3", row | {"epochs": "40", "planned_epochs": "50"})
    write_report(results, doc, tmp_path / "fig.png", shipped=("ferkit_vgg_s", 0.68))
    assert "| -2.0 ⚠ | 40 of 50 | 90.0 |" in doc.read_text()
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_report_fills_the_ensembles_table_where_the_doc_has_its_markers(tmp_path: Path) -> None:
    from ferkit.ensembles.records import ENSEMBLES_COLUMNS
    from ferkit.reproduce import ENSEMBLES_END, ENSEMBLES_START, TABLE_END, TABLE_START, write_report

    results = tmp_path / "results"
    results.mkdir()
    values = ["seeds/mean", "mean", "a;b", "0.6000", "0.6100", "a", "0.5900", "0.5800", "+3.00", "ferkit ensemble"]
    (results / "ensembles.csv").write_text(",".join(ENSEMBLES_COLUMNS) + "\n" + ",".join(values) + "\n")
    doc = tmp_path / "results.md"
    doc.write_text(f"{TABLE_START}\n{TABLE_END}\n\nbetween\n\n{ENSEMBLES_START}\nold\n{ENSEMBLES_END}\nafter\n")
    write_report(results, doc, tmp_path / "fig.png")
    text = doc.read_text()
    assert "old" not in text and "between" in text and text.endswith("after\n")
    assert "| seeds | mean | a, b | 60.00% | **61.00%** | a (58.00%) | +3.00 |" in text


REPO = Path(__file__).resolve().parents[1]


def _seed_rows() -> list[dict[str, str]]:
    with open(REPO / "results" / "seeds.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("row", _seed_rows(), ids=lambda r: r["name"])
def test_every_published_row_ships_its_manifest_and_predictions(row: dict[str, str]) -> None:
    # What issue 3 promises a reviewer for each results row: the run's manifest and its saved probabilities,
    # committed, and agreeing with the accuracies in the row.
    run = REPO / "results" / "runs" / row["name"]
    for f in ("manifest.json", "config.json", "metrics.csv", "curves.png", "evaluation.json"):
        assert (run / f).is_file(), f"{run / f} is missing"
    # Named by the row (the system), not the network: two rows may train one network (frivas_cnn1 and
    # frivas_cnn1_balanced), and `ferkit reproduce` writes results/predictions/<system>.npz.
    manifest = json.loads((run / "manifest.json").read_text())
    assert (row["epochs"], row["planned_epochs"]) == (str(manifest["epochs_done"]), str(manifest["config"]["epochs"]))
    pred = np.load(REPO / "results" / "predictions" / f"{row['name']}.npz")
    assert pred["public_probs"].shape[1] == int(row["classes"])
    for split, column in (("public", "public_test"), ("private", "private_test")):
        acc = float((pred[f"{split}_probs"].argmax(1) == pred[f"{split}_labels"]).mean())
        assert acc == pytest.approx(float(row[column]), abs=1e-4)
