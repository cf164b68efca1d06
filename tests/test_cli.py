"""The command line end to end on a tiny offline backbone: train -> evaluate -> benchmark, configs, errors."""

from __future__ import annotations

import json

import pytest

from layerexit.cli.main import main
from tiny_text import write_backbone, write_csv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_backbone(root / "backbone", layers=3)
    data = root / "data"
    data.mkdir()
    write_csv(data / "train.csv", 128, seed=1, label_words=True)
    write_csv(data / "validation.csv", 48, seed=2, label_words=True)
    write_csv(data / "test.csv", 64, seed=3, label_words=True)
    return root


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace / "run"
    code = main(["train", "--model", str(workspace / "backbone"), "--data", str(workspace / "data"),
                 "--epochs", "2", "--batch-size", "16", "--learning-rate", "2e-3", "--max-length", "16",
                 "--output", str(out)])
    assert code == 0
    return out


def test_train_writes_checkpoints(trained):
    config = json.loads((trained / "best" / "config.json").read_text())
    assert config["model_type"] == "layerexit" and not (trained / "best" / "layerexit_config.json").exists()
    assert config["id2label"] == {"0": "negative", "1": "positive"}  # text labels numbered in sorted order
    assert config["num_layers"] == 3
    assert (trained / "best" / "tokenizer.json").is_file()
    assert list((trained / "state").glob("step-*/progress.json")) and (trained / "run_config.json").is_file()


def test_evaluate_writes_results_contract(trained, workspace, capsys):
    out = workspace / "eval"
    code = main(["evaluate", "--model", str(trained / "best"), "--data", str(workspace / "data"),
                 "--output", str(out), "--batch-sizes", "1,8", "--measure-rules", "maxprob,patience",
                 "--measure-examples", "16", "--rounds", "1", "--tolerance", "0.05"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("model", "dataset", "split", "num_layers", "num_examples", "full", "per_layer_accuracy",
                "oracles", "curves", "measured"):
        assert key in results
    assert results["num_examples"] == 64 and len(results["per_layer_accuracy"]) == 3
    provenance = results["provenance"]  # how the model was trained and evaluated, in the results themselves
    assert provenance["options"]["tolerance"] == 0.05 and provenance["options"]["rounds"] == 1
    settings = provenance["training"]["settings"]  # the checkpoint's effective training configuration
    assert settings["epochs"] == 2 and settings["batch_size"] == 16 and settings["learning_rate"] == 2e-3
    assert set(provenance["versions"]) == {"layerexit", "torch", "transformers"}
    assert set(results["oracles"]) == {"gold", "agreement"}
    assert results["oracles"]["agreement"]["accuracy"] == pytest.approx(results["full"]["accuracy"])
    assert {"maxprob", "margin", "entropy", "patience", "patience-confidence", "static"} <= set(results["curves"])
    for point in results["curves"]["maxprob"]:
        assert set(point) == {"params", "accuracy", "avg_layers", "saved_layers"}
        assert point["saved_layers"] == pytest.approx(1 - point["avg_layers"] / 3)
    measured = results["measured"]
    assert {m["batch_size"] for m in measured} <= {1, 8} and measured
    for m in measured:
        assert m["speedup_ideal"] == pytest.approx(3 / m["avg_layers"])
        assert m["matches_simulation"] > 0.9
    assert (out / "report.md").is_file() and (out / "tradeoff.png").is_file()
    assert "maxprob" in capsys.readouterr().out


def test_benchmark_cli(trained, workspace, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["benchmark", "--model", str(trained / "best"), "--data", str(workspace / "data"),
                 "--rule", "maxprob", "--param", "threshold=0.8", "--batch-sizes", "1,4", "--examples", "8",
                 "--rounds", "1", "--output", str(out)])
    assert code == 0
    entries = json.loads(out.read_text())["measured"]
    assert [e["batch_size"] for e in entries] == [1, 4]
    assert all(e["params"] == {"threshold": 0.8} and e["seconds_plain"] > 0 for e in entries)


def test_yaml_config_with_override(trained, workspace, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {trained / 'best'}\ndata: {workspace / 'data'}\nrules: maxprob\n"
                      f"measure-rules: ''\noutput: {tmp_path / 'from-yaml'}\nlimit: 10\n")
    code = main(["evaluate", "--config", str(config), "--limit", "20", "--output", str(tmp_path / "flag")])
    assert code == 0
    results = json.loads((tmp_path / "flag" / "results.json").read_text())
    assert results["num_examples"] == 20 and list(results["curves"]) == ["maxprob"] and results["measured"] == []
    assert not (tmp_path / "from-yaml").exists()


def test_yaml_unknown_keys_reported_together(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("epochz: 3\nlearning_rat: 1e-4\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "learning_rat" in err and "--config" in err


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--model", "/no/such/checkpoint"], "checkpoint"),
    (["train", "--data", "/no/such/file.csv"], "data"),
    (["benchmark", "--model", "MODEL", "--param", "threshold"], "--param"),
])
def test_bad_input_gives_one_clear_line(argv, expected, trained, capsys):
    argv = [str(trained / "best") if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expected in err and "Traceback" not in err


def test_missing_column_and_wrong_labels(trained, workspace, tmp_path, capsys):
    wrong = tmp_path / "three.csv"
    wrong.write_text("text,label\ngood film,a\nbad film,b\nthe plot,c\n")
    assert main(["evaluate", "--model", str(trained / "best"), "--data", str(wrong), "--output",
                 str(tmp_path / "x")]) == 2
    assert "labels" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(trained / "best"), "--data", str(workspace / "data"),
                 "--label-column", "stars", "--output", str(tmp_path / "y")]) == 2
    assert "label_column='stars'" in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("bert", "roberta", "albert", "distilbert", "mpnet", "maxprob", "patience", "oracle-gold",
                 "weighted", "two-stage", "rotten-tomatoes"):
        assert name in out
    for command in ("train", "evaluate", "benchmark", "demo", "list"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example" in capsys.readouterr().out


def test_train_consistentee_then_evaluate_its_policy(trained, workspace, tmp_path):
    out = tmp_path / "cee"
    code = main(["train", "--method", "consistentee", "--stage1", str(trained), "--model", str(workspace / "backbone"),
                 "--data", str(workspace / "data"), "--copies", "4", "--stage2-epochs", "1", "--stage3-epochs", "1",
                 "--batch-size", "16", "--max-length", "16", "--alpha", "0.5", "--output", str(out)])
    assert code == 0 and (out / "final" / "consistentee.json").is_file()
    assert json.loads((out / "final" / "consistentee.json").read_text())["alpha"] == 0.5
    second = tmp_path / "cee2"
    assert main(["train", "--method", "consistentee", "--stage1", str(trained), "--model", str(workspace / "backbone"),
                 "--data", str(workspace / "data"), "--copies", "4", "--stage2-epochs", "1", "--stage3-epochs", "0",
                 "--max-length", "16", "--alpha", "2", "--output", str(second)]) == 0
    code = main(["evaluate", "--model", str(out / "final"), "--data", str(workspace / "data"), "--output",
                 str(tmp_path / "eval"), "--measure-rules", "consistentee", "--batch-sizes", "4",
                 "--measure-examples", "8", "--rounds", "1", "--tolerance", "0.5",
                 "--consistentee-runs", f"{second / 'final'},{out / 'final'}"])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "consistentee-threshold" in results["curves"] and "maxprob" in results["curves"]
    assert [m["rule"] for m in results["measured"]] == ["consistentee"]
    assert [p["params"]["alpha"] for p in results["curves"]["consistentee"]] == [0.5, 2.0]
    assert "consistentee" in (tmp_path / "eval" / "report.md").read_text()
