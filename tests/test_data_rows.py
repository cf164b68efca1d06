"""Rows that cannot become classes: empty, NaN or missing labels and texts are refused by row number (or skipped
when asked, and counted); one label is not a classifier; --limit is checked; files with a byte-order mark,
other encodings or broken JSON lines; hub data sets with a subset (``datasets.load_dataset`` mocked: no
network); rules refuse evaluation rows they were fitted on, row by row."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from layerexit.data import load_data
from layerexit.errors import LayerExitError
from layerexit.evaluation.cache import LogitCache
from layerexit.rules import PCEE
from layerexit.rules.fitting import check_held_out, rule_from_dict, rule_to_dict


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


@pytest.mark.parametrize("name, content, rows", [
    ("empty-label.csv", "text,label\ngood,1\nbad,\nfun,1\nawful,0\n", "line 3"),
    ("nan-label.csv", "text,label\ngood,1\nbad,NaN\nfun,1\nawful,0\n", "line 3"),
    ("short-row.csv", "text,label\ngood,1\nbad\nfun,1\nawful,0\n", "line 3"),
    ("empty-text.csv", "text,label\ngood,1\n  ,0\nfun,1\nawful,0\n", "line 3"),
    ("null-text.jsonl", '{"text": "good", "label": 1}\n{"text": null, "label": 0}\n{"text": "bad", "label": 0}\n',
     "line 2"),
    ("missing-label.jsonl", '{"text": "good", "label": 1}\n{"text": "so so"}\n{"text": "bad", "label": 0}\n',
     "line 2"),
    ("nan-label.jsonl", '{"text": "good", "label": 1}\n{"text": "so so", "label": NaN}\n{"text": "b", "label": 0}\n',
     "line 2"),
    ("tsv-empty.tsv", "sentence\tlabel\ngood\t1\nbad\t\nfun\t0\n", "line 3"),
])
def test_rows_without_text_or_label_are_refused_by_line(tmp_path, name, content, rows):
    path = _write(tmp_path / name, content)
    with pytest.raises(LayerExitError, match="1 row") as err:
        load_data(path)
    message = str(err.value)
    assert rows in message and path in message and "--skip-bad-rows" in message
    data = load_data(path, skip_bad_rows=True)  # only when asked: skipped and counted
    assert data.info["skipped_rows"] == 1 and data.info["skipped"] == [rows]
    assert len(data) == content.count("\n") - (0 if name.endswith(".jsonl") else 1) - 1
    assert set(data.label_names) <= {"0", "1"} and "None" not in data.texts and "" not in data.texts


def test_many_bad_rows_are_listed_briefly(tmp_path):
    rows = "".join(f"t{i},\n" for i in range(30))
    with pytest.raises(LayerExitError, match=r"30 row\(s\).*line 3, line 4.*line 12 and 20 more"):
        load_data(_write(tmp_path / "d.csv", "text,label\ngood,1\n" + rows + "bad,0\n"))


def test_limit_counts_usable_rows_and_bad_rows_past_it_do_not_matter(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\ngood,1\nbad,0\nfun,1\nbroken,\n")
    assert len(load_data(path, limit=3)) == 3
    data = load_data(path, limit=3, skip_bad_rows=True)
    assert data.texts == ["good", "bad", "fun"] and data.info["skipped_rows"] == 0


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_limit_must_be_a_positive_whole_number(tmp_path, limit):
    path = _write(tmp_path / "d.csv", "text,label\ngood,1\nbad,0\n")
    with pytest.raises(LayerExitError, match=r"limit=.* is invalid: use a whole number >= 1"):
        load_data(path, limit=limit)


def test_one_label_is_not_a_classifier(tmp_path):
    path = _write(tmp_path / "ones.csv", "text,label\ngood,1\nfun,1\ngreat,1\n")
    with pytest.raises(LayerExitError, match=r"labels=\['1'\] is invalid: a classifier needs at least two"):
        load_data(path)
    with pytest.raises(LayerExitError, match=r"at least two"):  # a limit that keeps one class is caught too
        load_data(_write(tmp_path / "sorted.csv", "text,label\ngood,1\nfun,1\nbad,0\n"), limit=2)
    # with the model's label names (an evaluation split), one class present is allowed
    assert load_data(path, label_names=["0", "1"]).labels == [1, 1, 1]


def test_excel_utf8_with_byte_order_mark(tmp_path):
    path = _write(tmp_path / "excel.csv", "text,label\ncafé,1\nbad,0\n", encoding="utf-8-sig")
    data = load_data(path)
    assert data.texts == ["café", "bad"] and data.info["text_column"] == "text"
    path = _write(tmp_path / "excel.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n',
                  encoding="utf-8-sig")
    assert load_data(path).texts == ["good", "bad"]


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = _write(tmp_path / "latin.csv", "text,label\ngood,1\ncaf\xe9,0\n", encoding="latin-1")
    with pytest.raises(LayerExitError, match=r"latin\.csv.*line 3 is not UTF-8.*save the file as UTF-8"):
        load_data(path)


def test_broken_json_line_names_the_file_and_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0\n')
    with pytest.raises(LayerExitError, match=r"d\.jsonl.*line 3: invalid JSON"):
        load_data(path)
    path = _write(tmp_path / "list.jsonl", '{"text": "good", "label": 1}\n[1, 2]\n')
    with pytest.raises(LayerExitError, match=r"line 2 holds list, not a JSON object"):
        load_data(path)


def test_json_array_file(tmp_path):
    path = _write(tmp_path / "d.json", json.dumps([{"text": "good", "label": 1}, {"text": "bad", "label": 0}]))
    assert load_data(path).labels == [1, 0]


# --- hub data sets with a subset: datasets.load_dataset mocked, never the network --------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    table = {("glue", "sst2"): [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}],
             ("nyu-mll/glue", "sst2"): [{"sentence": "fine", "label": 1}, {"sentence": "dull", "label": 0}],
             ("stanfordnlp/imdb", None): [{"text": "great", "label": 1}, {"text": "awful", "label": 0}]}

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if (path, name) not in table:
            raise FileNotFoundError(f"Dataset '{path}' (config {name}) doesn't exist on the Hub")
        return table[path, name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_subset_in_the_name(fake_hub):
    data = load_data("glue/sst2", "validation")
    assert data.texts == ["good", "bad"] and fake_hub[-1] == ("glue", "sst2", "validation")


def test_hub_subset_as_an_option_and_owner_names(fake_hub):
    assert load_data("glue", "train", subset="sst2").texts == ["good", "bad"]
    assert load_data("nyu-mll/glue/sst2", "train").texts == ["fine", "dull"]
    assert load_data("stanfordnlp/imdb", "test").texts == ["great", "awful"]
    assert fake_hub[-1] == ("stanfordnlp/imdb", None, "test")


def test_hub_failure_names_the_data_set_and_the_subset_option(fake_hub):
    with pytest.raises(LayerExitError, match=r"data='glue/nosuch \(train\)'.*--data-config"):
        load_data("glue/nosuch", "train")


def test_cli_data_config_reaches_the_hub(fake_hub):
    from layerexit.cli.common import data_from
    from layerexit.cli.main import build_parser

    parser = build_parser().subparsers["train"]
    args = parser.parse_args(["--data", "glue", "--data-config", "sst2", "--split", "validation"])
    assert data_from(args).texts == ["good", "bad"] and fake_hub[-1] == ("glue", "sst2", "validation")


# --- fitted rules and evaluation rows, compared row by row -------------------------------------------------


def _cache(rows: list[str], split: str, seed: int = 0) -> LogitCache:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (len(rows),), generator=gen)
    logits = torch.randn(3, len(rows), 2, generator=gen, dtype=torch.float64)  # (L, N, C)
    logits[:, torch.arange(len(rows)), labels] += torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64)[:, None]
    return LogitCache(logits, labels, split=split, data_id=f"digest-of-{split}-{len(rows)}", row_ids=rows)


def test_evaluation_on_most_of_the_fitting_rows_is_refused_row_by_row():
    fitting = [f"{i:016x}" for i in range(64)]
    rule = PCEE(target=0.8).fit(_cache(fitting, "dev"))
    with pytest.raises(LayerExitError, match=r"60 of the 60 evaluated rows .* are rows it was fitted on"):
        check_held_out(rule, _cache(fitting[:60], "test", seed=1))
    reloaded = rule_from_dict(json.loads(json.dumps(rule_to_dict(rule))))  # the digests survive rules.json
    with pytest.raises(LayerExitError, match=r"compared row by row"):
        check_held_out(reloaded, _cache(fitting[4:], "holdout", seed=2))
    fresh = [f"{i:016x}" for i in range(1000, 1300)]
    check_held_out(rule, _cache(fresh, "test", seed=3))  # disjoint rows: fine
    with warnings.catch_warnings(record=True) as caught:  # one shared sentence in 300: reported, not refused
        warnings.simplefilter("always")
        check_held_out(rule, _cache(fresh[:-1] + fitting[:1], "test", seed=4))
    assert any("1 of the 300 evaluated rows" in str(w.message) for w in caught)


def test_rules_saved_before_row_digests_still_load_and_check():
    rule = PCEE(target=0.8).fit(_cache([f"{i:016x}" for i in range(64)], "dev"))
    saved = rule_to_dict(rule)
    del saved["fitted"]["fit_row_ids_"]
    old = rule_from_dict(saved)
    check_held_out(old, _cache([f"{i:016x}" for i in range(10)], "test"))
