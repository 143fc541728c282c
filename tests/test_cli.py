"""`cytofed --help`: every sub-command with its one-line purpose, without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulations.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
HELP_WITHOUT_TORCH = """
import sys
from simulations.cli import main
try:
    main(["--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("imported:", *sorted(m for m in ("torch", "flwr", "timm") if m in sys.modules))
"""


def test_help_lists_every_command_with_its_purpose_without_importing_torch():
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "imported:", lines[-1]  # neither torch, flwr nor timm
    for name, command in COMMANDS.items():
        assert any(line.split() == [name, *command.summary.split()] for line in lines), name
    assert "developer" not in result.stdout and "registered lazily" not in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_registers_its_arguments(name):
    parser = build_parser(name)
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert len(subparsers.choices[name]._actions) > 1  # more than its own --help
