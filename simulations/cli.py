"""The ``cytofed`` command line: one sub-command per module, registered lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Sub-command name -> "module:function" that adds its arguments to a parser and sets ``func``.
COMMANDS: dict[str, str] = {
    "data": "common.inspect:register_data_command",
    "bench": "simulations.bench:register_bench_command",
    "site": "client.daemon:register_site_command",
    "loco": "simulations.loco:register_loco_command",
    "report": "server.report:register_report_command",
    "evaluate": "common.inference:register_evaluate_command",
    "predict": "common.inference:register_predict_command",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="cytofed", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, target in COMMANDS.items():
        module_name, function_name = target.split(":")
        register = getattr(importlib.import_module(module_name), function_name)
        register(subparsers.add_parser(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; errors in user input exit with status 2 and a one-line message."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"cytofed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
