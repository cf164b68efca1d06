"""The `layerexit` command: one subcommand per file in this package."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import LayerExitError
from . import benchmark, calibrate, demo, evaluate, generate, list as list_cmd, serve, train
from .common import apply_config

DESCRIPTION = """layerexit: early exiting for transformer encoders.

Attach an exit after every layer of a pretrained model, train the exits, then stop each input at the first
layer whose answer is good enough, with layers really skipped, per input, inside batches."""

EXAMPLES = """examples:
  layerexit demo --quick
  layerexit train --output runs/rt && layerexit evaluate --model runs/rt/best --output runs/rt/eval
  layerexit calibrate --model runs/rt/best --split validation --output runs/rt/calibration
  layerexit benchmark --model runs/rt/best --rule maxprob
  layerexit list
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerexit", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for module in (train, evaluate, calibrate, benchmark, demo, generate, list_cmd, serve):
        p = module.add_parser(sub)
        subparsers[p.prog.split()[-1]] = p
    parser.subparsers = subparsers
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    command = args.command
    try:
        sub = parser.subparsers[command]
        args = apply_config(sub, argv[1:], sub.parse_args(argv[1:]))
        return args.run(args)
    except LayerExitError as err:
        print(f"layerexit {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
