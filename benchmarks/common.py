"""What the SST-2 benchmark scripts share: the benchmark training recipe (train a multi-exit classifier, or
reuse the run folder's checkpoint) and per-split logit caches kept beside the run.

The scripts import it as ``from common import ...`` (they run as files from the repository root, so their own
folder is on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from layerexit.data import Encoded, TextClassificationData, load_data
from layerexit.evaluation.cache import LogitCache, collect_logits, tag_split
from layerexit.model import MultiExitModel
from layerexit.training import TrainConfig
from layerexit.training.run import train_classifier


def train_or_reuse(backbone: str, data_dir: str, run_dir: str | Path, train_examples: int, dev_examples: int,
                   epochs: int, objective: str = "weighted", exit_feature: str | None = None, reuse: bool = True):
    """(model, tokenizer) of ``RUN_DIR/model/best``: loaded when it exists and ``reuse``, else trained with the
    benchmark recipe (first ``train_examples`` training phrases, ``dev_examples`` dev phrases for model
    selection, batch 32, lr 5e-5, max length 64, seed 42; resumes an interrupted run)."""
    best = Path(run_dir) / "model" / "best"
    if reuse and best.is_dir():
        return MultiExitModel.from_pretrained(best), AutoTokenizer.from_pretrained(best)
    train_data = load_data(data_dir, "train", limit=train_examples)
    dev_data = load_data(data_dir, "dev", limit=dev_examples)
    config = TrainConfig(epochs=epochs, batch_size=32, learning_rate=5e-5, seed=42)
    model, tokenizer, _ = train_classifier(backbone, train_data, dev_data, Path(run_dir) / "model",
                                           objective=objective, exit_feature=exit_feature, max_length=64,
                                           config=config, resume=True)
    return model, tokenizer


def cached_logits(model, tokenizer, data: TextClassificationData, path: str | Path) -> tuple[LogitCache, Encoded]:
    """Every exit's logits over ``data``, tagged with its split, loaded from ``path`` when there (written
    otherwise); a cache of another size is refused."""
    path = Path(path)
    encoded = Encoded(data, tokenizer, model.config.max_length)
    if path.is_file():
        cache = LogitCache.load(path)
        if cache.labels.numel() != len(encoded):
            raise SystemExit(f"{path} holds {cache.labels.numel()} rows, {data.split} has {len(encoded)}; delete it")
    else:
        cache = collect_logits(model, encoded, batch_size=128)
    tag_split(cache, data.split, encoded)
    cache.save(path)
    return cache, encoded
