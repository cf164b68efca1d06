"""`layerexit train`: fine-tune a backbone with one exit per layer."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from ..catalog import DISTILL_DEFAULTS, FEATURES, OBJECTIVES
from ..consistentee.config import ConsistentEEConfig
from ..errors import LayerExitError, bad_value
from ..preflight import check_max_length, writable_folder
from ..resources import DEFAULT_MODEL
from ..training.config import TrainConfig
from .common import (add_data_options, add_fields, arg, at_least, command_parser, config_from, data_from,
                     field_help, in_range)

EXAMPLES = """examples:
  layerexit train --output runs/rt                      # packaged MiniLM on the packaged movie reviews
  layerexit train --data data/sst2 --split train --eval-split dev --limit 8000 --output runs/sst2
  layerexit train --data glue/sst2 --eval-split validation --output runs/glue-sst2     # hub data set, subset
  layerexit train --objective two-stage --epochs 1 --output runs/deebert
  layerexit train --config configs/sst2-minilm.yaml --epochs 3     # YAML options, flags override
  layerexit train --method consistentee --alpha 1.0 --copies 8 --output runs/cee      # ConsistentEE
  layerexit train --method consistentee --stage1 runs/rt --alpha 0.5 --output runs/cee-a0.5
  accelerate launch -m layerexit.cli.main train --model bert-base-uncased --data glue/sst2 --output runs/bert
"""

#: every TrainConfig field is an option, in field order (a field added there appears here with its help)
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
#: every ConsistentEEConfig field but hardness (which is --no-hardness); the learning rates keep short flags
CEE_FIELDS = [f.name for f in dataclasses.fields(ConsistentEEConfig) if f.name != "hardness"]
CEE_FLAGS = {"stage2_learning_rate": "--stage2-lr", "stage3_learning_rate": "--stage3-lr"}


def add_parser(subparsers):
    p = command_parser(subparsers, "train", "fine-tune a backbone with an exit after every layer", __doc__, EXAMPLES)
    p.add_argument("--model", default=DEFAULT_MODEL, help="backbone: packaged name, hub name or local folder")
    add_data_options(p, split="train")
    p.add_argument("--eval-split", default="validation", help="split evaluated each epoch ('none' to skip)")
    arg(p, "--eval-limit", type=int, check=at_least(1), help="use only the first N evaluation examples")
    p.add_argument("--output", default="runs/train", help="output folder (best/, final/, state/)")
    p.add_argument("--objective", default="weighted", choices=list(OBJECTIVES), help="training objective")
    p.add_argument("--layer-weights", type=float, nargs="+", help="per-exit weights for --objective custom")
    arg(p, "--distill-weight", type=float, check=in_range(0.0, 1.0, example="0.5"),
        help=f"--objective distilled: weight of the last exit's prediction against the labels for exits 1..L-1 "
        f"(default {DISTILL_DEFAULTS['distill_weight']})")
    arg(p, "--distill-temperature", type=float, check=in_range(0.0, math.inf, low_open=True, high_open=True,
                                                                example="2"),
        help=f"--objective distilled: softmax temperature of teacher and students "
        f"(default {DISTILL_DEFAULTS['distill_temperature']})")
    p.add_argument("--exit-feature", choices=list(FEATURES), help="exit feature (default: the checkpoint's "
                   "declared pooling, else the architecture's default)")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per input (at least 2, at most "
                   "the backbone's positions)")
    add_fields(p, TrainConfig, TRAIN_FIELDS)
    p.add_argument("--no-resume", action="store_true", help="discard a previous run in OUTPUT and start over "
                   "(without it, a run resumes only when its options and data match the folder's run_config.json)")
    cee = p.add_argument_group("ConsistentEE (--method consistentee; Zeng et al., AAAI 2024)")
    cee.add_argument("--method", default="joint", choices=["joint", "consistentee"],
                     help="joint: the --objective alone; consistentee: stage 1 (--stage1-objective) + RL policy stages")
    cee.add_argument("--no-hardness", action="store_true",
                     help=f"turn off: {field_help(ConsistentEEConfig, 'hardness')}")
    add_fields(cee, ConsistentEEConfig, CEE_FIELDS, CEE_FLAGS)
    cee.add_argument("--stage1", help="reuse a finished stage-1 (joint) run folder instead of training one")
    p.set_defaults(run=run, check=check)
    return p


def configs(args) -> tuple[TrainConfig, ConsistentEEConfig]:
    return config_from(args, TrainConfig), config_from(args, ConsistentEEConfig, hardness=not args.no_hardness)


def validate_as_flags(config) -> None:
    """``config.validate()``, its message naming the option (``--warmup-ratio``) instead of the field."""
    try:
        config.validate()
    except LayerExitError as err:
        field, _, rest = str(err).partition("=")
        flag = CEE_FLAGS.get(field, "--" + field.replace("_", "-"))
        raise LayerExitError(f"{flag}={rest}") from None


def check(args) -> None:
    """Every option, the backbone's positions and the output folder, before any data or model is loaded."""
    train_config, cee_config = configs(args)
    validate_as_flags(train_config)
    if args.method == "consistentee":
        validate_as_flags(cee_config)
        if args.no_resume and Path(args.output).exists():
            raise bad_value("--no-resume", True, f"{args.output} exists; ConsistentEE resumes stage by stage, so "
                            "choose a new --output to start over")
        if args.stage1 and not Path(args.stage1).is_dir():
            raise bad_value("--stage1", args.stage1, "give a finished stage-1 run folder (from `layerexit train`)")
    given = [f"--{name.replace('_', '-')}" for name in DISTILL_DEFAULTS if getattr(args, name) is not None]
    if given and (args.objective != "distilled" or args.method == "consistentee"):
        raise bad_value(given[0], getattr(args, given[0][2:].replace("-", "_")),
                        "it applies to --objective distilled (joint training) only; add --objective distilled "
                        "or leave it out")
    if args.objective == "custom" and not args.layer_weights:
        raise bad_value("--layer-weights", None, "--objective custom needs one weight per exit, e.g. "
                        "--layer-weights 1 2 3 4 5 6")
    check_max_length("--max-length", args.max_length, args.model)
    writable_folder("--output", args.output)


def run(args) -> int:
    from ..training.runfolder import launch_rank, locked

    # the folder's lock first (before torch, the data or the backbone load): a second training into the same
    # --output fails at once; the training itself holds it again (re-entrant) on the main process
    try:
        with locked(args.output, enabled=launch_rank() == 0):
            return _run(args)
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """With several processes (torchrun), leave the process group before the interpreter exits: a process that
    exits with it still open can abort while tearing down its communication threads ("terminate called without
    an active exception") although its work is done and saved."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a run that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(args) -> int:
    train_data = data_from(args)  # data errors (bad rows, encodings) before torch or the model loads
    eval_data = None
    if args.eval_split and args.eval_split != "none":
        eval_data = data_from(args, split=args.eval_split, limit=args.eval_limit, label_names=train_data.label_names)
    from ..training.run import train_classifier

    config, cee = configs(args)
    if args.method == "consistentee":
        from ..consistentee import train_consistentee

        train_consistentee(args.model, train_data, eval_data, args.output, cee, config, args.exit_feature,
                           args.max_length, stage1_dir=args.stage1)
        if _is_main_process():
            print(f"saved: {args.output}/final (ConsistentEE model with policies; evaluate with --rules consistentee)")
        return 0
    train_classifier(args.model, train_data, eval_data, args.output, args.objective, args.layer_weights,
                     args.exit_feature, args.max_length, config, resume=not args.no_resume,
                     **{name: default if getattr(args, name) is None else getattr(args, name)
                        for name, default in DISTILL_DEFAULTS.items()})
    if _is_main_process():  # one line, also when several processes train
        print(_saved_line(Path(args.output), eval_data is not None))
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _saved_line(output: Path, evaluated: bool) -> str:
    """What the run folder holds, as written (no best/ without an evaluation set)."""
    if evaluated:
        return f"saved: {output}/best (best), {output}/final (last epoch), {output}/run_config.json"
    return (f"saved: {output}/final (last epoch; no best/: no evaluation set, --eval-split none), "
            f"{output}/run_config.json")
