"""`ferkit sweep` (#28): a grid (or random sample) of settings, one run directory per trial, results CSV +
markdown + figure, a resume after a kill that re-runs no finished trial, failed trials recorded while the others
go on, paths made absolute for trials that run elsewhere. Synthetic data, a tiny MLP."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.training import sweep as sweep_module
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
    for r in rows:  # the last epoch's rate, from the trial's metrics (cosine: decayed from the trial's lr)
        last = list(csv.DictReader((Path(r["run_dir"]) / "metrics.csv").read_text().splitlines()))[-1]
        assert float(r["last_lr"]) == pytest.approx(float(last["lr"]), rel=1e-3)
        assert float(r["last_lr"]) < float(r["lr"])
    markdown = (sweep_dir / "results.md").read_text()
    assert "| trial | optimizer | lr | status | best PublicTest |" in markdown and "`model=tan_mlp`" in markdown
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


def test_a_failing_trial_is_recorded_and_the_others_go_on(tiny_csv: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    # freeze=stem names no parameter of tan_mlp (refused by create_run: ValueError); lr=1e30 diverges (TrainingError).
    fixed = [s for s in FIXED if not s.startswith("epochs=")]
    grid = parse_grid([*fixed, "epochs=1", f"data={tiny_csv}", "freeze=head,stem", "lr=0.05,1e30"])
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(grid, sweep_dir, progress=False)
    assert [r["status"] for r in result.rows] == ["done", "failed", "failed", "failed"]
    assert [r["trial"] for r in result.failed] == ["trial-001", "trial-002", "trial-003"]
    failed = {i: json.loads((sweep_dir / f"trial-{i:03d}" / "failed.json").read_text()) for i in (1, 2, 3)}
    assert failed[1]["error_type"] == "TrainingError" and "diverged" in failed[1]["reason"]
    assert failed[2]["error_type"] == "ValueError" and "'stem' names no parameter" in failed[2]["reason"]
    assert not (sweep_dir / "trial-000" / "failed.json").exists()
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "failed", "failed", "failed"]
    assert rows[1]["error"].startswith("TrainingError: training diverged") and rows[0]["error"] == ""
    markdown = (sweep_dir / "results.md").read_text()
    assert "| trial-001 | `head` | `1e30` | failed |" in markdown
    assert "| trial-000 | `head` | `0.05` | done |" in markdown
    assert "- trial-002: ValueError: freeze=stem" in markdown
    # A failed trial counts as finished: a resume re-runs nothing ...
    capsys.readouterr()
    again = run_sweep(grid, sweep_dir, progress=False)
    out = capsys.readouterr().out
    assert out.count("done, not re-run") == 1 and out.count("not re-run (--retry-failed runs it again)") == 3
    assert "): training" not in out and "): resuming" not in out and again.rows == result.rows
    # ... unless asked: then they run again (and fail again, the same way).
    run_sweep(grid, sweep_dir, progress=False, retry_failed=True)
    out = capsys.readouterr().out
    assert out.count("failed before (") == 3 and out.count("done, not re-run") == 1
    # (a run that failed before its first checkpoint resumes from its config.json, or starts again without one)
    assert re.search(r"trial 2/4 \(freeze=head, lr=1e30\): (resuming|training)\n", out), out
    assert "trial 3/4 (freeze=stem, lr=0.05): training" in out
    assert json.loads((sweep_dir / "trial-001" / "failed.json").read_text()) == failed[1]


def test_failed_trials_are_left_out_of_the_figure(tiny_csv: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    fixed = [s for s in FIXED if not s.startswith("epochs=")]
    grid = parse_grid([*fixed, "epochs=1", f"data={tiny_csv}", "lr=0.05,0.005"])
    sweep_dir = tmp_path / "sweep"
    run_sweep(grid, sweep_dir, progress=False)
    # trial 1 as if it failed after its first epoch (e.g. diverged in its second): its metrics.csv has a row
    sweep_module.record_failure(sweep_dir / "trial-001", RuntimeError("lost"))
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    rows = sweep_module.write_results(sweep_dir, grid, sweep_module.plan_trials(grid))
    assert [r["status"] for r in rows] == ["done", "failed"] and rows[1]["epochs"] == 1
    curves, cells = drawn[0].axes[:2]
    assert [line.get_label() for line in curves.lines] == ["0.05"]
    assert cells.images[0].get_array().mask.tolist() == [[False], [True]]  # lr=0.005's cell is blank
    markdown = (sweep_dir / "results.md").read_text()
    assert "| trial-001 | `0.005` | failed | " in markdown and "**" not in markdown.split("trial-001")[1].split("\n")[0]


def test_sweep_command_exits_1_naming_failed_trials(tiny_csv: Path, tmp_path: Path) -> None:
    fixed = [s for s in FIXED if not s.startswith("epochs=")]
    args = ["sweep", "--data", str(tiny_csv), "--out", str(tmp_path), "--name", "grid", "--no-progress", *fixed,
            "epochs=1", "lr=0.05,1e30"]
    out = runner.invoke(app, args)
    assert out.exit_code == 1, out.output
    assert "1/2 trials done" in out.output and "1 of 2 trials failed: trial-001 (TrainingError)" in out.output
    assert "--retry-failed" in out.output and "Traceback" not in out.output
    resumed = runner.invoke(app, ["sweep", "--resume", str(tmp_path / "grid"), "--no-progress"])
    assert resumed.exit_code == 1 and "): resuming" not in resumed.output and "not re-run" in resumed.output
    retried = runner.invoke(app, ["sweep", "--resume", str(tmp_path / "grid"), "--no-progress", "--retry-failed"])
    assert retried.exit_code == 1 and re.search(r"trial 2/2 \(lr=1e30\): (resuming|training)\n", retried.output)


def test_relative_paths_become_absolute_before_sweep_json(tiny_csv: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials on Ray run in a worker's directory: a path relative to where the sweep began would miss there."""
    monkeypatch.chdir(tiny_csv.parent)
    fixed = [s for s in FIXED if not s.startswith("epochs=")]
    out = runner.invoke(app, ["sweep", "--data", tiny_csv.name, "--out", "runs", "--name", "rel", "--no-progress",
                              *fixed, "epochs=1", "lr=0.05,0.005"])
    assert out.exit_code == 0, out.output
    sweep_dir = tiny_csv.parent / "runs" / "rel"
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    assert plan["grid"]["data"] == [str(tiny_csv)] and all(t["data"] == str(tiny_csv) for t in plan["trials"])
    assert json.loads((sweep_dir / "trial-001" / "config.json").read_text())["data"] == str(tiny_csv)
    # Settings naming no existing file (a shipped model's name, say) stay as they are.
    assert sweep_module.absolute_paths({"teacher": ["ferkit_vgg_s"], "labels": "", "model": [tiny_csv.name]}) == \
        {"teacher": ["ferkit_vgg_s"], "labels": "", "model": [tiny_csv.name]}
    # A sweep.json written with the relative path (before this change) still resumes from where it began.
    plan["grid"]["data"] = [tiny_csv.name]
    plan["trials"] = [{**t, "data": tiny_csv.name} for t in plan["trials"]]
    (sweep_dir / "sweep.json").write_text(json.dumps(plan))
    resumed = runner.invoke(app, ["sweep", "--resume", "runs/rel", "--no-progress"])
    assert resumed.exit_code == 0 and resumed.output.count("done, not re-run") == 2, resumed.output


def test_sweep_on_ray_it_cannot_join_is_a_clear_error(tiny_csv: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")

    def no_cluster(*args, **kwargs):  # what ray.init(address="auto") raises where no cluster runs
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    out = runner.invoke(app, ["sweep", "--data", str(tiny_csv), "--out", str(tmp_path), "--name", "grid",
                              "--no-progress", "--parallel", "2", "--ray-address", "auto", *FIXED, "lr=0.05,0.005"])
    assert out.exit_code == 2, out.output
    assert "cannot join Ray at 'auto': ConnectionError: Could not find any running Ray instance" in out.output
    assert "parallel=1" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "grid" / "trial-000").exists()


def test_ray_is_joined_by_one_function_that_training_and_inference_share() -> None:
    import ast

    from ferkit import ray_support
    from ferkit.inference import cluster

    assert cluster.connect is ray_support.connect
    tree = ast.parse(Path(sweep_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "ferkit.ray_support" in imported and not any(m.startswith("ferkit.inference") for m in imported if m)
    assert "ray.init" not in Path(sweep_module.__file__).read_text()  # joined only in ray_support


@pytest.mark.slow
def test_sweep_trials_in_parallel_on_ray(tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    fixed = [s for s in FIXED if not s.startswith("epochs=")]
    grid = parse_grid([*fixed, "epochs=1", f"data={tiny_csv}", "lr=0.05,0.005,0.0005,0.0001"])
    sweep_dir = tmp_path / "sweep"
    run_sweep(grid, sweep_dir, progress=False, stop_after_epochs=1)  # trial 0 here, as if the rest were killed

    def crash_or_fail(sweep_dir, i, settings, progress=False, data=None, stop_after_epochs=None):
        """The task each trial runs as (defined here: Ray ships it by value to the workers, which cannot import
        this test module). Trial 1's worker dies, as if killed for memory (WorkerCrashedError); trial 2 raises
        what a trial does not catch (RayTaskError); the others train, and go on to the end."""
        if i == 1:
            os._exit(1)
        if i == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        from ferkit.training import sweep

        return sweep.attempt_trial(sweep_dir, i, settings, progress, data, stop_after_epochs)

    monkeypatch.setattr(sweep_module, "attempt_trial", crash_or_fail)
    result = run_sweep(grid, sweep_dir, progress=False, parallel=2)
    assert [r["status"] for r in result.rows] == ["done", "failed", "failed", "done"]
    assert all((sweep_dir / f"trial-{i:03d}" / "best.safetensors").is_file() for i in (0, 3))
    crashed = json.loads((sweep_dir / "trial-001" / "failed.json").read_text())
    assert crashed["error_type"] == "WorkerCrashedError", crashed
    assert json.loads((sweep_dir / "trial-002" / "failed.json").read_text()) == {
        "error_type": "RuntimeError", "reason": "CUDA out of memory (simulated)"}
    assert len((sweep_dir / "results.csv").read_text().splitlines()) == 5
    with pytest.raises(SweepError, match="parallel must be"):
        run_sweep(grid, sweep_dir, parallel=0)
