"""`layerexit train`: fine-tune a backbone with one exit per layer."""

from __future__ import annotations

from ..heads import FEATURES
from ..resources import DEFAULT_MODEL
from ..training import OBJECTIVES, TrainConfig
from ..training.run import train_classifier
from .common import Formatter, add_config_option, add_data_options, data_from

EXAMPLES = """examples:
  layerexit train --output runs/rt                      # packaged MiniLM on the packaged movie reviews
  layerexit train --data ../shared/data/sst2 --split train --eval-split dev --limit 8000 --output runs/sst2
  layerexit train --objective two-stage --epochs 1 --output runs/deebert
  layerexit train --config configs/sst2-minilm.yaml --epochs 3     # YAML options, flags override
  accelerate launch -m layerexit.cli.main train --model bert-base-uncased --data glue --output runs/bert
"""


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="fine-tune a backbone with an exit after every layer",
                              description=__doc__, epilog=EXAMPLES, formatter_class=Formatter)
    add_config_option(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="backbone: packaged name, hub name or local folder")
    add_data_options(p, split="train")
    p.add_argument("--eval-split", default="validation", help="split evaluated each epoch ('none' to skip)")
    p.add_argument("--eval-limit", type=int, help="use only the first N evaluation examples")
    p.add_argument("--output", default="runs/train", help="output folder (best/, final/, state/)")
    p.add_argument("--objective", default="weighted", choices=OBJECTIVES.names(), help="training objective")
    p.add_argument("--layer-weights", type=float, nargs="+", help="per-exit weights for --objective custom")
    p.add_argument("--exit-feature", choices=list(FEATURES), help="exit feature (default: the checkpoint's "
                   "declared pooling, else the architecture's default)")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per input")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--save-steps", type=int, default=200, help="resume point every N steps (and every epoch)")
    p.add_argument("--select-metric", default="mean_exit_accuracy", choices=["mean_exit_accuracy", "final_accuracy"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT/state exists")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    train_data = data_from(args)
    eval_data = None
    if args.eval_split and args.eval_split != "none":
        eval_data = data_from(args, split=args.eval_split, limit=args.eval_limit, label_names=train_data.label_names)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, save_steps=args.save_steps,
                         select_metric=args.select_metric, seed=args.seed)
    train_classifier(args.model, train_data, eval_data, args.output, args.objective, args.layer_weights,
                     args.exit_feature, args.max_length, config, resume=not args.no_resume)
    print(f"saved: {args.output}/best (best), {args.output}/final (last epoch)")
    return 0
