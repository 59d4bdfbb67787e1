"""The console script is installed and every command documents itself."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

import ckapipe
from ckapipe.cli import main


def test_version_matches_package():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert ckapipe.__version__ in result.output


def test_every_command_has_help():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0, top.output
    assert main.commands, "no commands registered"
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert command.help, f"command {name!r} has no docstring/--help text"


def test_console_script_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "ckapipe.cli", "--help"], capture_output=True, text=True, check=False
    )
    # `python -m ckapipe.cli` needs a __main__ guard; the installed `ckapipe` script is the real entry
    assert completed.returncode == 0, completed.stderr


def test_public_api_names_exist():
    for name in ("cka", "MinibatchCKA", "ActivationStore", "open_store"):
        assert callable(getattr(ckapipe, name)), name
    try:
        ckapipe.not_a_name  # noqa: B018
    except AttributeError as error:
        assert "not_a_name" in str(error)
    else:
        raise AssertionError("unknown attribute did not raise")
