"""`ferkit sweep` (#28): a grid (or random sample) of settings, one run directory per trial, results CSV +
markdown + figure, and a resume after a kill that re-runs no finished trial. Synthetic data, a tiny MLP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.training.sweep import SweepError, parse_grid, plan_trials, run_sweep, split_values

runner = CliRunner()
FIXED = ["model=tan_mlp", "epochs=2", "batch_size=16", "precision=fp32"]


def test_values_split_at_top_level_commas() -> None:
    assert split_values("sgd, adam,adamw") == ["sgd", "adam", "adamw"]
    assert split_values("[0.8,1.2],[1,1]") == ["[0.8,1.2]", "[1,1]"]
    grid = parse_grid(["optimizer=sgd,adam", "augment.crop_scale=[0.8,1.2],[1,1]", "epochs=3"])
    assert grid == {"optimizer": ["sgd", "adam"], "augment.crop_scale": ["[0.8,1.2]", "[1,1]"], "epochs": ["3"]}


@pytest.mark.parametrize("settings, message", [
    (["optimiser=sgd,adam"], "sweep setting optimiser=sgd: unknown config key 'optimiser'"),
    (["lr="], "lr=: empty value list"),
    (["lr=0.1,,0.01"], "empty value between commas"),
    (["lr=0.1,"], "empty value between commas"),
    (["lr=fast,0.1"], r"lr=fast: lr=fast: expected a number"),
    (["optimizer=sgd,lbfgs"], "optimizer 'lbfgs' not in"),
    (["lr=0.1,0.1"], "a value is listed twice"),
    (["lr=0.1", "lr=0.01"], "'lr' is given twice"),
    (["out_dir=elsewhere"], "set by the sweep itself"),
    (["adam"], "not of the form key=value1,value2"),
    ([], "a sweep needs settings"),
])
def test_bad_grids_are_clear_errors(settings: list[str], message: str) -> None:
    with pytest.raises(SweepError, match=message):
        parse_grid(settings)


def test_grid_and_random_plans() -> None:
    grid = parse_grid(["optimizer=sgd,adam,adamw", "schedule=cosine,step,plateau", "lr=0.01,0.001"])
    trials = plan_trials(grid)
    assert len(trials) == 18 and trials[0] == {"optimizer": "sgd", "schedule": "cosine", "lr": "0.01"}
    assert trials[1]["lr"] == "0.001"  # the last key varies fastest
    sample = plan_trials(grid, random=5, seed=3)
    assert len(sample) == 5 and sample == plan_trials(grid, random=5, seed=3) and all(t in trials for t in sample)
    assert plan_trials(grid, random=50) == trials  # more than the grid holds: the whole grid


def test_sweep_runs_resumes_after_a_kill_and_draws_its_figure(tiny_csv: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from ferkit.data import load_dataset

    data = load_dataset(str(tiny_csv))
    grid = parse_grid([*FIXED, f"data={tiny_csv}", "optimizer=sgd,adam", "lr=0.05,0.005"])
    sweep_dir = tmp_path / "sweep"
    # Killed after the first epoch of trial 0 ...
    run_sweep(grid, sweep_dir, data=data, progress=False, stop_after_epochs=1)
    assert len((sweep_dir / "trial-000" / "metrics.csv").read_text().splitlines()) == 2
    # ... then trial 0 resumes and the rest train; after that, nothing is re-run.
    result = run_sweep(grid, sweep_dir, data=data, progress=False)
    assert [r["status"] for r in result.rows] == ["done"] * 4
    first_best = (sweep_dir / "trial-000" / "best.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = run_sweep(grid, sweep_dir, data=data, progress=False)
    assert capsys.readouterr().out.count("done, not re-run") == 4
    assert (sweep_dir / "trial-000" / "best.safetensors").stat().st_mtime_ns == first_best
    assert again.rows == result.rows
    for i, (optimizer, lr) in enumerate([("sgd", "0.05"), ("sgd", "0.005"), ("adam", "0.05"), ("adam", "0.005")]):
        config = json.loads((sweep_dir / f"trial-{i:03d}" / "config.json").read_text())
        assert (config["optimizer"], config["lr"], config["model"], config["epochs"]) == (optimizer, float(lr),
                                                                                          "tan_mlp", 2)
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["sgd", "sgd", "adam", "adam"] and all(r["epochs"] == "2" for r in rows)
    assert all(0 <= float(r["best_public_test"]) <= 1 for r in rows)
    markdown = (sweep_dir / "results.md").read_text()
    assert "| trial | optimizer | lr | best PublicTest |" in markdown and "`model=tan_mlp`" in markdown
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Another grid in the same directory is refused, not mixed in.
    with pytest.raises(SweepError, match="holds a sweep started with"):
        run_sweep(parse_grid([*FIXED, "optimizer=sgd,adamw"]), sweep_dir, data=data, progress=False)


def test_sweep_command(tiny_csv: Path, tmp_path: Path) -> None:
    args = ["sweep", "--data", str(tiny_csv), "--out", str(tmp_path), "--name", "grid", "--no-progress",
            *FIXED, "epochs=1", "lr=0.05,0.005"]
    args.remove("epochs=2")
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "2/2 trials done" in out.output and (tmp_path / "grid" / "sweep.png").is_file()
    resumed = runner.invoke(app, ["sweep", "--resume", str(tmp_path / "grid"), "--no-progress"])
    assert resumed.exit_code == 0 and resumed.output.count("done, not re-run") == 2
    bad = runner.invoke(app, ["sweep", "--data", str(tiny_csv), "--out", str(tmp_path), "optimiser=sgd,adam"])
    assert bad.exit_code == 2 and "unknown config key 'optimiser'" in bad.output and "Traceback" not in bad.output
    empty = runner.invoke(app, ["sweep", "--data", str(tiny_csv), "--out", str(tmp_path), "lr="])
    assert empty.exit_code == 2 and "empty value list" in empty.output
    missing = runner.invoke(app, ["sweep", "--resume", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "holds no sweep" in missing.output


@pytest.mark.slow
def test_sweep_trials_in_parallel_on_ray(tiny_csv: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    fixed = [s for s in FIXED if not s.startswith("epochs=")]
    grid = parse_grid([*fixed, "epochs=1", f"data={tiny_csv}", "lr=0.05,0.005,0.0005"])
    sweep_dir = tmp_path / "sweep"
    run_sweep(grid, sweep_dir, progress=False, stop_after_epochs=1)  # trial 0 here, as if the rest were killed
    result = run_sweep(grid, sweep_dir, progress=False, parallel=2)
    assert [r["status"] for r in result.rows] == ["done"] * 3
    assert all((sweep_dir / f"trial-{i:03d}" / "best.safetensors").is_file() for i in range(3))
    assert len((sweep_dir / "results.csv").read_text().splitlines()) == 4
    with pytest.raises(SweepError, match="parallel must be"):
        run_sweep(grid, sweep_dir, parallel=0)
