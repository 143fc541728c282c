"""The ``cytofed`` command line: one sub-command per module, registered lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    """A sub-command: ``module:function`` that adds its arguments and sets ``func``, and the
    one line ``cytofed --help`` shows for it."""

    target: str
    summary: str


COMMANDS: dict[str, Command] = {
    "data": Command("common.inspect:register_data_command",
                    "inspect a data folder or manifest: layout, classes, unreadable files"),
    "bench": Command("simulations.bench:register_bench_command",
                     "throughput against the model-only ceiling and a plain PyTorch peer, "
                     "Flower's overhead, federation scaling"),
    "site": Command("client.daemon:register_site_command",
                    "check a hospital's data and keys, then run its Flower SuperNode"),
    "loco": Command("simulations.loco:register_loco_command",
                    "leave-one-centre-out benchmark of federated methods and baselines"),
    "report": Command("server.report:register_report_command",
                      "rewrite run reports; compare several runs or a LOCO sweep"),
    "evaluate": Command("common.inference:register_evaluate_command",
                        "metrics of an exported model on a labelled centre"),
    "predict": Command("common.inference:register_predict_command",
                       "predict the class of every image in a folder with an exported model"),
}
DESCRIPTION = ("Federated white-blood-cell classification: hospital labs train one classifier "
               "together without any image leaving its site. Training runs with `flwr run .` "
               "(see README.md); these commands prepare, benchmark and use it.")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and its arguments added.

    Every other sub-command gets an empty parser with its summary, so that ``--help`` lists
    them all without importing torch for each one.
    """
    parser = argparse.ArgumentParser(
        prog="cytofed", description=DESCRIPTION,
        epilog="`cytofed COMMAND --help` shows a command's options.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (target, summary) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=summary, description=summary)
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
