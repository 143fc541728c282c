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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and its arguments added.

    Every other sub-command gets an empty parser, so that ``--help`` still lists them all
    without importing torch for each one.
    """
    parser = argparse.ArgumentParser(prog="cytofed", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, target in COMMANDS.items():
        subparser = subparsers.add_parser(name)
        if name == command:
            module_name, function_name = target.split(":")
            getattr(importlib.import_module(module_name), function_name)(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; errors in user input exit with status 2 and a one-line message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"cytofed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
