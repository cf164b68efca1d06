"""The hyper-parameters of a training run, importable without torch (the command line builds its options
from these fields: one default, one help text, one check)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import SELECT_METRICS
from ..errors import bad_value


def option(default, help: str | None = None, choices=None):
    """A dataclass field whose ``metadata`` carries the command line's help text and choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: what short runs on MiniLM-L6 found to work; see docs/methods.md).

    ``save_total_limit``: resume points kept while training (each holds the weights and the optimizer's
    moments, about 3x the model). ``keep_optimizer_state``: keep the moments once the run is finished (a
    later run with more ``epochs`` then continues them instead of starting AdamW afresh).
    """

    epochs: int = option(2, "passes over the training data")
    batch_size: int = option(32, "examples per optimizer step and process (several processes: global batch = "
                             "processes x batch size)")
    learning_rate: float = option(5e-5, "peak AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.0, "fraction of the steps with a linear learning-rate warm-up, in [0, 1)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    eval_batch_size: int = option(128, "batch size of the evaluation each epoch")
    save_steps: int = option(200, "resume point every N steps (and every epoch)")
    select_metric: str = option("mean_exit_accuracy", "metric that picks the best epoch", SELECT_METRICS)
    seed: int = option(42, "random seed (data order, initialisation of the exits; dropout uses seed + process "
                       "rank)")
    save_total_limit: int = option(1, "resume points kept while training (each holds weights and optimizer "
                                   "moments, ~3x the model); a finished run keeps only a light one")
    keep_optimizer_state: bool = option(False, "keep the optimizer moments (2x the model) after the run "
                                        "finishes, so a rerun with more --epochs continues them")

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_value(name, value, "use a whole number >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad_value("seed", self.seed, "use a whole number, e.g. 42")
        if not self.learning_rate > 0:
            raise bad_value("learning_rate", self.learning_rate, "use a positive learning rate, e.g. 5e-5")
        if not self.weight_decay >= 0:
            raise bad_value("weight_decay", self.weight_decay, "use a weight decay >= 0, e.g. 0.01")
        if not 0 <= self.warmup_ratio < 1:
            raise bad_value("warmup_ratio", self.warmup_ratio, "use a fraction of the training steps in [0, 1), "
                            "e.g. 0.1")
        if not isinstance(self.keep_optimizer_state, bool):
            raise bad_value("keep_optimizer_state", self.keep_optimizer_state, "use true or false")
        if not self.max_grad_norm > 0:
            raise bad_value("max_grad_norm", self.max_grad_norm, "use a positive clipping norm, e.g. 1.0")
        if self.select_metric not in SELECT_METRICS:
            raise bad_value("select_metric", self.select_metric, f"choose one of {', '.join(SELECT_METRICS)}")
