"""`layerexit train`: fine-tune a backbone with one exit per layer."""

from __future__ import annotations

from pathlib import Path

from ..consistentee import ConsistentEEConfig, train_consistentee
from ..consistentee.schedule import DEFAULT_POLICY_INPUTS
from ..errors import bad_value
from ..heads import FEATURES, POLICY_INPUTS
from ..resources import DEFAULT_MODEL
from ..training import OBJECTIVES, TrainConfig
from ..training.run import train_classifier
from .common import Formatter, add_config_option, add_data_options, data_from

EXAMPLES = """examples:
  layerexit train --output runs/rt                      # packaged MiniLM on the packaged movie reviews
  layerexit train --data ../shared/data/sst2 --split train --eval-split dev --limit 8000 --output runs/sst2
  layerexit train --objective two-stage --epochs 1 --output runs/deebert
  layerexit train --config configs/sst2-minilm.yaml --epochs 3     # YAML options, flags override
  layerexit train --method consistentee --alpha 1.0 --copies 8 --output runs/cee      # ConsistentEE
  layerexit train --method consistentee --stage1 runs/rt --alpha 0.5 --output runs/cee-a0.5
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
    cee = p.add_argument_group("ConsistentEE (--method consistentee; Zeng et al., AAAI 2024)")
    cee.add_argument("--method", default="joint", choices=["joint", "consistentee"],
                     help="joint: the --objective alone; consistentee: stage 1 (weighted) + RL policy stages")
    cee.add_argument("--alpha", type=float, default=1.0, help="layer cost in the reward -CE - alpha*(e/L)*(1-m/L); "
                     "the reference code's raw-layer alpha_ref equals alpha / L")
    cee.add_argument("--no-hardness", action="store_true", help="reward -CE - alpha*e/L (no memorized-layer factor)")
    cee.add_argument("--copies", type=int, default=8, help="K rollouts per instance (group-mean baseline)")
    cee.add_argument("--action", default="bernoulli", choices=["bernoulli", "greedy", "eps_greedy"])
    cee.add_argument("--epsilon", type=float, default=0.1, help="exploration rate for eps_greedy")
    cee.add_argument("--rounds", type=int, default=1, help="alternating stage-2/stage-3 rounds")
    cee.add_argument("--policy-hidden", type=int, default=32)
    cee.add_argument("--stage2-epochs", type=int, default=2)
    cee.add_argument("--stage2-lr", type=float, default=3e-4)
    cee.add_argument("--stage3-epochs", type=int, default=1, help="0 skips stage 3 (policies only)")
    cee.add_argument("--stage3-lr", type=float, default=3e-5)
    cee.add_argument("--policy-inputs", default=",".join(DEFAULT_POLICY_INPUTS),
                     help="policy inputs beside the exit feature, comma separated, from "
                     f"{','.join(POLICY_INPUTS)}; 'none' for the paper's policy on the feature alone")
    cee.add_argument("--alpha-range", help="LOW,HIGH: alpha-conditioned policy (alpha drawn per instance, given "
                     "to the policy, a dial at inference with `evaluate --alpha`); --alpha is its default")
    cee.add_argument("--reward", default="paper", choices=["paper", "ce"],
                     help="paper: -CE - layer cost; ce: -CE alone (the released reference code)")
    cee.add_argument("--all-exits-weight", type=float, default=0.0,
                     help="stage 3: add this multiple of the weighted loss over all exits (feeds unchosen exits)")
    cee.add_argument("--policy-entropy", type=float, default=0.0,
                     help="reward the policies' entropy with this weight (keeps them exploring)")
    cee.add_argument("--stage1", help="reuse a finished stage-1 (joint) run folder instead of training one")
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
    if args.method == "consistentee":
        cee = ConsistentEEConfig(alpha=args.alpha, hardness=not args.no_hardness, copies=args.copies,
                                 action=args.action, epsilon=args.epsilon, rounds=args.rounds,
                                 policy_hidden=args.policy_hidden, stage2_epochs=args.stage2_epochs,
                                 stage2_learning_rate=args.stage2_lr, stage3_epochs=args.stage3_epochs,
                                 stage3_learning_rate=args.stage3_lr, reward=args.reward,
                                 policy_inputs=_policy_inputs(args.policy_inputs),
                                 alpha_range=_alpha_range(args.alpha_range),
                                 all_exits_weight=args.all_exits_weight, policy_entropy=args.policy_entropy)
        cee.validate()
        if args.no_resume and Path(args.output).exists():
            raise bad_value("--no-resume", True, f"{args.output} exists; ConsistentEE resumes stage by stage, so "
                            "choose a new --output to start over")
        train_consistentee(args.model, train_data, eval_data, args.output, cee, config, args.exit_feature,
                           args.max_length, stage1_dir=args.stage1)
        print(f"saved: {args.output}/final (ConsistentEE model with policies; evaluate with --rules consistentee)")
        return 0
    train_classifier(args.model, train_data, eval_data, args.output, args.objective, args.layer_weights,
                     args.exit_feature, args.max_length, config, resume=not args.no_resume)
    print(f"saved: {args.output}/best (best), {args.output}/final (last epoch)")
    return 0


def _policy_inputs(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() in ("", "none") else tuple(t.strip() for t in text.split(",") if t.strip())


def _alpha_range(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise bad_value("--alpha-range", text, "give LOW,HIGH, e.g. 0.1,3") from None
    return low, high
