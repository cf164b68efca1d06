"""Simulated exits over cached logits equal the engine's real exits, row by row.

The simulator (``layerexit.evaluation.simulate``) sweeps rules over the reference path's logits; the engine
runs layers and lets rows leave. Both must agree exactly on every row's exit layer and prediction.
"""

from __future__ import annotations

import pytest
import torch

from layerexit.evaluation.simulate import Simulation, per_layer_accuracy, simulate
from layerexit.rules import DEFAULT_SWEEP, RULES, make_rule
from tiny import CASE_IDS, CASES, LAYERS, NUM_LABELS, make_batch

ORACLES = ["oracle-gold", "oracle-agreement"]
N = 16


def _targets(name: str, reference: torch.Tensor) -> torch.Tensor | None:
    if name == "oracle-gold":
        return torch.arange(reference.shape[1]) % NUM_LABELS  # (N,) fixed "gold" labels
    if name == "oracle-agreement":
        return reference[-1].argmax(-1)  # the full model's predictions
    return None


def _chosen_points(name: str, reference: torch.Tensor, targets, signals) -> tuple[list[dict], dict]:
    """First, middle and last grid points, plus the one that spreads rows over the most exit layers."""
    grid = RULES.get(name).grid(LAYERS, NUM_LABELS)
    assert grid, f"{name} has an empty grid for {LAYERS} layers"
    spread = max(grid, key=lambda p: len(set(
        simulate(make_rule(name, **p), reference, targets, signals).exit_layer.tolist())))
    points = [grid[0], grid[len(grid) // 2], grid[-1], spread]
    unique = [p for i, p in enumerate(points) if p not in points[:i]]
    return unique, spread


@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", DEFAULT_SWEEP + ORACLES)
def test_engine_exits_equal_simulated_exits(models, arch, feature, name):
    model = models(arch, feature)
    batch = make_batch(arch, batch=N, seed=7)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        reference, features = model(*inputs, return_features=True)  # (L, N, C), (L, N, H)
        signals = {"policy": torch.stack([p(f) for p, f in zip(model.policies, features)])}  # (L, N)
    targets = _targets(name, reference)
    points, spread = _chosen_points(name, reference, targets, signals)
    for params in points:
        sim = simulate(make_rule(name, **params), reference, targets, signals)
        out = model.early_exit(*inputs, rule=make_rule(name, **params), targets=targets)
        assert torch.equal(out.exit_layer, sim.exit_layer), params
        assert torch.equal(out.predictions, sim.predictions), params
        # the engine's logits are the reference logits of the exit it took
        taken = reference[out.exit_layer - 1, torch.arange(N)]  # (N, C)
        torch.testing.assert_close(out.logits, taken, rtol=0, atol=1e-12)
    layers_used = set(simulate(make_rule(name, **spread), reference, targets, signals).exit_layer.tolist())
    if name != "static":  # static exits every row at one layer by definition
        assert len(layers_used) > 1, f"{name} never exits rows at different layers here: the batch never shrinks"


def test_simulate_hand_made_logits():
    # layer 1: row0 confident (0.88), row1 unsure; layer 2: row1 confident; layer 3 answers the rest
    logits = torch.tensor([
        [[2.0, 0.0], [0.1, 0.0], [0.0, 0.1]],
        [[0.0, 2.0], [0.0, 3.0], [0.0, 0.2]],
        [[5.0, 0.0], [5.0, 0.0], [0.0, 0.3]],
    ])  # (L=3, N=3, C=2)
    before = logits.clone()
    sim = simulate(make_rule("maxprob", threshold=0.85), logits)
    assert sim.exit_layer.tolist() == [1, 2, 3]
    assert sim.predictions.tolist() == [0, 1, 1]
    assert torch.equal(logits, before)
    point = sim.point(torch.tensor([0, 1, 0]), num_layers=3, params={"threshold": 0.85})
    assert point["accuracy"] == pytest.approx(2 / 3)
    assert point["avg_layers"] == pytest.approx(2.0)
    assert point["saved_layers"] == pytest.approx(1 / 3)
    assert point["params"] == {"threshold": 0.85}

    # patience 1: exit at the second of two equal predictions in a row; predictions per layer are
    # row 0: 0, 1, 0; row 1: 0, 1, 0; row 2: 1, 1 -> only row 2 exits early (layer 2)
    sim = simulate(make_rule("patience", patience=1), logits)
    assert sim.exit_layer.tolist() == [3, 3, 2]
    assert sim.predictions.tolist() == [0, 0, 1]

    gold = simulate(make_rule("oracle-gold"), logits, torch.tensor([0, 0, 0]))
    assert gold.exit_layer.tolist() == [1, 1, 3]  # row 2 is never right: the last layer answers
    assert isinstance(gold, Simulation)


def test_simulate_never_exit_and_static():
    logits = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    full = simulate(make_rule("full"), logits)
    assert full.exit_layer.tolist() == [4] * 5
    assert torch.equal(full.predictions, logits[-1].argmax(-1))
    for k in range(1, 5):
        static = simulate(make_rule("static", layer=k), logits)
        assert static.exit_layer.tolist() == [k] * 5
        assert torch.equal(static.predictions, logits[k - 1].argmax(-1))


def test_per_layer_accuracy():
    logits = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # (2, 2, 2)
    assert per_layer_accuracy(logits, torch.tensor([0, 0])) == [1.0, 0.5]


def test_simulate_binds_the_rule():
    with pytest.raises(Exception, match="static.layer"):
        simulate(make_rule("static", layer=5), torch.zeros(4, 2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_and_simulator_agree_on_cuda(models):
    """The simulator keeps its results on the cache's device; the engine runs there too."""
    from tiny import make_model

    model = make_model("bert", "mean").cuda()
    batch = {k: (v.cuda() if v is not None else None) for k, v in make_batch("bert", batch=N, seed=7).items()}
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        reference = model(*inputs)  # (L, N, C) on the GPU
    rule = make_rule("patience", patience=1)
    sim = simulate(rule, reference)
    out = model.early_exit(*inputs, rule=rule)
    assert sim.exit_layer.device == reference.device
    assert torch.equal(out.exit_layer, sim.exit_layer) and torch.equal(out.predictions, sim.predictions)
