"""`layerexit predict`: classify texts with early exit, one JSON line per text (label, score, exit layer).

Texts come from the command line, or from --file (one text per line, "-" for standard input); line i of the
output answers line i of the input. The rule is --rule with --param values, a fitted rule from a
`layerexit calibrate` folder (--calibration, --rule picks which), or the checkpoint's stored default.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import bad_value
from .common import add_device_options, command_parser, device_and_dtype, parse_rule_params, require

EXAMPLES = """examples:
  layerexit predict --model runs/rt/best "a gripping, beautifully shot film" "two hours I will never get back"
  layerexit predict --model runs/rt/best --file reviews.txt --rule maxprob --param threshold=0.8 > predictions.jsonl
  layerexit predict --model runs/sst2/best --calibration runs/sst2/calibration --rule pcee --file reviews.txt
  cat reviews.txt | layerexit predict --model user/name --file - --device cuda --dtype bfloat16
"""


def add_parser(subparsers):
    p = command_parser(subparsers, "predict", "classify texts with early exit; JSON lines out", __doc__, EXAMPLES)
    p.add_argument("texts", nargs="*", help="texts to classify (or use --file)")
    p.add_argument("--model", help="checkpoint folder or hub id (required)")
    p.add_argument("--file", help="a UTF-8 text file with one text per line; '-' reads standard input")
    p.add_argument("--rule", help="exit rule name (default: the checkpoint's stored rule, else maxprob); with "
                   "--calibration, the fitted rule to use, pcee if not given")
    p.add_argument("--param", action="append", help="rule parameter NAME=VALUE (repeatable)")
    p.add_argument("--calibration", help="folder written by `layerexit calibrate` (its rules.json)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    p.add_argument("--output", help="write the JSON lines to this file instead of standard output")
    add_device_options(p)
    p.set_defaults(run=run)
    return p


def read_texts(args) -> list[str]:
    """The texts to classify, checked before any model loads."""
    if bool(args.texts) == bool(args.file):
        raise bad_value("texts/--file", args.file or args.texts, "give texts on the command line or --file FILE "
                        "(one text per line), not both")
    if args.texts:
        return list(args.texts)
    if args.file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(args.file)
        if not path.is_file():
            raise bad_value("--file", args.file, "give an existing text file with one text per line (or - for stdin)")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise bad_value("--file", args.file, f"it is not UTF-8 text ({err.reason} at byte {err.start}); "
                            "save it as UTF-8") from None
    if not lines:
        raise bad_value("--file", args.file, "the file holds no text")
    return lines


def run(args) -> int:
    from ..pipelines import pipeline

    require(args, "model", "--model runs/rt/best")
    texts = read_texts(args)
    if not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise bad_value("--batch-size", args.batch_size, "give a whole number of texts per batch, at least 1")
    device, dtype = device_and_dtype(args)
    params = parse_rule_params(args.param)
    classify = pipeline(args.model, args.rule, calibration=args.calibration, device=device, dtype=dtype,
                        batch_size=args.batch_size, **params)
    lines = [json.dumps({"text": text, **result}, ensure_ascii=False) + "\n"
             for text, result in zip(texts, classify(texts))]
    if args.output:
        from ..io import write_text_atomic

        write_text_atomic(args.output, "".join(lines))
    else:
        sys.stdout.writelines(lines)
    return 0
