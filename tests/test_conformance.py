"""Conformance of every registered exit rule, found through the registries: a rule added to ``RULES`` or
``TOKEN_RULES`` is checked here without anyone listing it (in the spirit of scikit-learn's ``check_estimator``).

Encoders: for each rule and a spread of its grid, the engine (real layer skipping, rows leaving the batch)
exits every row at the layer the simulator finds over the reference path's cached logits and signals, with
the same prediction and the reference logits of that exit. Rules that learn from validation data are fitted
first on a split-tagged cache of other rows of the same model.

Decoders: for each token rule, with thresholds, ``min_layer``, ``exit_layers`` and ``decay``, the decoder
(deferred recomputation, so every cached key and value is the one of the tokens' real path) exits every
generated token at the layer the same simulator finds over teacher-forced per-layer logits and signals of
the generated sequence, and emits the same token.
"""

from __future__ import annotations

import pytest
import torch

from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.simulate import simulate
from layerexit.generation import EarlyExitLM, generate, make_token_rule
from layerexit.generation.rules import TOKEN_RULES
from layerexit.generation.teacher_forced import token_batches
from layerexit.rules import RULES, FittedRule, make_rule
from tiny import LAYERS, NUM_LABELS, make_batch
from tiny_decoder import make_lm, prompt

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


# ---------------------------------------------------------------------------------------------- decoders

NEW = 12


def _score(name: str, logits: torch.Tensor, signals: dict) -> torch.Tensor | None:
    """(L, N) what a threshold rule compares with its threshold, to pick thresholds that spread the exits."""
    probs = logits.float().softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    scores = {"maxprob": top2[..., 0], "margin": top2[..., 0] - top2[..., 1],
              "saturation": signals.get("similarity"), "policy": signals.get("policy")}
    return scores.get(name)


def _token_options(name: str, score: torch.Tensor | None) -> list[dict]:
    """Settings of one token rule: thresholds at quantiles of its score over the layers that may exit (so the
    tokens leave at different layers), and the token options on the middle one. A rule without a known score
    runs at its default threshold."""
    if name == "static":
        return [{"min_layer": k} for k in (1, 2, 3)]
    if score is None:
        thresholds = [{}]
    else:
        values = torch.quantile(score[:-1].double().flatten(), torch.tensor([0.3, 0.6, 0.85], dtype=torch.float64))
        thresholds = [{"threshold": float(v)} for v in values]
    mid = thresholds[len(thresholds) // 2]
    return thresholds + [{**mid, "min_layer": 2}, {**mid, "exit_layers": [2, 3]}, {**mid, "decay": True}]


def _teacher_forced(model, ids, tokens, layers=None):
    """The library's teacher-forced cache of the N tokens decided after the prompt, from a plain forward of the
    generated sequence: row i is the position that produced generated token i + 1."""
    seq = torch.cat([ids, torch.tensor([tokens[:-1]])], dim=1)
    (batch,) = token_batches(model, seq, first=ids.shape[1], layers=layers)
    return batch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", TOKEN_RULES.names())
def test_decoder_equals_simulator_for_every_token_rule(arch, name):
    model = EarlyExitLM(make_lm(arch, scale=8.0), policy=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.policy.parameters():  # a random policy whose exit probabilities spread
            parameter.normal_(0.0, 2.0, generator=gen)
    ids = prompt(seed=11)
    full = generate(model, ids, None, NEW)
    reference = _teacher_forced(model, ids, full.tokens)
    assert reference.full.tolist() == full.tokens[1:]  # the cache's full-model tokens are the decoder's
    score = _score(name, reference.logits, reference.signals)
    early = set()
    for options in _token_options(name, score):
        out = generate(model, ids, make_token_rule(name, **options), NEW, kv="recompute")
        rule = make_token_rule(name, **options).with_horizon(NEW)
        for layers in (None, options.get("exit_layers")) if "exit_layers" in options else (None,):
            cache = _teacher_forced(model, ids, out.tokens, layers)  # every exit, or only the rule's
            sim = simulate(rule, cache.logits, signals=cache.signals, layers=cache.layers)
            assert sim.exit_layer.tolist() == out.exit_layers[1:], (name, options, layers)
            assert sim.predictions.tolist() == out.tokens[1:], (name, options, layers)
        early |= set(out.exit_layers[1:])
    if name not in ("never", "static"):
        assert len(early) >= 3, f"{name} exits tokens at only {sorted(early)} here: the check would be weak"
