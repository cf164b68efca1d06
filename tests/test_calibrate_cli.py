"""`layerexit calibrate` and `layerexit evaluate --calibration/--target-accuracy/--budget` on a tiny offline model."""

from __future__ import annotations

import json

import pytest

from layerexit.cli.main import main
from layerexit.rules import PCEE, Budget
from layerexit.rules.fitting import load_rules
from tiny_text import write_backbone, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    write_backbone(root / "backbone", layers=3)
    data = root / "data"
    data.mkdir()
    write_csv(data / "train.csv", 128, seed=1)
    write_csv(data / "validation.csv", 96, seed=2)
    write_csv(data / "test.csv", 64, seed=3)
    code = main(["train", "--model", str(root / "backbone"), "--data", str(data), "--epochs", "1",
                 "--batch-size", "16", "--learning-rate", "2e-3", "--max-length", "16", "--output", str(root / "run")])
    assert code == 0
    return root


def test_calibrate_writes_rules_diagrams_and_ece(trained, capsys):
    out = trained / "cal"
    code = main(["calibrate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--split", "validation", "--budget", "0.7", "--num-bins", "5", "--output", str(out)])
    assert code == 0
    rules = load_rules(out / "rules.json")
    assert set(rules) == {"pcee", "pcee-ws", "maxprob-ts", "budget"}
    assert isinstance(rules["pcee"], PCEE) and rules["pcee"].fit_split_ == "validation"
    assert rules["pcee"].table_.shape == (2, 5)  # 3 layers: exits 1 and 2 have tables, the last always answers
    assert isinstance(rules["budget"], Budget) and rules["budget"].fit_cost_ <= 0.7
    table = json.loads((out / "calibration.json").read_text())["exits"]
    assert [row["exit"] for row in table] == [1, 2, 3]
    assert all(0 <= row["ece"] <= 1 and row["temperature"] > 0 for row in table)
    assert (out / "reliability.png").is_file() and (out / "reliability" / "exit_3.png").is_file()
    assert (out / "fit_logits.pt").is_file()
    assert "ECE" in capsys.readouterr().out


def test_calibrate_fits_on_the_backend_that_serves_and_evaluate_warns_on_another(trained, capsys):
    import torch

    from layerexit.evaluation.cache import LogitCache

    common = ["--model", str(trained / "run" / "best"), "--data", str(trained / "data"), "--split", "validation",
              "--num-bins", "5"]
    assert main(["calibrate", *common, "--output", str(trained / "cal-eager")]) == 0
    assert main(["calibrate", *common, "--backend", "int8", "--output", str(trained / "cal-int8")]) == 0
    saved = json.loads((trained / "cal-int8" / "rules.json").read_text())
    assert saved["backend"] == "int8"
    assert json.loads((trained / "cal-int8" / "calibration.json").read_text())["backend"] == "int8"
    int8 = LogitCache.load(trained / "cal-int8" / "fit_logits.pt").logits
    eager = LogitCache.load(trained / "cal-eager" / "fit_logits.pt").logits
    assert int8.shape == eager.shape and not torch.equal(int8, eager)  # fitted on int8's own logits
    with pytest.warns(UserWarning, match=r"fitted with backend 'int8' but the model runs backend 'eager'.*"
                      r"layerexit calibrate --backend eager"):
        code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                     "--rules", "maxprob", "--measure-rules", "", "--batch-sizes", "1", "--measure-examples", "4",
                     "--rounds", "1", "--calibration", str(trained / "cal-int8"), "--target-accuracy", "0.8",
                     "--output", str(trained / "eval-mismatch")])
    assert code == 0
    capsys.readouterr()


def test_calibrate_refuses_the_test_split(trained, capsys):
    code = main(["calibrate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--split", "test", "--output", str(trained / "bad")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--split='test' is invalid" in err and "validation" in err and "Traceback" not in err


def test_evaluate_with_calibration_reports_control(trained, capsys):
    cal = trained / "cal-eval"
    assert main(["calibrate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--split", "validation", "--output", str(cal)]) == 0
    out = trained / "eval"
    code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--rules", "maxprob", "--measure-rules", "", "--batch-sizes", "1,8", "--measure-examples", "16",
                 "--rounds", "1", "--calibration", str(cal), "--target-accuracy", "0.83", "--budget", "0.6",
                 "--output", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    control = results["controllability"]
    assert control["fit_split"] == "validation" and control["eval_split"] == "test"
    assert {"pcee", "pcee-ws"} <= set(results["curves"]) and "maxprob" in results["curves"]
    assert set(control["asked_target"]) == {"pcee", "pcee-ws", "maxprob", "maxprob-ts"}
    assert control["asked_target"]["pcee"]["target"] == 0.83
    assert control["asked_budget"]["layers"]["asked"] == 0.6
    assert [m["batch_size"] for m in control["measured"]] == [1, 1, 8, 8]
    assert all(m["matches_simulation"] == 1.0 for m in control["measured"])
    assert (out / "controllability.png").is_file() and (out / "budgets.png").is_file()
    assert "accuracy control" in capsys.readouterr().out


def test_evaluate_refuses_fitting_on_the_evaluation_split(trained, capsys):
    code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--rules", "maxprob", "--measure-rules", "", "--fit-split", "test", "--target-accuracy", "0.8",
                 "--output", str(trained / "same")])
    assert code == 2
    err = capsys.readouterr().err
    # refused while checking the options, before the model is loaded or any logit computed
    assert "--fit-split='test' is invalid" in err and "validation" in err and "Traceback" not in err
    assert not (trained / "same").exists()


def test_target_accuracy_needs_fitted_rules(trained, capsys):
    code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--rules", "maxprob", "--measure-rules", "", "--target-accuracy", "0.8",
                 "--output", str(trained / "nofit")])
    assert code == 2
    assert "--calibration DIR" in capsys.readouterr().err


def test_evaluate_refuses_rules_fitted_on_the_split_it_reports(trained, capsys):
    code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--split", "validation", "--rules", "maxprob", "--measure-rules", "", "--fit-split", "validation",
                 "--output", str(trained / "same-name")])
    assert code == 2
    err = capsys.readouterr().err  # refused while checking the options, before any model is loaded
    assert "--fit-split='validation' is invalid: it is the split being evaluated" in err
    assert not (trained / "same-name").exists()


def test_evaluate_fits_once_writes_once_and_reports_control(trained, monkeypatch, capsys):
    """PCEE and PCEE-WS are fitted once per evaluate, results.json and report.md written once, and the report
    shows the controllability results."""
    import layerexit.evaluation.evaluate as evaluation
    import layerexit.evaluation.report as report_module
    from layerexit.rules import PCEEWS

    fits, writes = [], []
    real_fit, real_fit_ws = PCEE.fit, PCEEWS.fit
    monkeypatch.setattr(PCEE, "fit", lambda self, cache: (fits.append("pcee"), real_fit(self, cache))[1])
    monkeypatch.setattr(PCEEWS, "fit", lambda self, cache: (fits.append("pcee-ws"), real_fit_ws(self, cache))[1])
    real_json, real_report = evaluation.write_json_atomic, report_module.write_report
    monkeypatch.setattr(evaluation, "write_json_atomic", lambda path, data: (writes.append(path.name),
                                                                              real_json(path, data))[1])
    monkeypatch.setattr(evaluation, "write_report", lambda *a, **k: (writes.append("report.md"),
                                                                      real_report(*a, **k))[1])
    out = trained / "eval-once"
    code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--rules", "maxprob", "--measure-rules", "maxprob", "--batch-sizes", "4", "--measure-examples", "16",
                 "--rounds", "2", "--fit-split", "validation", "--target-accuracy", "0.8", "--budget", "0.6",
                 "--output", str(out)])
    assert code == 0
    assert sorted(fits) == ["pcee", "pcee-ws"]
    assert sorted(writes) == ["report.md", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert len(results["measured"]) == 1 and len(results["controllability"]["measured"]) == 2
    for m in results["measured"] + results["controllability"]["measured"]:
        assert m["speedup_spread"]["min"] <= m["speedup_spread"]["median"] <= m["speedup_spread"]["max"]
        assert m["num_examples"] == 16 and 0 <= m["simulated_accuracy"] <= 1 and m["load_average"] >= 0
        assert isinstance(m["warnings"], list) and any("no spread" in w for w in m["warnings"])  # 2 rounds
    text = (out / "report.md").read_text()
    assert "## Accuracy control and budgets" in text and "](controllability.png)" in text
    assert "| pcee |" in text and "At the asked target 80.0%" in text and "](budgets.png)" in text
    assert "| rule | mean \\|target − achieved\\| (pt) |" in text  # one escape per pipe, not two
    assert "accuracy control" in capsys.readouterr().out


def test_evaluate_refuses_most_of_the_fitting_rows_under_another_name(trained, capsys):
    """60 of the 96 validation rows copied into a file named like a test split: compared row by row."""
    cal = trained / "cal-rows"
    assert main(["calibrate", "--model", str(trained / "run" / "best"), "--data", str(trained / "data"),
                 "--split", "validation", "--output", str(cal)]) == 0
    lines = (trained / "data" / "validation.csv").read_text().splitlines()
    subset = trained / "renamed"
    subset.mkdir()
    (subset / "test.csv").write_text("\n".join(lines[:61]) + "\n")  # header + 60 of the fitting rows
    code = main(["evaluate", "--model", str(trained / "run" / "best"), "--data", str(subset), "--rules", "maxprob",
                 "--measure-rules", "", "--calibration", str(cal), "--target-accuracy", "0.8",
                 "--output", str(trained / "rows-eval")])
    assert code == 2
    err = capsys.readouterr().err
    assert "60 of the 60 evaluated rows" in err and "compared row by row" in err and "Traceback" not in err
