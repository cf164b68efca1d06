"""Conformance of every registered exit rule, found through the registry: a rule added to ``RULES`` is
checked here without anyone listing it (in the spirit of scikit-learn's ``check_estimator``).

For each rule and a spread of its grid: the engine (real layer skipping, rows leaving the batch) exits every
row at the layer the simulator finds over the reference path's cached logits and signals, with the same
prediction and the reference logits of that exit. Rules that learn from validation data are fitted first on
a split-tagged cache of other rows of the same model.
"""

from __future__ import annotations

import pytest
import torch

from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.simulate import simulate
from layerexit.rules import RULES, FittedRule, make_rule
from tiny import LAYERS, NUM_LABELS, make_batch

#: a post-norm encoder with mean pooling, one with a first-token feature and no pooler, and one with the pooler
CASES = [("bert", "mean"), ("distilbert", "cls"), ("albert", "pooler")]
N = 16


def _reference(model, arch: str, seed: int):
    batch = make_batch(arch, batch=N, seed=seed)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        logits, features = model(*inputs, return_features=True)  # (L, N, C), (L, N, H)
        policy = torch.stack([p(f) for p, f in zip(model.policies, features)])  # (L, N)
    return inputs, logits, {"policy": policy}


def _build(name: str, params: dict, fit: LogitCache):
    rule = make_rule(name, **params)
    if isinstance(rule, FittedRule) and hasattr(rule, "fit"):
        rule.fit(fit)
    return rule


def _targets(name: str, logits: torch.Tensor) -> torch.Tensor | None:
    if not RULES.get(name).needs_targets:
        return None
    if name == "oracle-agreement":
        return logits[-1].argmax(-1)  # the full model's predictions
    return torch.arange(logits.shape[1]) % NUM_LABELS  # fixed "gold" labels


@pytest.mark.parametrize("arch,feature", CASES, ids=[f"{a}-{f}" for a, f in CASES])
@pytest.mark.parametrize("name", RULES.names())
def test_engine_equals_simulator_for_every_registered_rule(models, arch, feature, name):
    model = models(arch, feature)
    _, fit_logits, _ = _reference(model, arch, seed=3)
    fit = LogitCache(fit_logits.float(), fit_logits[-1].argmax(-1), split="validation")  # other rows
    inputs, logits, signals = _reference(model, arch, seed=7)
    targets = _targets(name, logits)
    grid = RULES.get(name).grid(LAYERS, NUM_LABELS)
    assert grid, f"{name} has an empty grid for {LAYERS} layers"
    for params in [grid[0], grid[len(grid) // 2], grid[-1]]:
        sim = simulate(_build(name, params, fit), logits, targets, signals)
        out = model.early_exit(*inputs, rule=_build(name, params, fit), targets=targets)
        assert torch.equal(out.exit_layer, sim.exit_layer), (name, params)
        assert torch.equal(out.predictions, sim.predictions), (name, params)
        taken = logits[out.exit_layer - 1, torch.arange(N)]  # (N, C): the reference logits of each exit
        torch.testing.assert_close(out.logits, taken, rtol=0, atol=1e-12)


def test_the_registry_holds_the_rules_this_suite_must_cover():
    """Guard against a vacuous suite: the registry lists the fitted rules too, not only the default sweep."""
    assert {"maxprob", "pcee", "pcee-ws", "maxprob-ts", "budget", "full", "oracle-gold"} <= set(RULES.names())
