"""The `layerexit` command: one subcommand per file in this package.

Parsers are built from light modules only (no torch, transformers or matplotlib), so ``--help``, ``list`` and
every option check answer at once; a command imports what it runs inside its ``run``. Every option is checked
(flags and --config values alike) before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .. import __version__
from ..errors import LayerExitError
from . import benchmark, calibrate, demo, evaluate, generate, list as list_cmd, predict, serve, train
from .common import apply_config, run_checks

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

COMMANDS = (train, evaluate, calibrate, benchmark, demo, generate, list_cmd, serve, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerexit", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"layerexit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for module in COMMANDS:
        p = module.add_parser(sub)
        subparsers[p.prog.split()[-1]] = p
    parser.subparsers = subparsers
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    command = args.command
    try:
        sub = parser.subparsers[command]
        args = apply_config(sub, argv[1:], sub.parse_args(argv[1:]))
        run_checks(sub, args)  # every option, before any model is loaded
        if command != "list":  # commands that run models: keep freed activation memory (see layerexit.allocator)
            from ..allocator import keep_freed_memory

            keep_freed_memory()
        return args.run(args)
    except LayerExitError as err:
        print(f"layerexit {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerexit {command}: interrupted; {_where(command, args)}", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permissions, a file removed under us
        place = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"layerexit {command}: error: {err.strerror or err}{place}; {_where(command, args)}", file=sys.stderr)
        return 1


#: a value that starts like an option but is numbers: "-0.5,2" (argparse takes only a lone "-0.5" as a value)
_NEGATIVE_NUMBERS = re.compile(r"^-(\d+\.?\d*|\.\d+)([,:]-?(\d+\.?\d*|\.\d+))*$")


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--alpha-range -0.5,2`` -> ``--alpha-range=-0.5,2``, so that argparse reads the numbers as the option's
    value instead of an unknown option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBERS.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _where(command: str, args) -> str:
    """What an interrupted command leaves behind, in one sentence."""
    from ..preflight import resume_hint

    if command == "train":
        return resume_hint(getattr(args, "output", None))
    return "nothing is resumed: run the command again"


if __name__ == "__main__":
    sys.exit(main())
