"""The CLI's help and version: what a new user reads first."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.cli._app import package_version

runner = CliRunner()
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # one line per help entry: no wrapping inside a word


def _command_texts() -> dict[str, str]:
    """Every command's help, epilog and option help as written in the source."""
    group = typer.main.get_command(app)
    texts = {}
    for name, cmd in group.commands.items():
        parts = [cmd.help or "", cmd.epilog or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        texts[name] = "\n".join(parts).replace("\\[", "[")
    return texts


@pytest.mark.parametrize("name", sorted(_command_texts()))
def test_help_shows_package_extras_literally(name: str) -> None:
    """Help is Rich markup: `ferkit[onnx]` printed as `ferkit` sent users to install the wrong thing."""
    extras = set(re.findall(r"ferkit\[\w+\]", _command_texts()[name]))
    result = runner.invoke(app, [name, "--help"], env=WIDE)
    assert result.exit_code == 0
    for extra in extras:
        assert extra in result.stdout, (name, extra)


def test_version_flag_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ferkit {package_version()}"
    assert package_version()[0].isdigit()


def test_train_help_shows_the_config_defaults() -> None:
    from ferkit.training.config import TrainConfig

    defaults = TrainConfig()
    text = runner.invoke(app, ["train", "--help"], env=WIDE).stdout
    lines = {line.split()[1]: line for line in text.splitlines() if line.strip("│ ").startswith("--")}
    for flag, value in (("--epochs", defaults.epochs), ("--lr", defaults.lr), ("--optimizer", defaults.optimizer),
                        ("--data", defaults.data), ("--out", defaults.out_dir)):
        assert f"default: ({value})" in lines[flag], lines[flag]


def test_train_and_reproduce_default_to_the_same_data_file() -> None:
    from ferkit.training.config import TrainConfig

    reproduce = typer.main.get_command(app).commands["reproduce"]
    data = next(p for p in reproduce.params if p.name == "data")
    assert TrainConfig().data == data.default == "fer2013.csv.gz"


@pytest.mark.parametrize("name", sorted(_command_texts()))
def test_example_commands_continue_with_a_backslash(name: str) -> None:
    """An example command broken over lines must show a backslash at each break, or a user who pastes it runs
    the first line alone. In the source a single backslash at a line's end is Python's line continuation: the
    lines are joined, and the help shows one line with a gap of spaces before the next option (train's
    distillation example once did)."""
    group = typer.main.get_command(app)
    lines = (group.commands[name].epilog or "").splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if not re.match(r"\s*(ferkit|torchrun|python)\b", line):
            continue
        joined = re.search(r"\S {3,}(--|[\w.]+=)", line)  # an option after a gap: a swallowed line break
        assert not joined, f"{name} --help: {line.strip()!r} lost its backslash (doubled in the source)"
        continued = re.match(r"\s{4,}(--|[\w.]+=)", following)  # an indented option or key=value
        assert not continued or line.rstrip().endswith("\\"), f"{name} --help: {line.strip()!r} continues " \
            "without a backslash"
