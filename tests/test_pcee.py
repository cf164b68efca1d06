"""Calibration, PCEE / PCEE-WS, temperature-scaled max-prob and the budget rule: hand-made bins, exits exactly
where the fitted table says, smoothing monotone where promised, the fit/evaluate split contract, budgets met
on the fitting data, persistence, and the engine agreeing with the simulator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerexit.calibration import (bin_edges, expected_calibration_error, fit_temperature, isotonic,
                                   reliability_bins, smooth_bins)
from layerexit.errors import LayerExitError, NotFittedError
from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.controllability import budget_sweep, controllability, target_sweep
from layerexit.evaluation.simulate import simulate
from layerexit.rules import PCEE, PCEEWS, Budget, TemperatureMaxProb, make_rule
from layerexit.rules.fitting import check_held_out, load_rules, rule_from_dict, rule_to_dict, save_rules
from tiny import CASE_IDS, CASES, LAYERS, NUM_LABELS, make_batch

FITTED = ["pcee", "pcee-ws", "maxprob-ts", "budget"]


def synthetic_cache(layers: int = 4, n: int = 600, classes: int = 3, seed: int = 0, split: str = "dev") -> LogitCache:
    """Logits whose exits get more accurate with depth and whose confidence tracks correctness."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    logits = 1.5 * torch.randn(layers, n, classes, generator=gen, dtype=torch.float64)  # (L, N, C)
    signal = torch.linspace(0.3, 2.5, layers, dtype=torch.float64)[:, None]  # (L, 1)
    logits[:, torch.arange(n), labels] += signal
    return LogitCache(logits, labels, split=split)


# --- reliability bins and ECE on hand-made confidences -------------------------------------------------
def test_reliability_bins_equal_width_by_hand():
    confidence = torch.tensor([0.05, 0.15, 0.15, 0.55, 0.95, 1.0, 0.3])
    correct = torch.tensor([False, True, False, True, True, True, True])
    bins = reliability_bins(confidence, correct, num_bins=10, binning="width")
    assert bins.count.tolist() == [1, 2, 0, 1, 0, 1, 0, 0, 0, 2]  # 0.3 falls in [0.3, 0.4); 1.0 in the last bin
    accuracy = bins.accuracy.tolist()
    assert accuracy[0] == 0.0 and accuracy[1] == 0.5 and accuracy[3] == 1.0 and accuracy[9] == 1.0
    assert math.isnan(accuracy[2]) and math.isnan(accuracy[4])  # empty bins are NaN, not 0
    assert bins.confidence[9] == pytest.approx(0.975) and bins.confidence[1] == pytest.approx(0.15)
    # ECE: (1*|0-0.05| + 2*|0.5-0.15| + 1*|1-0.3| + 1*|1-0.55| + 2*|1-0.975|) / 7
    expected = (0.05 + 2 * 0.35 + 0.7 + 0.45 + 2 * 0.025) / 7
    assert bins.ece() == pytest.approx(expected)
    assert expected_calibration_error(confidence, correct, num_bins=10) == pytest.approx(expected)


def test_reliability_bins_equal_mass_by_hand():
    confidence = torch.tensor([0.51, 0.52, 0.6, 0.61, 0.8, 0.82, 0.95, 0.99])
    correct = torch.tensor([False, True, True, True, False, True, True, True])
    bins = reliability_bins(confidence, correct, num_bins=4, binning="mass")
    assert bins.count.tolist() == [2, 2, 2, 2]
    assert bins.accuracy.tolist() == [0.5, 1.0, 0.5, 1.0]
    assert bins.edges[0] == 0.0 and bins.edges[-1] == 1.0
    # tied confidences give repeated edges, i.e. empty bins
    edges = bin_edges(torch.tensor([0.9] * 6 + [0.5, 0.6]), 4, "mass")
    tied = reliability_bins(torch.tensor([0.9] * 6 + [0.5, 0.6]), torch.ones(8, dtype=torch.bool), edges=edges)
    assert int(tied.count.sum()) == 8 and bool((tied.count == 0).any())


def test_perfectly_calibrated_bins_have_zero_ece():
    confidence = torch.tensor([0.75] * 4 + [0.5] * 2)
    correct = torch.tensor([True, True, True, False, True, False])
    assert expected_calibration_error(confidence, correct, num_bins=10) == pytest.approx(0.0)


def test_temperature_scaling_recovers_the_inflating_factor():
    gen = torch.Generator().manual_seed(0)
    calibrated = 1.2 * torch.randn(4000, 3, generator=gen, dtype=torch.float64)  # (N, C)
    labels = torch.multinomial(calibrated.softmax(-1), 1, generator=gen).squeeze(1)  # drawn from softmax(z)
    temperature = fit_temperature(3.0 * calibrated, labels)  # over-confident logits: T near 3 undoes it
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(calibrated, labels) == pytest.approx(1.0, rel=0.1)


# --- smoothing ---------------------------------------------------------------------------------------
def test_isotonic_by_hand_and_monotone():
    assert isotonic(torch.tensor([0.2, 0.6, 0.4, 0.8]), torch.ones(4)).tolist() == pytest.approx([0.2, 0.5, 0.5, 0.8])
    # weights: the heavy bin pulls the pooled value towards itself
    assert isotonic(torch.tensor([0.9, 0.3]), torch.tensor([1.0, 3.0])).tolist() == pytest.approx([0.45, 0.45])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        values, weights = torch.rand(12, generator=gen), torch.rand(12, generator=gen) + 0.1
        out = isotonic(values, weights)
        assert bool((out[1:] >= out[:-1] - 1e-12).all())
        # pooling keeps the weighted mean
        assert float((out * weights).sum()) == pytest.approx(float((values.double() * weights).sum()))


def test_smoothing_keeps_empty_bins_empty_and_isotonic_is_monotone_over_filled_bins():
    accuracy = torch.tensor([math.nan, 0.9, 0.4, math.nan, 0.7, 1.0], dtype=torch.float64)
    count = torch.tensor([0, 3, 10, 0, 5, 2])
    iso = smooth_bins(accuracy, count, "isotonic")
    assert math.isnan(iso[0]) and math.isnan(iso[3])
    filled = iso[count > 0]
    assert bool((filled[1:] >= filled[:-1]).all())
    neighbour = smooth_bins(accuracy, count, "neighbour", window=1)
    assert math.isnan(neighbour[0]) and math.isnan(neighbour[3])
    # bin 1 with neighbours 0 (empty) and 2: (1*3*0.9 + 0.5*10*0.4) / (1*3 + 0.5*10)
    assert float(neighbour[1]) == pytest.approx((3 * 0.9 + 5 * 0.4) / 8)
    assert torch.equal(smooth_bins(accuracy, count, None).isnan(), accuracy.isnan())
    with pytest.raises(LayerExitError, match="smoothing='spline'"):
        smooth_bins(accuracy, count, "spline")


def test_pcee_ws_isotonic_tables_are_monotone_per_exit():
    rule = PCEEWS(smoothing="isotonic", num_bins=15).fit(synthetic_cache(n=400))
    for row in rule.table_:
        filled = row[~row.isnan()]
        assert bool((filled[1:] >= filled[:-1]).all())


# --- PCEE exits exactly where the fitted table says ---------------------------------------------------------
def test_pcee_hand_made_table():
    # exit 1 sees confidence 0.55 twice (one right, one wrong) and 0.95 twice (both right); exit 2 is the last
    probs = torch.tensor([[0.55, 0.45], [0.55, 0.45], [0.95, 0.05], [0.95, 0.05]], dtype=torch.float64)
    layer1 = probs.log()  # (N, C)
    logits = torch.stack([layer1, layer1])  # (L=2, N=4, C=2)
    labels = torch.tensor([0, 1, 0, 0])
    rule = PCEE(target=0.9, num_bins=10).fit(LogitCache(logits, labels, split="validation"))
    assert rule.accuracy_[0, 5] == 0.5 and rule.accuracy_[0, 9] == 1.0
    assert rule.count_[0].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    # new rows: 0.97 -> bin 9 (accuracy 1.0, exits); 0.58 -> bin 5 (0.5, continues); 0.75 -> bin 7, empty: continues
    new = torch.tensor([[0.97, 0.03], [0.58, 0.42], [0.75, 0.25]], dtype=torch.float64).log()
    assert rule.should_exit(new, 0, {}).tolist() == [True, False, False]
    assert rule.with_target(0.5).should_exit(new, 0, {}).tolist() == [True, True, False]  # empty bin still waits
    assert rule.with_target(0.01).should_exit(new, 0, {}).tolist() == [True, True, False]


def _expected_exits(rule: PCEE, logits: torch.Tensor) -> list[int]:
    """Exit layers computed by hand from the fitted edges and table, one row at a time."""
    out = []
    for row in range(logits.shape[1]):
        exit_layer = logits.shape[0]
        for layer in range(logits.shape[0] - 1):
            confidence = float(logits[layer, row].softmax(-1).max())
            edges = rule.edges_[layer].tolist()
            b = max(i for i in range(len(edges) - 1) if edges[i] <= confidence or i == 0)
            value = float(rule.table_[layer, b])
            if not math.isnan(value) and value >= rule.target:
                exit_layer = layer + 1
                break
        out.append(exit_layer)
    return out


@pytest.mark.parametrize("name,options", [("pcee", {}), ("pcee", {"binning": "mass"}),
                                          ("pcee-ws", {}), ("pcee-ws", {"smoothing": "isotonic", "num_bins": 7})])
def test_pcee_exits_exactly_where_the_table_says(name, options):
    rule = make_rule(name, target=0.7, **options).fit(synthetic_cache(seed=1))
    test = synthetic_cache(seed=2, n=200, split="test")
    sim = simulate(rule, test.logits)
    assert sim.exit_layer.tolist() == _expected_exits(rule, test.logits)
    assert len(set(sim.exit_layer.tolist())) > 1  # the table lets some rows out early and keeps others
    # the exit table says exactly which bins exit
    assert torch.equal(rule.exit_table(), rule.table_ >= 0.7)


def test_pcee_meets_its_target_on_its_own_fitting_data_per_exited_bin():
    cache = synthetic_cache(seed=3, n=2000)
    rule = PCEE(target=0.8, num_bins=10).fit(cache)
    sim = simulate(rule, cache.logits)
    early = sim.exit_layer < cache.num_layers
    assert bool(early.any())
    # every row that left early came from a bin whose validation accuracy is >= 0.8, so together they are too
    assert float((sim.predictions[early] == cache.labels[early]).double().mean()) >= 0.8


# --- the fit / evaluate split contract ---------------------------------------------------------------------
@pytest.mark.parametrize("name", FITTED)
@pytest.mark.parametrize("split", ["test", "TEST", "test.tsv", "test-matched"])
def test_fitting_on_a_test_split_is_refused(name, split):
    with pytest.raises(LayerExitError, match=rf"{name}\.fit\(cache\.split\)=.*fit on 'validation' or 'dev'"):
        make_rule(name).fit(synthetic_cache(split=split))


@pytest.mark.parametrize("name", FITTED)
def test_fitting_needs_split_tagged_data(name):
    with pytest.raises(LayerExitError, match=r"must be tagged with its split name"):
        make_rule(name).fit(synthetic_cache(split=""))
    with pytest.raises(LayerExitError, match=r"pass a LogitCache"):
        make_rule(name).fit(torch.zeros(4, 10, 3))


def test_evaluation_refuses_the_fitting_split_by_name_and_by_digest():
    fit = synthetic_cache(split="dev")
    rule = PCEE().fit(fit)
    with pytest.raises(LayerExitError, match=r"fitted on split 'dev' and would be evaluated on split 'dev'"):
        check_held_out(rule, synthetic_cache(seed=5, split="dev"))
    fit_tagged = synthetic_cache(split="dev")
    fit_tagged.data_id = "abc123"
    rule = PCEE().fit(fit_tagged)
    renamed = synthetic_cache(split="holdout")
    renamed.data_id = "abc123"  # the same examples under another name
    with pytest.raises(LayerExitError, match=r"the same examples"):
        check_held_out(rule, renamed)
    check_held_out(rule, synthetic_cache(seed=9, split="test"))  # another split: fine
    with pytest.raises(LayerExitError, match=r"fitted on split 'dev'"):
        target_sweep(fit, synthetic_cache(seed=5, split="dev"), targets=[0.8])


# --- not fitted, bad parameters --------------------------------------------------------------------------
@pytest.mark.parametrize("name", FITTED)
def test_unfitted_rules_raise_not_fitted(name):
    rule = make_rule(name)
    with pytest.raises(NotFittedError, match=rf"rule='{name}' is not fitted"):
        rule.bind(4, 3)
    with pytest.raises(NotFittedError, match="not fitted"):
        simulate(rule, synthetic_cache().logits)
    with pytest.raises(NotFittedError):
        rule_to_dict(rule)


def test_fitted_rule_refuses_a_model_of_another_depth():
    rule = PCEE().fit(synthetic_cache(layers=4))
    with pytest.raises(LayerExitError, match=r"fitted on a model with 4 layers.*6"):
        simulate(rule, synthetic_cache(layers=6, split="test").logits)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("pcee", {"target": 1.5}, r"pcee\.target=1\.5"),
        ("pcee", {"target": 0}, r"pcee\.target=0"),
        ("pcee", {"num_bins": 0}, r"pcee\.num_bins=0"),
        ("pcee", {"binning": "quantile"}, r"pcee\.binning='quantile'.*'width'.*'mass'"),
        ("pcee", {"smoothing": "spline"}, r"pcee\.smoothing='spline'"),
        ("pcee-ws", {"smoothing": None}, r"pcee-ws\.smoothing=None.*rule 'pcee'"),
        ("pcee-ws", {"window": -1}, r"pcee-ws\.window=-1"),
        ("maxprob-ts", {"threshold": 1.2}, r"maxprob-ts\.threshold=1\.2"),
        ("budget", {"budget": 0}, r"budget\.budget=0"),
        ("budget", {"budget": 1.5}, r"budget\.budget=1\.5"),
        ("budget", {"cost": "flops"}, r"budget\.cost='flops'"),
        ("budget", {"costs": [3.0, 2.0, 1.0]}, r"budget\.costs"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, match):
    with pytest.raises(LayerExitError, match=match):
        make_rule(name, **params)


def test_budget_with_macs_needs_costs_and_a_possible_budget():
    cache = synthetic_cache()
    with pytest.raises(LayerExitError, match=r"budget\.costs=None.*exit_costs"):
        Budget(0.5, "macs").fit(cache)
    with pytest.raises(LayerExitError, match=r"budget\.budget=0\.1.*at least 0\.25"):
        Budget(0.1).fit(cache)  # exiting everything at layer 1 of 4 already costs 0.25


# --- budgets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.25, 0.3, 0.45, 0.5, 0.62, 0.8, 0.95, 1.0])
def test_budget_meets_the_budget_on_its_fitting_data(budget):
    cache = synthetic_cache(n=800)
    rule = Budget(budget).fit(cache)
    sim = simulate(rule, cache.logits)
    achieved = float(sim.exit_layer.double().mean()) / cache.num_layers
    assert achieved == pytest.approx(rule.fit_cost_)
    assert achieved <= budget + 1e-12
    assert achieved >= budget - 0.01  # and spends it: within about one row's step of the budget


def test_budget_in_multiply_adds_meets_the_budget():
    cache = synthetic_cache(n=800)
    costs = [10.0, 30.0, 60.0, 100.0]  # uneven layers: the 4th is 40% of the cost
    rule = Budget(0.5, "macs", costs).fit(cache)
    sim = simulate(rule, cache.logits)
    achieved = rule.average_cost(sim.exit_layer)
    assert achieved <= 0.5 + 1e-12 and achieved >= 0.49
    assert rule.costs_.tolist() == pytest.approx([0.1, 0.3, 0.6, 1.0])


# --- persistence -------------------------------------------------------------------------------------------
def test_fitted_rules_round_trip_through_json(tmp_path):
    cache = synthetic_cache()
    rules = {"pcee": PCEE(0.75).fit(cache), "ws": PCEEWS(0.75, binning="mass").fit(cache),
             "ts": TemperatureMaxProb(0.8).fit(cache), "budget": Budget(0.5).fit(cache),
             "plain": make_rule("maxprob", threshold=0.9)}
    path = save_rules(tmp_path / "rules.json", rules, model="tiny")
    assert json.loads(path.read_text())["model"] == "tiny"
    loaded = load_rules(path)
    test = synthetic_cache(seed=4, split="test")
    for key, rule in rules.items():
        assert type(loaded[key]) is type(rule) and loaded[key].params == rule.params
        assert torch.equal(simulate(loaded[key], test.logits).exit_layer, simulate(rule, test.logits).exit_layer)
    assert loaded["pcee"].fit_split_ == "dev"
    assert rule_from_dict(rule_to_dict(rules["budget"])).threshold_ == rules["budget"].threshold_


def test_load_rules_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LayerExitError, match="rules file"):
        load_rules(tmp_path / "x.json")
    with pytest.raises(LayerExitError, match="rules file"):
        load_rules(tmp_path / "missing.json")


# --- the controllability report ----------------------------------------------------------------------------
def test_controllability_report_shapes_and_curves():
    fit, test = synthetic_cache(n=1500, seed=1), synthetic_cache(n=1500, seed=2, split="test")
    out = controllability(fit, test, targets=[0.5, 0.6, 0.7, 0.8], budgets=[0.1, 0.5, 0.75],
                          macs_costs=[1.0, 2.0, 3.0, 4.0])
    report = out["controllability"]
    assert report["fit_split"] == "dev" and report["eval_split"] == "test" and report["simulated"] is True
    sweep = report["target_accuracy"]
    assert set(sweep["rules"]) == {"pcee", "pcee-ws", "maxprob", "maxprob-ts"}
    assert [r["target"] for r in sweep["rules"]["pcee"]] == [0.5, 0.6, 0.7, 0.8]
    for name, rows in sweep["rules"].items():
        layers = [r["avg_layers"] for r in rows]
        assert layers == sorted(layers), name  # a higher target never uses fewer layers
    low, high = sweep["achievable_range"]
    assert sweep["summary"]["pcee"]["num_targets"] == sum(low <= t <= high for t in [0.5, 0.6, 0.7, 0.8])
    assert set(out["curves"]) == {"pcee", "pcee-ws"} and len(out["curves"]["pcee"]) == 4
    layers_rows = report["budgets"]["layers"]["rows"]
    assert "error" in layers_rows[0] and "at least" in layers_rows[0]["error"]  # 0.1 < 1/4: impossible, reported
    assert all(abs(r["relative_error"]) < 0.1 for r in layers_rows[1:])  # same distribution: close to the ask
    assert len(report["calibration"]["eval"]) == 4 and "ece_scaled" in report["calibration"]["eval"][0]
    json.dumps(report)  # JSON-ready


def test_budget_sweep_on_held_out_data_is_close_to_the_ask():
    out = budget_sweep(synthetic_cache(n=3000, seed=1), synthetic_cache(n=3000, seed=2, split="test"),
                       budgets=[0.4, 0.6])
    assert out["summary"]["num_budgets"] == 2 and out["summary"]["max_abs_relative_error"] < 0.05


# --- the engine agrees with the simulator ------------------------------------------------------------------
@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
def test_engine_exits_equal_simulated_exits_for_fitted_rules(models, arch, feature):
    model = models(arch, feature)
    fit_batch, test_batch = make_batch(arch, batch=24, seed=3), make_batch(arch, batch=16, seed=7)
    with torch.no_grad():
        fit_logits = model(fit_batch["input_ids"], fit_batch["attention_mask"], fit_batch["token_type_ids"])
        reference = model(test_batch["input_ids"], test_batch["attention_mask"], test_batch["token_type_ids"])
    labels = fit_logits[-1].argmax(-1)  # (N,) "gold" labels the last exit gets right
    fit = LogitCache(fit_logits, labels, split="validation")
    median_conf = float(reference[0].softmax(-1).amax(-1).median())
    rules = [PCEE(0.5, num_bins=4).fit(fit), PCEEWS(0.5, num_bins=4, binning="mass").fit(fit),
             TemperatureMaxProb(median_conf).fit(fit), Budget(0.6).fit(fit)]
    spread = False
    for rule in rules:
        sim = simulate(rule, reference)
        out = model.early_exit(test_batch["input_ids"], test_batch["attention_mask"], test_batch["token_type_ids"],
                               rule=rule)
        assert torch.equal(out.exit_layer, sim.exit_layer), rule
        assert torch.equal(out.predictions, sim.predictions), rule
        spread |= len(set(sim.exit_layer.tolist())) > 1
    assert spread, "no fitted rule exits rows at different layers here: the batch never shrinks"
    assert LAYERS == 4 and NUM_LABELS == 3


def test_a_full_budget_saves_as_strict_json(tmp_path):
    rule = Budget(1.0).fit(synthetic_cache())
    assert rule.threshold_ == math.inf  # the whole budget: never exit early
    path = save_rules(tmp_path / "rules.json", {"budget": rule})
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert load_rules(path)["budget"].threshold_ == math.inf


def test_cost_model_by_hand(models):
    from layerexit.evaluation.cost import exit_costs, head_macs, layer_macs, plain_cost, row_costs

    assert layer_macs(hidden=4, intermediate=8, tokens=3) == 4 * 3 * 16 + 2 * 9 * 4 + 2 * 3 * 4 * 8
    assert head_macs(4, 2, 3, "mean") == 3 * 4 + 8 and head_macs(4, 2, 3, "pooler") == 16 + 8
    model = models("bert", "mean")  # tiny BERT: hidden 32, feed-forward 37, 4 layers, 3 labels
    costs = exit_costs(model, 9)
    step = layer_macs(32, 37, 9) + head_macs(32, 3, 9, "mean")
    assert costs == pytest.approx([step, 2 * step, 3 * step, 4 * step])
    # the plain model runs every layer but only the last head
    assert plain_cost(model, 9) == pytest.approx(4 * layer_macs(32, 37, 9) + head_macs(32, 3, 9, "mean"))
    assert row_costs(model, torch.tensor([9, 3])).shape == (2, 4)
