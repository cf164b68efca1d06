"""Local CSV/TSV/JSONL data, label encoding, sentence pairs and the label check against a model's head."""

from __future__ import annotations

import json

import pytest
from transformers import BertTokenizerFast

from layerexit.data import Encoded, TextClassificationData, check_labels, load_data
from layerexit.errors import LayerExitError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "is", "was", "good", "bad", "not",
         "it", "plot", "fun", "dull", "?", "yes", "no"]


@pytest.fixture
def tokenizer(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_with_string_labels_in_sorted_order(tmp_path):
    path = _write(tmp_path / "d.csv", 'text,label\n"good, fun",pos\nbad,neg\ndull,neutral\nfun,pos\n')
    data = load_data(path)
    assert data.texts == ["good, fun", "bad", "dull", "fun"]  # quoted commas stay in the text
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.labels == [2, 0, 1, 2]
    assert data.pairs is None and data.num_labels == 3 and len(data) == 4
    assert data.info["text_column"] == "text"


def test_label_names_fix_the_order(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\ngood,pos\nbad,neg\n")
    data = load_data(path, label_names=["pos", "neg"])
    assert data.labels == [0, 1] and data.label_names == ["pos", "neg"]
    with pytest.raises(LayerExitError, match=r"label_names=.*\['neg'\]"):
        load_data(path, label_names=["pos", "other"])


def test_numeric_labels_are_used_as_they_are(tmp_path):
    path = _write(tmp_path / "d.csv", "sentence,label\na,2\nb,0\nc,1\n")
    data = load_data(path)
    assert data.labels == [2, 0, 1] and data.label_names == ["0", "1", "2"]


def test_tsv_glue_style_with_quotes_as_text(tmp_path):
    path = _write(tmp_path / "d.tsv", 'sentence\tlabel\nit was "good\t1\nit was bad\t0\n')
    data = load_data(path)
    assert data.texts == ['it was "good', "it was bad"]
    assert data.labels == [1, 0]


def test_jsonl_with_pair_columns_detected(tmp_path):
    lines = [{"sentence1": "the movie", "sentence2": "it was good", "label": "yes"},
             {"sentence1": "the plot", "sentence2": "not fun", "label": "no"}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_data(path)
    assert data.texts == ["the movie", "the plot"] and data.pairs == ["it was good", "not fun"]
    assert data.label_names == ["no", "yes"] and data.labels == [1, 0]
    assert data.info["text_pair_column"] == "sentence2"


def test_explicit_columns_and_limit(tmp_path):
    path = _write(tmp_path / "d.csv", "a,b,y\nx1,p1,0\nx2,p2,1\nx3,p3,1\n")
    data = load_data(path, text_column="a", text_pair_column="b", label_column="y", limit=2)
    assert data.texts == ["x1", "x2"] and data.pairs == ["p1", "p2"] and data.labels == [0, 1]
    assert data.head(1).texts == ["x1"] and data.head(1).pairs == ["p1"] and data.head(None) is data


def test_folder_reads_the_split_file(tmp_path):
    _write(tmp_path / "train.csv", "text,label\ngood,1\nbad,0\n")
    _write(tmp_path / "validation.jsonl", json.dumps({"text": "fun", "label": 1}) + "\n"
           + json.dumps({"text": "dull", "label": 0}) + "\n")
    assert load_data(str(tmp_path), split="train").texts == ["good", "bad"]
    validation = load_data(str(tmp_path), split="validation")
    assert validation.texts == ["fun", "dull"] and validation.split == "validation"
    with pytest.raises(LayerExitError, match=r"split='test' is invalid.*train\.csv"):
        load_data(str(tmp_path), split="test")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"text_column": "review"}, r"text_column='review' is invalid.*\['text', 'label', 'other'\]"),
        ({"label_column": "sentiment"}, r"label_column='sentiment' is invalid"),
        ({"text_pair_column": "second"}, r"text_pair_column='second' is invalid"),
    ],
)
def test_missing_column_names_the_parameter(tmp_path, kwargs, match):
    path = _write(tmp_path / "d.csv", "text,label,other\ngood,1,x\nbad,0,y\n")
    with pytest.raises(LayerExitError, match=match):
        load_data(path, **kwargs)


def test_no_text_column_found(tmp_path):
    path = _write(tmp_path / "d.csv", "review,label\ngood,1\nbad,0\n")
    with pytest.raises(LayerExitError, match=r"text_column=None is invalid.*review"):
        load_data(path)


@pytest.mark.parametrize("name,content", [("e.csv", ""), ("h.csv", "text,label\n"), ("e.jsonl", "\n\n"),
                                          ("h.tsv", "sentence\tlabel\n")])
def test_empty_file_raises(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(LayerExitError, match=r"data=.*is invalid: the data set is empty"):
        load_data(path)


def test_single_label_and_negative_labels_raise(tmp_path):
    with pytest.raises(LayerExitError, match=r"labels=.*at least two"):
        load_data(_write(tmp_path / "one.csv", "text,label\na,pos\nb,pos\n"))
    with pytest.raises(LayerExitError, match=r"labels=\[-1, 0\]"):
        load_data(_write(tmp_path / "neg.csv", "text,label\na,-1\nb,0\n"))


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(LayerExitError, match=r"data=.*missing\.csv.*no such file"):
        load_data(str(tmp_path / "missing.csv"))
    with pytest.raises(LayerExitError, match=r"data=.*no such file"):
        load_data(str(tmp_path / "missing_folder"))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.txt").write_text("text,label\na,0\n")
    with pytest.raises(LayerExitError, match=r"data=.*d\.txt.*\.csv, \.tsv or \.jsonl"):
        load_data(str(tmp_path / "d.txt"))


def test_sentence_pairs_are_encoded_with_token_type_ids(tmp_path, tokenizer):
    path = _write(tmp_path / "d.csv", "question,sentence,label\nis it good ?,it was good,yes\n"
                                      "is it fun ?,the plot was dull and not fun at all,no\n")
    data = load_data(path)
    assert data.pairs is not None
    encoded = Encoded(data, tokenizer, max_length=32)
    assert len(encoded) == 2 and encoded[0]["labels"] == 1
    first = encoded[0]
    ids, types = first["input_ids"], first["token_type_ids"]
    sep = tokenizer.sep_token_id
    assert ids[0] == tokenizer.cls_token_id and ids.count(sep) == 2
    boundary = ids.index(sep) + 1  # second segment starts after the first [SEP]
    assert set(types[:boundary]) == {0} and set(types[boundary:]) == {1}
    assert tokenizer.convert_ids_to_tokens(ids[1:boundary - 1]) == ["is", "it", "good", "?"]

    batch = encoded.collate([encoded[0], encoded[1]])
    assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].tolist() == [1, 0]
    n0, n1 = len(encoded[0]["input_ids"]), len(encoded[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 < n1
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)  # right padding
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()


def test_single_texts_truncate_to_max_length(tmp_path, tokenizer):
    data = TextClassificationData(["the movie was good " * 10, "bad"], [1, 0], ["neg", "pos"])
    encoded = Encoded(data, tokenizer, max_length=8)
    assert len(encoded[0]["input_ids"]) == 8 and encoded[0]["input_ids"][-1] == tokenizer.sep_token_id
    assert set(encoded[0]["token_type_ids"]) == {0}


def test_check_labels_refuses_labels_that_do_not_fit_the_head():
    three = TextClassificationData(["a", "b", "c"], [0, 1, 2], ["neg", "neutral", "pos"])
    with pytest.raises(LayerExitError, match=r"labels=\['neg', 'neutral', 'pos'\].*2 classes"):
        check_labels(three, 2, ["neg", "pos"])
    check_labels(three, 3, ["neg", "neutral", "pos"])  # fits: no error


def test_check_labels_refuses_a_different_label_order():
    data = TextClassificationData(["a", "b"], [0, 1], ["neg", "pos"])
    with pytest.raises(LayerExitError, match=r"labels=.*trained with labels \['pos', 'neg'\]"):
        check_labels(data, 2, ["pos", "neg"])
    numeric = TextClassificationData(["a", "b"], [0, 1], ["0", "1"])
    check_labels(numeric, 2, ["neg", "pos"])  # numbered labels are taken as the model's own indices


def test_check_labels_refuses_numeric_labels_past_the_head():
    data = TextClassificationData(["a", "b"], [0, 3], ["0", "1", "2", "3"])
    with pytest.raises(LayerExitError, match=r"labels="):
        check_labels(data, 2)
