"""`ferkit sweep`: train every combination of some settings (or a random sample of them), one run per trial.

Settings are `key=value1,value2,...` over any TrainConfig key (`optimizer=sgd,adam,adamw schedule=cosine,step
lr=0.01,0.001`; a key with one value is fixed for every trial; commas inside brackets stay in one value:
`augment.crop_scale=[0.8,1.2],[1,1]`). The sweep directory holds:
  sweep.json            the grid, the trials (in order) and the random-search seed: what a resume must match
  trial-000/ ...        each trial a normal run directory (config.json, metrics.csv, best.safetensors, ...)
  results.csv / .md     one row per trial: its settings, best and final PublicTest accuracy, epochs, minutes
  sweep.png             PublicTest accuracy per epoch for every trial, and the final accuracy per grid cell
Trials run one after another. Run the same sweep again (same directory and settings) after a kill: finished
trials are not re-run, a trial killed midway resumes from its last epoch, the rest start. The tables and the
figure are rewritten after every trial.

A trial that fails on its own (it diverges, its combination of settings does not go together, its data cannot
be read, or on Ray its worker dies) does not stop the sweep: its reason goes to trial-NNN/failed.json, the
tables list it as failed (the figure leaves it out) and the other trials go on. A failed trial counts as
finished: a resume does not re-run it unless asked (`retry_failed`, `ferkit sweep --retry-failed`).

Path-valued settings (data, labels, teacher, init_weights) naming an existing file or folder are made absolute
before sweep.json is written, so every trial, in whatever directory it runs (a Ray worker's differs), reads the
same file.

With the cluster extra (Ray), `parallel=N` runs up to N trials at once as Ray tasks (one CPU each; a trial's
torch threads follow its `threads` setting), on a private local Ray or, with `ray_address` ("auto", host:port),
on a cluster whose nodes all see the data file and the sweep directory (a shared filesystem). Resume is the same.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random as random_module
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferkit.shared_files import read_rows, write_rows, write_text
from ferkit.training.config import TrainConfig

SWEEP_FILE = "sweep.json"
# Set by the sweep itself: where each trial's run directory goes.
RESERVED_KEYS = ("out_dir", "run_name", "progress")
FAILED_FILE = "failed.json"  # in a trial's directory: why it failed (then the sweep counts it as finished)
# Settings naming a file or folder: made absolute when they exist (trials on Ray run in another directory).
PATH_KEYS = ("data", "labels", "teacher", "init_weights")
RESULT_FIELDS = ("trial", "status", "best_public_test", "best_epoch", "final_public_test", "last_lr", "epochs",
                 "planned_epochs", "train_minutes", "run_dir", "error")


class SweepError(ValueError):
    """A sweep that cannot start or resume as asked; the message says why."""


def split_values(raw: str) -> list[str]:
    """`raw` split at commas outside brackets and quotes: 'sgd,adam' -> ['sgd', 'adam'], '[1,2],[3,4]' -> two."""
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_grid(assignments: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` strings as {key: [values]}, each value checked as a TrainConfig setting (SweepError naming
    the key for an unknown key, an empty value list or a value the setting does not take)."""
    grid: dict[str, list[str]] = {}
    if not assignments:
        raise SweepError("a sweep needs settings to vary, e.g. optimizer=sgd,adam lr=0.01,0.001")
    for item in assignments:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SweepError(f"sweep setting {item!r} is not of the form key=value1,value2,...")
        if key in RESERVED_KEYS:
            raise SweepError(f"sweep setting {key!r} is set by the sweep itself (each trial is DIR/trial-NNN)")
        if key in grid:
            raise SweepError(f"sweep setting {key!r} is given twice; list all its values once: {key}=a,b")
        values = split_values(raw)
        if not raw.strip() or any(not v for v in values):
            raise SweepError(f"sweep setting {key}={raw}: empty value list or an empty value between commas")
        if len(set(values)) != len(values):
            raise SweepError(f"sweep setting {key}={raw}: a value is listed twice")
        for v in values:
            try:
                TrainConfig().override([f"{key}={v}"]).validate()
            except (ValueError, TypeError) as e:
                raise SweepError(f"sweep setting {key}={v}: {e}") from e
        grid[key] = values
    return grid


def axes(grid: dict[str, list[str]]) -> list[str]:
    """The keys that vary (more than one value), in the order given."""
    return [k for k, v in grid.items() if len(v) > 1]


def absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` (a grid, {key: [values]}, or one trial, {key: value}) with the PATH_KEYS values that name an
    existing file or folder made absolute (others, such as a shipped model's name, stay as they are)."""
    def fix(key: str, value: str) -> str:
        return os.path.abspath(value) if key in PATH_KEYS and value and Path(value).exists() else value

    return {k: [fix(k, x) for x in v] if isinstance(v, list) else fix(k, v) for k, v in settings.items()}


def plan_trials(grid: dict[str, list[str]], random: int = 0, seed: int = 0) -> list[dict[str, str]]:
    """Every combination (the last key varies fastest), or `random` of them drawn without replacement."""
    keys = list(grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    if random < 0:
        raise SweepError(f"random must be a number of trials >= 0 (0 = the whole grid), got {random}")
    if random and random < len(combos):
        combos = random_module.Random(seed).sample(combos, random)
    return combos


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The rows of the trials that failed (their `error` says why)."""
        return [r for r in self.rows if r["status"] == "failed"]


def run_sweep(grid: dict[str, list[str]], sweep_dir: str | os.PathLike, *, random: int = 0, seed: int = 0,
              data: Any = None, progress: bool | None = None, stop_after_epochs: int | None = None, parallel: int = 1,
              ray_address: str = "local", retry_failed: bool = False) -> SweepResult:
    """Train (or resume) the sweep in `sweep_dir`; see the module's docstring.

    data: an already loaded FaceData for every trial (tests); by default each trial loads its `data` setting.
    stop_after_epochs: end the call after that many epochs of the first trial it trains, as a kill would (tests).
    parallel: trials at once, as Ray tasks (1: one after another in this process); ray_address: "local" (a private
    Ray on this machine), "auto" or host:port (a cluster).
    retry_failed: run the trials that failed before (their failed.json) again; by default they are finished.
    """
    from ferkit.training.trainer import hold_run

    if parallel < 1:
        raise SweepError(f"parallel must be a number of trials >= 1, got {parallel}")

    sweep_dir = Path(sweep_dir)
    grid = absolute_paths(grid)
    trials = plan_trials(grid, random, seed)
    plan = {"grid": grid, "random": random, "seed": seed, "trials": trials}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with hold_run(sweep_dir):  # one process per sweep directory
        saved_path = sweep_dir / SWEEP_FILE
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            # (absolute_paths: a sweep.json written before paths were made absolute, resumed from where it began)
            if ({"grid": absolute_paths(saved.get("grid", {})), "random": saved.get("random"),
                 "seed": saved.get("seed")} != {k: plan[k] for k in ("grid", "random", "seed")}):
                raise SweepError(f"{sweep_dir} holds a sweep started with {_describe(saved)}; resume it with the "
                                 f"same settings (`ferkit sweep --resume {sweep_dir}`), or choose another --name")
            trials = [absolute_paths(t) for t in saved["trials"]]
        else:
            write_text(saved_path, json.dumps(plan, indent=2) + "\n")
        print(f"ferkit sweep: {len(trials)} trials over {', '.join(axes(grid)) or 'no varying setting'} in "
              f"{sweep_dir}", flush=True)
        todo = []
        for i, settings in enumerate(trials):
            run_dir = sweep_dir / trial_name(i)
            status = trial_status(run_dir)
            label = ", ".join(f"{k}={settings[k]}" for k in axes(grid))
            if status == "failed" and retry_failed:
                print(f"trial {i + 1}/{len(trials)} ({label}): failed before ({failure_reason(run_dir)}), "
                      "run again", flush=True)
                clear_failure(run_dir)
                status = trial_status(run_dir)
            if status == "done":
                print(f"trial {i + 1}/{len(trials)} ({label}): done, not re-run", flush=True)
            elif status == "failed":
                print(f"trial {i + 1}/{len(trials)} ({label}): failed ({failure_reason(run_dir)}), not re-run "
                      "(--retry-failed runs it again)", flush=True)
            else:
                todo.append(i)
        if parallel > 1 and todo:
            _run_on_ray(sweep_dir, grid, trials, todo, parallel, ray_address, data)
            return SweepResult(sweep_dir, write_results(sweep_dir, grid, trials))
        for i in todo:
            status = trial_status(sweep_dir / trial_name(i))
            label = ", ".join(f"{k}={trials[i][k]}" for k in axes(grid))
            print(f"trial {i + 1}/{len(trials)} ({label}): {'resuming' if status == 'partial' else 'training'}",
                  flush=True)
            reason = attempt_trial(str(sweep_dir), i, trials[i], progress, data, stop_after_epochs)
            if reason is not None:
                print(f"trial {i + 1}/{len(trials)} ({label}): failed: {reason}", flush=True)
            rows = write_results(sweep_dir, grid, trials)
            if stop_after_epochs is not None:
                return SweepResult(sweep_dir, rows)
        return SweepResult(sweep_dir, write_results(sweep_dir, grid, trials))


def train_trial(sweep_dir: str, i: int, settings: dict[str, str], progress: bool | None = False, data: Any = None,
                stop_after_epochs: int | None = None) -> str:
    """Train (or resume, or leave as it is when done) trial `i` of the sweep in `sweep_dir`; its run directory.
    progress None: bars for a new trial, a resumed one's as it last had them."""
    from ferkit.training.trainer import train

    run_dir = Path(sweep_dir) / trial_name(i)
    status = trial_status(run_dir)
    if status == "partial":
        train(resume=run_dir, data=data, stop_after_epochs=stop_after_epochs,
              changes=None if progress is None else {"progress": progress})
    elif status == "new":
        cfg = TrainConfig(out_dir=str(sweep_dir), run_name=run_dir.name, progress=progress is not False).override(
            [f"{k}={v}" for k, v in settings.items()])
        train(cfg, data=data, stop_after_epochs=stop_after_epochs)
    return str(run_dir)


def attempt_trial(sweep_dir: str, i: int, settings: dict[str, str], progress: bool | None = False, data: Any = None,
                  stop_after_epochs: int | None = None) -> str | None:
    """`train_trial`, with a failure of the trial's own (it diverged, its settings do not go together, its data or
    weights cannot be read) recorded in its failed.json instead of raised. The reason, or None when it trained."""
    from ferkit.data import DataError
    from ferkit.training.trainer import TrainingError

    try:
        train_trial(sweep_dir, i, settings, progress, data, stop_after_epochs)
    except (TrainingError, DataError, ValueError, FileNotFoundError) as e:
        return record_failure(Path(sweep_dir) / trial_name(i), e)
    return None


def record_failure(run_dir: Path, error: BaseException) -> str:
    """Write `run_dir`/failed.json for `error`; the reason as shown ("ErrorType: message")."""
    run_dir.mkdir(parents=True, exist_ok=True)  # a combination refused before its run directory was made
    write_text(run_dir / FAILED_FILE, json.dumps({"error_type": type(error).__name__, "reason": str(error)},
                                                 indent=2) + "\n")
    return f"{type(error).__name__}: {error}"


def failure_reason(run_dir: Path) -> str:
    """A failed trial's reason from its failed.json ("ErrorType: message")."""
    try:
        failed = json.loads((run_dir / FAILED_FILE).read_text())
        return f"{failed['error_type']}: {failed['reason']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unknown ({FAILED_FILE} unreadable: {e})"


def clear_failure(run_dir: Path) -> None:
    """Forget a trial's failure: it then resumes from its run directory, or starts anew if it made none."""
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # the trial's run directory is made by its training (an exclusive mkdir)


def _run_on_ray(sweep_dir: Path, grid: dict[str, list[str]], trials: list[dict[str, str]], todo: list[int],
                parallel: int, address: str, data: Any) -> None:
    """Trials `todo` as Ray tasks, at most `parallel` at once; the tables are rewritten as each one ends. A trial
    that fails, or whose task Ray loses (its worker killed for memory, its node gone), is recorded as failed and
    the others go on."""
    from ferkit.ray_support import RayStartError, connect

    try:
        started = connect(address, num_cpus=parallel)
    except ImportError:
        raise SweepError("parallel trials run on Ray: pip install 'ferkit[cluster]' (or parallel=1)") from None
    except RayStartError as e:
        raise SweepError(f"{e}; or run the trials one after another here (parallel=1)") from e
    import ray

    try:
        task = ray.remote(num_cpus=1, max_retries=0)(attempt_trial)
        where = str(sweep_dir.resolve())
        data_ref = ray.put(data) if data is not None else None
        queue, pending = list(todo), {}
        while queue or pending:
            while queue and len(pending) < parallel:
                i = queue.pop(0)
                print(f"trial {i + 1}/{len(trials)}: started on Ray", flush=True)
                pending[task.remote(where, i, trials[i], False, data_ref)] = i
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                i = pending.pop(ref)
                try:
                    reason = ray.get(ref)
                except ray.exceptions.RayError as e:  # an error the trial did not catch, a crashed worker...
                    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
                    reason = record_failure(sweep_dir / trial_name(i), cause if cause is not None else e)
                print(f"trial {i + 1}/{len(trials)}: " + (f"failed: {reason}" if reason is not None else "done"),
                      flush=True)
                write_results(sweep_dir, grid, trials)
    finally:
        if started:
            ray.shutdown()


def _describe(saved: dict) -> str:
    grid = " ".join(f"{k}={','.join(v)}" for k, v in saved.get("grid", {}).items())
    return grid + (f" --random {saved['random']} --seed {saved['seed']}" if saved.get("random") else "")


def load_plan(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """A sweep directory's sweep.json (SweepError when there is none)."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} holds no sweep (no {SWEEP_FILE})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"{path} is damaged ({e})") from e


def trial_name(i: int) -> str:
    return f"trial-{i:03d}"


def trial_status(run_dir: Path) -> str:
    """'failed' (its failed.json), 'done' (trained to its last epoch, or stopped by early stopping / its time
    limit), 'partial' (a run directory to resume) or 'new'."""
    if (run_dir / FAILED_FILE).is_file():
        return "failed"
    if not (run_dir / "config.json").is_file():
        return "new"
    manifest = run_dir / "manifest.json"
    if manifest.is_file() and (run_dir / "checkpoint.pt").is_file():
        m = json.loads(manifest.read_text())
        if m.get("stopped_by") or int(m.get("epochs_done", 0)) >= int(m["config"]["epochs"]):
            return "done"
    return "partial"


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    # Every column is a number but val_weights, the name of the weights evaluated (trainer.METRIC_FIELDS).
    return [{k: float(v) for k, v in r.items() if k != "val_weights"} for r in read_rows(path)]


def collect(sweep_dir: Path, grid: dict[str, list[str]], trials: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One row per trial: its varying settings, status, accuracies (empty where it has not trained yet) and,
    for a failed trial, why (`error`; its accuracies are those of the epochs it trained before it failed)."""
    rows = []
    for i, settings in enumerate(trials):
        run_dir = sweep_dir / trial_name(i)
        history = _metrics(run_dir)
        status = trial_status(run_dir)
        row: dict[str, Any] = {"trial": trial_name(i), **{k: settings[k] for k in axes(grid)},
                               "status": status if history or status == "failed" else "not run",
                               "run_dir": str(run_dir),
                               "error": failure_reason(run_dir) if status == "failed" else ""}
        if history:
            best = max(history, key=lambda h: h["val_acc"])
            manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() \
                else {}
            row.update(best_public_test=f"{best['val_acc']:.4f}", best_epoch=int(best["epoch"]),
                       final_public_test=f"{history[-1]['val_acc']:.4f}", epochs=len(history),
                       # the rate the schedule had reached at the end: shows whether it decayed at all in the budget
                       last_lr=f"{history[-1]['lr']:.3g}",
                       planned_epochs=manifest.get("config", {}).get("epochs", ""),
                       train_minutes=f"{sum(h['seconds'] for h in history) / 60:.1f}")
        rows.append(row)
    return rows


def write_results(sweep_dir: Path, grid: dict[str, list[str]], trials: list[dict[str, str]]) -> list[dict]:
    """results.csv, results.md and sweep.png from the trials' run directories; returns the rows."""
    rows = collect(sweep_dir, grid, trials)
    fields = ["trial", *axes(grid), *RESULT_FIELDS[1:]]
    write_rows(sweep_dir / "results.csv", fields, rows)
    write_text(sweep_dir / "results.md", render_markdown(grid, rows))
    plot_sweep(sweep_dir, grid, trials, sweep_dir / "sweep.png")
    return rows


def render_markdown(grid: dict[str, list[str]], rows: list[dict[str, Any]]) -> str:
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1}
    head = ["trial", *axes(grid), "status", "best PublicTest", "best epoch", "final PublicTest", "last lr", "epochs",
            "train min"]
    lines = [f"Fixed: {' '.join(f'`{k}={v}`' for k, v in fixed.items()) or 'none'}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    scores = [float(r["best_public_test"]) for r in rows if r.get("best_public_test") and r["status"] != "failed"]
    for r in rows:
        epochs = "" if not r.get("epochs") else (str(r["epochs"]) if str(r["epochs"]) == str(r["planned_epochs"])
                                                  else f"{r['epochs']} of {r['planned_epochs']}")
        best = ""
        if r.get("best_public_test"):
            value = float(r["best_public_test"])
            best = f"**{value:.2%}**" if scores and value == max(scores) and r["status"] != "failed" \
                else f"{value:.2%}"  # the sweep's best in bold
        final = f"{float(r['final_public_test']):.2%}" if r.get("final_public_test") else ""
        cells = [r["trial"], *(f"`{r[k]}`" for k in axes(grid)), r["status"], best, str(r.get("best_epoch", "")),
                 final, str(r.get("last_lr", "")), epochs, str(r.get("train_minutes", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed trials (a resume with --retry-failed runs them again):", ""]
        lines += [f"- {r['trial']}: {' '.join(str(r['error']).split())}" for r in failed]
    return "\n".join(lines) + "\n"


def plot_sweep(sweep_dir: Path, grid: dict[str, list[str]], trials: list[dict[str, str]],
               path: str | os.PathLike) -> None:
    """Left: PublicTest accuracy per epoch, one line per trial. Right: final PublicTest accuracy per cell (rows:
    the first varying setting's values; columns: the other varying settings' combinations; blank: not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    keys = axes(grid)
    row_key, col_keys = (keys[0], keys[1:]) if keys else (None, [])
    row_values = grid[row_key] if row_key else [""]
    col_combos = list(itertools.product(*(grid[k] for k in col_keys))) or [()]
    cells = np.full((len(row_values), len(col_combos)), np.nan)
    fig, (ax_curves, ax_cells) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    cmap = plt.get_cmap("tab20" if len(trials) > 10 else "tab10")
    for i, settings in enumerate(trials):
        history = _metrics(sweep_dir / trial_name(i))
        if not history or (sweep_dir / trial_name(i) / FAILED_FILE).is_file():  # failed trials are left out
            continue
        label = ", ".join(settings[k] for k in keys) or trial_name(i)
        ax_curves.plot([h["epoch"] for h in history], [h["val_acc"] for h in history], marker="." if
                       len(history) < 15 else None, color=cmap(i % cmap.N), label=label)
        r = row_values.index(settings[row_key]) if row_key else 0
        c = col_combos.index(tuple(settings[k] for k in col_keys))
        cells[r, c] = history[-1]["val_acc"]
    ax_curves.set(xlabel="epoch", ylabel="PublicTest accuracy", title="PublicTest accuracy per epoch")
    ax_curves.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_curves.grid(alpha=0.3)
    if ax_curves.lines:
        ax_curves.legend(fontsize=7, ncol=2 if len(ax_curves.lines) > 9 else 1, title=", ".join(keys) or None,
                         title_fontsize=7)
    finite = cells[np.isfinite(cells)]
    image = ax_cells.imshow(np.ma.masked_invalid(cells), cmap="viridis", aspect="auto",
                            vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    for (r, c), value in np.ndenumerate(cells):
        if math.isfinite(value):
            ax_cells.text(c, r, f"{value:.1%}", ha="center", va="center", fontsize=8,
                          color="white" if finite.size and value < (finite.min() + finite.max()) / 2 else "black")
    ax_cells.set_yticks(range(len(row_values)), row_values)
    ax_cells.set_xticks(range(len(col_combos)), [", ".join(c) for c in col_combos], rotation=30, ha="right",
                        fontsize=8)
    ax_cells.set(ylabel=row_key or "", xlabel=", ".join(col_keys), title="final PublicTest accuracy per cell")
    fig.colorbar(image, ax=ax_cells, fraction=0.046)
    fixed = " ".join(f"{k}={v[0]}" for k, v in grid.items() if len(v) == 1 and k != "data")
    fig.suptitle(f"sweep {Path(sweep_dir).name}" + (f" ({fixed})" if fixed else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
