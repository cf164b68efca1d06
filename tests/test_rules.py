"""Exit rules: they never modify logits, keep per-row state right, and refuse impossible settings loudly."""

from __future__ import annotations

import math

import pytest
import torch

from layerexit.errors import LayerExitError, NotFittedError
from layerexit.rules import DEFAULT_SWEEP, RULES, FittedRule, make_rule

L, C = 4, 3


def _fitted_if_needed(rule):
    """Rules that learn from validation data are fitted on a small split-tagged random cache first."""
    if isinstance(rule, FittedRule) and hasattr(rule, "fit"):
        from layerexit.evaluation.cache import LogitCache

        gen = torch.Generator().manual_seed(0)
        rule.fit(LogitCache(3 * torch.randn(L, 64, C, generator=gen), torch.randint(0, C, (64,), generator=gen),
                            split="validation"))
    return rule


def _rule_with_state(name: str, n: int):
    rule = _fitted_if_needed(make_rule(name))
    rule.bind(L, C)
    targets = torch.zeros(n, dtype=torch.long) if RULES.get(name).needs_targets else None
    return rule, rule.init_state(n, targets=targets)


@pytest.mark.parametrize("name", RULES.names())
def test_rules_do_not_modify_logits(name):
    logits = torch.randn(6, C, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    rule, state = _rule_with_state(name, 6)
    for layer in range(L - 1):
        for signal in rule.needs:  # what the engine would put there, e.g. the policy's probabilities
            state[signal] = torch.rand(6, generator=torch.Generator().manual_seed(layer))
        done = rule.should_exit(logits, layer, state)
        assert done.dtype == torch.bool and done.shape == (6,)
    assert torch.equal(logits, before)


def test_every_registered_rule_has_a_usable_grid():
    for name in RULES.names():
        for params in RULES.get(name).grid(L, C):
            rule = _fitted_if_needed(make_rule(name, **params)).bind(L, C)
            assert rule.params == params or not params


def test_default_sweep_is_registered_and_excludes_oracles():
    assert set(DEFAULT_SWEEP) <= set(RULES.names())
    assert not any(RULES.get(n).needs_targets for n in DEFAULT_SWEEP)
    assert RULES.get("oracle-gold").needs_targets and RULES.get("oracle-agreement").needs_targets


def test_maxprob_margin_entropy_decisions():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    assert make_rule("maxprob", threshold=0.8).should_exit(logits, 0, {}).tolist() == [True, False, False]
    assert make_rule("maxprob", threshold=0.45).should_exit(logits, 0, {}).tolist() == [True, True, False]
    assert make_rule("margin", threshold=0.5).should_exit(logits, 0, {}).tolist() == [True, False, False]
    assert make_rule("margin", threshold=0.05).should_exit(logits, 0, {}).tolist() == [True, True, False]
    entropy_uniform = math.log(3)
    assert make_rule("entropy", threshold=0.5).should_exit(logits, 0, {}).tolist() == [True, False, False]
    # strictly below: the uniform row (entropy log 3) never exits, everything else does at threshold log 3
    assert make_rule("entropy", threshold=entropy_uniform).should_exit(logits, 0, {}).tolist() == [True, True, False]


def test_patience_state_updates():
    rule = make_rule("patience", patience=2).bind(L, C)
    state = rule.init_state(3)
    zero, one = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    # row 0 predicts 0,0,0; row 1 predicts 0,1,1; row 2 predicts 1,0,1
    layers = [torch.cat([zero, zero, one]), torch.cat([zero, one, zero]), torch.cat([zero, one, one])]
    assert rule.should_exit(layers[0], 0, state).tolist() == [False, False, False]
    assert state["previous"].tolist() == [0, 0, 1] and state["count"].tolist() == [0, 0, 0]
    assert rule.should_exit(layers[1], 1, state).tolist() == [False, False, False]
    assert state["previous"].tolist() == [0, 1, 0] and state["count"].tolist() == [1, 0, 0]
    assert rule.should_exit(layers[2], 2, state).tolist() == [True, False, False]
    assert state["previous"].tolist() == [0, 1, 1] and state["count"].tolist() == [2, 1, 0]


def test_patience_confidence_state_updates():
    rule = make_rule("patience-confidence", threshold=0.8, patience=2).bind(L, C)
    state = rule.init_state(2)
    sure, unsure = torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    assert rule.should_exit(torch.cat([sure, unsure]), 0, state).tolist() == [False, False]
    assert state["count"].tolist() == [1, 0]
    assert rule.should_exit(torch.cat([sure, sure]), 1, state).tolist() == [True, False]
    assert state["count"].tolist() == [2, 1]
    assert rule.should_exit(torch.cat([unsure, sure]), 2, state).tolist() == [False, True]
    assert state["count"].tolist() == [0, 2]


def test_static_and_full_decisions():
    logits = torch.zeros(2, C)
    static = make_rule("static", layer=2).bind(L, C)
    assert [static.should_exit(logits, i, {}).tolist() for i in range(3)] == [[False] * 2, [True] * 2, [True] * 2]
    full = make_rule("full").bind(L, C)
    assert not any(full.should_exit(logits, i, {}).any() for i in range(3))


def test_oracles_exit_where_prediction_equals_target():
    rule = make_rule("oracle-gold").bind(L, C)
    state = rule.init_state(3, targets=torch.tensor([0, 1, 2]))
    logits = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert rule.should_exit(logits, 0, state).tolist() == [True, False, True]
    agreement = make_rule("oracle-agreement").bind(L, C)
    state = agreement.init_state(2, targets=[2, 0])  # lists are accepted
    assert agreement.should_exit(logits[:2], 0, state).tolist() == [False, True]


# --- validation: every message names the parameter -----------------------------------------------------
@pytest.mark.parametrize(
    "name,params,match",
    [
        ("maxprob", {"threshold": 1.5}, r"maxprob\.threshold=1\.5"),
        ("maxprob", {"threshold": -0.1}, r"maxprob\.threshold"),
        ("maxprob", {"threshold": float("nan")}, r"maxprob\.threshold"),
        ("margin", {"threshold": 1.01}, r"margin\.threshold"),
        ("entropy", {"threshold": 0}, r"entropy\.threshold=0"),
        ("entropy", {"threshold": -1}, r"entropy\.threshold"),
        ("patience", {"patience": 0}, r"patience\.patience=0"),
        ("patience", {"patience": 1.5}, r"patience\.patience"),
        ("patience-confidence", {"threshold": 2.0}, r"patience-confidence\.threshold"),
        ("patience-confidence", {"patience": 0}, r"patience-confidence\.patience"),
        ("static", {"layer": 0}, r"static\.layer=0"),
        ("maxprob", {"treshold": 0.9}, r"maxprob parameters"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(name, params, match):
    with pytest.raises(LayerExitError, match=match):
        make_rule(name, **params)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("patience", {"patience": 3}, r"patience\.patience=3.*at most 2"),  # 4 layers: patience <= 2
        ("patience-confidence", {"patience": 4}, r"patience-confidence\.patience=4.*at most 3"),
        ("static", {"layer": 5}, r"static\.layer=5.*1\.\.4"),
    ],
)
def test_settings_impossible_for_the_depth_raise_on_bind(name, params, match):
    rule = make_rule(name, **params)  # fine on its own: the depth is not known yet
    with pytest.raises(LayerExitError, match=match):
        rule.bind(L, C)


def test_patience_on_a_two_layer_model_says_why():
    with pytest.raises(LayerExitError, match=r"patience\.patience=1 is invalid: with 2 layers.*at least 3 layers"):
        make_rule("patience", patience=1).bind(2, C)


def test_grids_have_no_duplicate_points():
    for name in RULES.names():
        grid = RULES.get(name).grid(L, C)
        assert len({tuple(sorted(p.items())) for p in grid}) == len(grid), name
    margins = [p["threshold"] for p in RULES.get("margin").grid(L, C)]
    assert margins == sorted(margins) and 0.3 in margins and 0.30000000000000004 not in margins


def test_largest_valid_settings_bind():
    make_rule("patience", patience=2).bind(L, C)
    make_rule("patience-confidence", patience=3).bind(L, C)
    make_rule("static", layer=4).bind(L, C)


@pytest.mark.parametrize("name", ["oracle-gold", "oracle-agreement"])
def test_oracle_without_targets_raises(name):
    with pytest.raises(LayerExitError, match=rf"targets=None.*{name}"):
        make_rule(name).init_state(3)


def test_oracle_without_targets_raises_in_the_engine():
    from tiny import make_batch, make_model

    model = make_model("bert", "cls", double=False)
    batch = make_batch("bert")
    with pytest.raises(LayerExitError, match="targets"):
        model.early_exit(batch["input_ids"], batch["attention_mask"], rule=make_rule("oracle-gold"))


def test_unknown_rule_name_lists_the_known_ones():
    with pytest.raises(LayerExitError, match=r"rule='fastest'.*maxprob.*patience"):
        make_rule("fastest")


def test_unfitted_rule_raises_not_fitted():
    class Calibrated(FittedRule):
        name = "calibrated"

        def fit(self, value):
            self.threshold_ = value
            return self

    rule = Calibrated()
    with pytest.raises(NotFittedError, match=r"rule='calibrated' is not fitted"):
        rule.check_fitted()
    assert rule.fit(0.5) is rule
    rule.check_fitted()  # fitted now: no error


def test_rule_repr_shows_parameters():
    assert repr(make_rule("patience-confidence", threshold=0.8, patience=2)) == (
        "PatienceConfidence(threshold=0.8, patience=2)"
    )
