"""A tiny offline text task: a word-level tokenizer written to disk, a tiny BERT saved beside it, and a
synthetic sentiment data set that a 2-layer model learns in a few steps. Nothing is downloaded."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, BertTokenizerFast

POSITIVE = ["good", "great", "fun", "lovely", "superb", "moving"]
NEGATIVE = ["bad", "awful", "boring", "dull", "poor", "tedious"]
NEUTRAL = ["the", "a", "movie", "film", "is", "was", "very", "plot", "acting", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_backbone(folder: Path, layers: int = 3, seed: int = 0) -> Path:
    """Save a tiny random BERT and its word-level tokenizer into ``folder`` (a local 'hub name')."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(NEUTRAL, 3) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, n: int, seed: int = 0, label_words: bool = False) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for text, label in sentences(n, seed):
            writer.writerow([text, ("positive" if label else "negative") if label_words else label])
    return path
