"""layerexit.pipeline, transformers.pipeline("text-classification") on a layerexit checkpoint, `layerexit predict`,
and the shared --device/--dtype options."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import layerexit
from layerexit.cli.common import device_and_dtype, load_checkpoint
from layerexit.cli.main import build_parser, main
from layerexit.errors import LayerExitError
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from layerexit.rules.fitting import save_rules
from tiny import make_model
from tiny_text import write_backbone

TEXTS = ["a good and lovely film", "the plot was dull", "", "superb acting and a great movie", "boring tedious", "fun"]
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_backbone(root / "encoder", layers=3)  # for its word-level tokenizer (ids < 100, the tiny model's vocabulary)
    model = make_model("bert", "mean", double=False)  # 4 layers, exits spread so that rules exit at different layers
    model.config.label_names = LABELS
    tokenizer = AutoTokenizer.from_pretrained(root / "encoder")
    model.save_pretrained(root / "ckpt", tokenizer=tokenizer, exit_rule=make_rule("maxprob", threshold=0.75))
    model.save_pretrained(root / "plain", tokenizer=tokenizer)  # no stored rule
    return root


def _engine(folder, rule, texts=TEXTS):
    """What the engine itself answers, for comparison."""
    model = MultiExitModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    out = model.early_exit(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], rule=rule)
    probs = out.logits.softmax(-1)
    return [{"label": model.config.label_names[int(i)], "score": float(s), "exit_layer": int(e)}
            for s, i, e in zip(*probs.max(-1), out.exit_layer)]


def _close(a: list[dict], b: list[dict]) -> None:
    assert [(x["label"], x.get("exit_layer")) for x in a] == [(y["label"], y.get("exit_layer")) for y in b]
    assert all(abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(a, b))


def test_pipeline_answers_label_score_and_exit_layer(ckpt):
    classify = layerexit.pipeline(str(ckpt / "ckpt"))
    assert classify.rule.name == "maxprob" and classify.rule.params == {"threshold": 0.75}  # the stored rule
    results = classify(TEXTS, batch_size=4)  # sorted by length into batches of 4 and 2; answers in input order
    _close(results, _engine(ckpt / "ckpt", make_rule("maxprob", threshold=0.75)))
    assert {r["label"] for r in results} <= set(LABELS) and len({r["label"] for r in results}) >= 2
    assert all(1 / 3 <= r["score"] <= 1 and 1 <= r["exit_layer"] <= 4 for r in results)
    assert len({r["exit_layer"] for r in results}) >= 2  # rows really leave at different layers
    assert len({r["exit_layer"] for r in layerexit.pipeline(str(ckpt / "ckpt"), "static", layer=2)(TEXTS)}) == 1
    one = classify("superb acting and a great movie")
    assert isinstance(one, list) and len(one) == 1
    _close(one, results[3:4])


def test_rule_choice(ckpt, tmp_path):
    assert layerexit.pipeline(str(ckpt / "plain")).rule.params == {"threshold": 0.9}  # maxprob's own default
    assert layerexit.pipeline(str(ckpt / "ckpt"), "patience", patience=1).rule.params == {"patience": 1}
    rule = make_rule("entropy", threshold=0.2)
    assert layerexit.pipeline(str(ckpt / "ckpt"), rule).rule is rule
    save_rules(tmp_path / "cal" / "rules.json", {"maxprob": make_rule("maxprob", threshold=0.6)})
    assert layerexit.pipeline(str(ckpt / "ckpt"), "maxprob", calibration=tmp_path / "cal").rule.params == \
        {"threshold": 0.6}
    with pytest.raises(LayerExitError, match=r"^rule='pcee' is invalid: .*holds the fitted rules \['maxprob'\]"):
        layerexit.pipeline(str(ckpt / "ckpt"), calibration=tmp_path / "cal")
    with pytest.raises(LayerExitError, match=r"^rule parameters=.*name the rule they belong to"):
        layerexit.pipeline(str(ckpt / "ckpt"), threshold=0.5)


def test_pipeline_on_a_loaded_model_and_in_bf16(ckpt):
    model = MultiExitModel.from_pretrained(ckpt / "ckpt")
    with pytest.raises(LayerExitError, match=r"^tokenizer=None is invalid: a loaded model needs its tokenizer"):
        layerexit.pipeline(model)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "ckpt")
    assert len(layerexit.pipeline(model, "full", tokenizer=tokenizer)(TEXTS)) == len(TEXTS)
    bf16 = layerexit.pipeline(str(ckpt / "ckpt"), "full", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    assert [r["exit_layer"] for r in bf16(TEXTS)] == [4] * len(TEXTS)


@pytest.mark.parametrize("texts, pattern", [([], r"^texts=\[\] is invalid: pass a string or a non-empty list"),
                                            (["ok", 3], r"^texts='items \[1\] are not strings'"),
                                            (None, r"^texts=None is invalid")])
def test_pipeline_refuses_bad_texts(ckpt, texts, pattern):
    with pytest.raises(LayerExitError, match=pattern):
        layerexit.pipeline(str(ckpt / "ckpt"))(texts)


def test_pipeline_refuses_a_bad_batch_size(ckpt):
    with pytest.raises(LayerExitError, match=r"^batch_size=0 is invalid"):
        layerexit.pipeline(str(ckpt / "ckpt"), batch_size=0)


def test_transformers_text_classification_pipeline(ckpt):
    hf = transformers.pipeline("text-classification", model=str(ckpt / "ckpt"))
    assert type(hf.model).__name__ == "LayerExitForSequenceClassification"
    results = [hf(text)[0] for text in TEXTS]  # one at a time, as the standard pipeline batches
    _close(results, [{k: v for k, v in r.items() if k != "exit_layer"}
                     for r in _engine(ckpt / "ckpt", make_rule("maxprob", threshold=0.75))])


# --- layerexit predict --------------------------------------------------------------------------------------

def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_predict_texts_on_the_command_line(ckpt, capsys):
    assert main(["predict", "--model", str(ckpt / "ckpt"), *TEXTS[:2], "--device", "cpu"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["text"] for r in rows] == TEXTS[:2]
    _close(rows, _engine(ckpt / "ckpt", make_rule("maxprob", threshold=0.75), TEXTS[:2]))


def test_predict_a_file_with_a_bom_into_an_output_file(ckpt, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8-sig")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(ckpt / "ckpt"), "--file", str(tmp_path / "in.txt"), "--rule", "maxprob",
                 "--param", "threshold=0.6", "--batch-size", "2", "--output", str(out), "--dtype", "float32"]) == 0
    rows = _lines(out.read_text())
    assert [r["text"] for r in rows] == TEXTS  # line i answers line i; the BOM is not part of the first text
    _close(rows, _engine(ckpt / "ckpt", make_rule("maxprob", threshold=0.6)))


def test_predict_reads_standard_input(ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a great film\nboring\n"))
    assert main(["predict", "--model", str(ckpt / "ckpt"), "--file", "-", "--rule", "full"]) == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["a great film", "boring"] and {r["exit_layer"] for r in rows} == {4}


@pytest.mark.parametrize("extra, pattern", [
    (["a text", "--file", "x.txt"], r"texts/--file=.* give texts on the command line or --file"),
    ([], r"texts/--file=.* give texts on the command line or --file"),
    (["--file", "/no/such/file.txt"], r"--file='/no/such/file.txt' is invalid: give an existing text file"),
    (["a text", "--batch-size", "0"], r"--batch-size=0 is invalid"),
    (["a text", "--device", "tpu:9"], r"--device='tpu:9' is invalid"),
])
def test_predict_refuses_bad_options(ckpt, capsys, extra, pattern):
    assert main(["predict", "--model", str(ckpt / "ckpt"), *extra]) == 2
    assert pytest.importorskip("re").search(pattern, capsys.readouterr().err)


# --- --device / --dtype --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "benchmark", "calibrate", "generate", "predict"])
def test_every_model_command_has_device_and_dtype(command):
    options = {o for a in build_parser().subparsers[command]._actions for o in a.option_strings}
    assert {"--device", "--dtype"} <= options


def test_device_and_dtype_resolution(ckpt):
    assert device_and_dtype(argparse.Namespace(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)
    assert device_and_dtype(argparse.Namespace()) == (
        torch.device("cuda" if torch.cuda.is_available() else "cpu"), None)
    if not torch.cuda.is_available():
        with pytest.raises(LayerExitError, match=r"^--device='cuda' is invalid: no cuda device is available here"):
            device_and_dtype(argparse.Namespace(device="cuda", dtype="auto"))
    model, _ = load_checkpoint(argparse.Namespace(model=str(ckpt / "ckpt"), device="cpu", dtype="float16"))
    assert model.dtype == torch.float16


def test_benchmark_runs_in_bf16_on_the_chosen_device(ckpt, tmp_path, capsys):
    """The shared options reach the model: benchmark loads it in bf16 on the CPU and times it end to end."""
    rows = [f"{text},{LABELS[i % 3]}" for i, text in enumerate(TEXTS * 2) if text]
    (tmp_path / "test.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--model", str(ckpt / "ckpt"), "--data", str(tmp_path / "test.csv"), "--split", "test",
                 "--param", "threshold=0.8", "--batch-sizes", "4", "--examples", "8", "--rounds", "1",
                 "--device", "cpu", "--dtype", "bfloat16", "--output", str(out)]) == 0, capsys.readouterr().err
    entry = json.loads(out.read_text())["measured"][0]
    assert entry["num_examples"] == 8 and 1 <= entry["avg_layers"] <= 4
