"""CLI smoke tests: train, models, --help, and clean errors (exit 2, no traceback) for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ferkit.cli as cli
from ferkit.cli import app

runner = CliRunner()


def test_train_then_evaluate_the_run(tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    trained = runner.invoke(app, ["train", "--data", str(tiny_csv), "--model", "sixclass_cnn4", "--epochs", "1",
                                  "--batch-size", "16", "--out", str(out), "--name", "smoke", "--no-progress",
                                  "augment.rotation=5", "precision=fp32"])
    assert trained.exit_code == 0, trained.output
    config = json.loads((out / "smoke" / "config.json").read_text())
    assert config["augment"]["rotation"] == 5 and config["epochs"] == 1
    evaluated = runner.invoke(app, ["evaluate", "--weights", str(out / "smoke" / "best.safetensors"),
                                    "--data", str(tiny_csv), "--split", "test", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["num_samples"] == 35
    # Resuming may change the run settings (the finished run trains no more), not what the run learns with.
    resumed = runner.invoke(app, ["train", "--resume", str(out / "smoke"), "--no-progress", "--time-limit", "5",
                                  "threads=1"])
    assert resumed.exit_code == 0, resumed.output
    config = json.loads((out / "smoke" / "config.json").read_text())
    assert config["time_limit"] == 5 and config["threads"] == 1 and config["lr"] == 0.01
    refused = runner.invoke(app, ["train", "--resume", str(out / "smoke"), "--lr", "0.5"])
    assert refused.exit_code == 2 and "got lr" in refused.output and "Traceback" not in refused.output


def test_a_resumed_run_keeps_its_progress_setting(tiny_csv: Path, tmp_path: Path) -> None:
    # A run started with --no-progress (under nohup, into a log) and resumed without the flag writes no progress
    # bars into that log; --progress turns them on for the rest of the run.
    out = tmp_path / "runs"
    for name, flags, bars in (("quiet", [], False), ("loud", ["--progress"], True)):
        started = runner.invoke(app, ["train", "--data", str(tiny_csv), "--model", "sixclass_cnn4", "--epochs", "2",
                                      "--batch-size", "16", "--out", str(out), "--name", name, "--no-progress",
                                      "precision=fp32", "time_limit=1e-9"])  # the limit stops it after one epoch
        assert started.exit_code == 0 and "batch/s" not in started.output, started.output
        resumed = runner.invoke(app, ["train", "--resume", str(out / name), "--time-limit", "0", *flags])
        assert resumed.exit_code == 0 and "epoch 2/2" in resumed.output, resumed.output
        assert ("batch/s" in resumed.output) == bars
        assert json.loads((out / name / "config.json").read_text())["progress"] is bars


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.csv"], "missing.csv"),
    (["--model", "nope"], "unknown model"),
    (["epochs"], "key=value"),
    (["--optimizer", "lion"], "optimizer"),
])
def test_train_user_errors_exit_2_without_traceback(tiny_csv: Path, tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    base = ["train", "--data", str(tiny_csv), "--out", str(tmp_path), "--epochs", "1", "--no-progress"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_train_bad_csv_names_the_line(tmp_path: Path, cache_dir: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels,Usage\n3," + " ".join(["1"] * 10) + ",Training\n")
    result = runner.invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2 and "bad.csv, line 2" in result.output


def test_models_lists_every_registered_model() -> None:
    from ferkit.models import list_models

    result = runner.invoke(app, ["models", "--no-flops"])
    assert result.exit_code == 0
    for name in list_models():
        assert name in result.output
    md = runner.invoke(app, ["models", "frivas*", "--markdown"])
    assert md.exit_code == 0 and md.output.count("| `frivas_cnn") == 6
    # FLOPs are counted only when asked for, in both layouts
    rows = [line.split("|") for line in md.output.splitlines() if line.startswith("| `")]
    assert all(float(r[4]) > 0 for r in rows)
    quick = runner.invoke(app, ["models", "frivas*", "--markdown", "--no-flops"])
    assert [r[4].strip() for r in (line.split("|") for line in quick.output.splitlines() if line.startswith("| `"))
            ] == ["-"] * 6
    plain = [line.split() for line in result.output.splitlines() if line.startswith("frivas_cnn")]
    assert [r[3] for r in plain] == ["-"] * 6


@pytest.mark.parametrize("command", ["train", "evaluate", "models", "reproduce"])
def test_help_has_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Examples" in result.output


def test_reproduce_list_marks_measured_and_missing_rows(tmp_path: Path) -> None:
    (tmp_path / "seeds.csv").write_text("name,system,registry_name,classes,reported,public_test,private_test,epochs,"
                                        "train_minutes,hardware,command\nfrivas_cnn2,F-Riv model 2,frivas_cnn2,7,"
                                        "0.6510,0.6604,0.6776,50,42.3,cpu,ferkit reproduce frivas_cnn2\n")
    result = runner.invoke(app, ["reproduce", "--list", "--results", str(tmp_path)])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line.startswith(" ")}
    assert "measured 0.678 (50 epochs)" in lines["frivas_cnn2"]
    assert "not run yet" in lines["frivas_cnn3"]



class _Exited(Exception):
    """os._exit, caught: the test process goes on."""


@pytest.fixture
def torchrun_worker(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """This process as a torchrun worker whose command made a process group; the statuses os._exit was given."""
    from ferkit.training import distributed

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise _Exited

    monkeypatch.setattr(distributed, "_made_group", True)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    return exits


@pytest.mark.parametrize(("argv", "status", "printed"), [
    (["ferkit", "models", "frivas*"], 0, "frivas_cnn5"),  # a command that succeeds
    (["ferkit", "train", "--data", "no/such.csv"], 2, "no/such.csv"),  # a user error: its status and message
    (["ferkit", "no-such-command"], 2, "No such command"),  # click's own usage error
])
def test_a_torchrun_worker_ends_with_its_commands_status_and_output(argv: list[str], status: int, printed: str,
                                                                     torchrun_worker: list[int],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A worker ends the process itself (os._exit, past the interpreter's teardown, where gloo aborted finished runs
    # now and then), with the status the command gave and its output.

    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(_Exited):
        cli.main()
    out = capsys.readouterr()
    assert torchrun_worker == [status]
    assert printed in out.out + out.err


def test_a_torchrun_worker_turns_an_exit_message_into_status_1(torchrun_worker: list[int],
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:

    def app() -> None:
        raise SystemExit("stopped: a reason")

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(_Exited):
        cli.main()
    assert torchrun_worker == [1] and "stopped: a reason" in capsys.readouterr().err


def test_a_torchrun_workers_crash_keeps_its_traceback(torchrun_worker: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:

    def app() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main()
    assert torchrun_worker == []


def test_a_process_that_made_no_group_exits_as_python_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # WORLD_SIZE alone (a cluster job's environment, `ferkit serve` in it) is no torchrun worker: click's SystemExit
    # goes up as usual, so atexit handlers and thread joins still run.
    from ferkit.training import distributed

    monkeypatch.setattr(distributed, "_made_group", False)
    monkeypatch.setattr(cli.os, "_exit", lambda code: pytest.fail("os._exit in a process that made no group"))
    monkeypatch.setattr("sys.argv", ["ferkit", "models", "frivas*"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0


def test_a_torchrun_workers_piped_output_is_flushed_before_it_ends() -> None:
    # Into a pipe, stdout is block-buffered: os._exit without the flush would lose what the command printed
    # (a command that prints without flushing, and writes to stderr, then exits 3).
    script = ("import sys\nimport ferkit.cli as cli\nfrom ferkit.training import distributed\n"
              "distributed._made_group = True\n"
              "def app():\n    print('said and not flushed')\n    sys.stderr.write('warned')\n    sys.exit(3)\n"
              "cli.app = app\ncli.main()\nprint('not reached')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a plain launch is
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "said and not flushed\n" and done.stderr.endswith("warned")
