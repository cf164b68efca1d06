"""One call from a backbone name and data to a trained multi-exit model (used by the CLI and the demo)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from ..catalog import DISTILL_DEFAULTS
from ..data import Encoded, TextClassificationData, check_labels
from ..model import MultiExitModel
from ..resources import resolve_model
from .objectives import make_objective
from .trainer import TrainConfig, locked_run, make_accelerator, seed_everything, train


def train_classifier(
    backbone: str,
    train_data: TextClassificationData,
    eval_data: TextClassificationData | None,
    output_dir: str | Path,
    objective: str = "weighted",
    layer_weights: list[float] | None = None,
    exit_feature: str | None = None,
    max_length: int = 128,
    config: TrainConfig | None = None,
    resume: bool = True,
    distill_weight: float = DISTILL_DEFAULTS["distill_weight"],
    distill_temperature: float = DISTILL_DEFAULTS["distill_temperature"],
):
    """Wrap ``backbone`` with exits for ``train_data``'s labels, train it, and return (best model, tokenizer).
    ``distill_weight`` and ``distill_temperature`` configure the ``distilled`` objective.

    The output folder's lock is taken first, so a second training into ``output_dir`` fails before any
    backbone or data loads."""
    config = config or TrainConfig()
    config.validate()
    objective_obj = make_objective(objective, layer_weights, distill_weight, distill_temperature)
    accelerator = make_accelerator()
    with locked_run(Path(output_dir), accelerator):
        path = resolve_model(backbone)
        seed_everything(config.seed)  # the exits' initial weights depend on the seed too (the same on every process)
        model = MultiExitModel.from_backbone(path, train_data.num_labels, exit_feature=exit_feature,
                                             label_names=train_data.label_names, max_length=max_length)
        model.config.backbone = backbone
        tokenizer = AutoTokenizer.from_pretrained(path)
        if eval_data is not None:
            check_labels(eval_data, model.config.num_labels, model.config.label_names)
        train_set = Encoded(train_data, tokenizer, max_length)
        eval_set = Encoded(eval_data, tokenizer, max_length) if eval_data is not None else None
        progress = train(model, tokenizer, train_set, eval_set, objective_obj, config, output_dir, resume=resume,
                         accelerator=accelerator)
        best = Path(output_dir) / ("best" if eval_data is not None else "final")
        return MultiExitModel.from_pretrained(best), tokenizer, progress
