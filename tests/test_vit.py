"""Vision: every exit rule works on a Hugging Face ViT, with the same engine invariants as text encoders."""

from __future__ import annotations

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.simulate import simulate
from layerexit.model import MultiExitModel
from layerexit.rules import DEFAULT_SWEEP, PCEE, PCEEWS, RULES, Budget, TemperatureMaxProb, make_rule
from tiny import make_batch, make_model
from tiny_vision import LAYERS, NUM_LABELS, make_images, make_vit

FEATURES = ["cls", "mean", "pooler"]


@pytest.fixture(scope="module")
def vits():
    return {feature: make_vit(feature) for feature in FEATURES}


def test_vit_defaults_to_the_normalised_first_token():
    model = make_vit(None)
    assert model.config.exit_feature == "cls" and model.config.model_type == "vit"
    assert model.config.num_layers == LAYERS


@pytest.mark.parametrize("feature", FEATURES)
def test_last_exit_equals_the_unmodified_vit(vits, feature):
    model = vits[feature]
    images = make_images(6)
    with torch.no_grad():
        out = model.backbone(pixel_values=images)  # the plain HF ViT: final LayerNorm, then pooler
        reference = model(pixel_values=images)  # (L, B, C)
        full = model.early_exit(pixel_values=images, rule=make_rule("full"))
    if feature == "cls":
        expected = model.exits[-1](out.last_hidden_state[:, 0])
    elif feature == "mean":
        expected = model.exits[-1](out.last_hidden_state.mean(dim=1))
    else:
        expected = model.exits[-1](out.pooler_output)
    torch.testing.assert_close(reference[-1], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(full.logits, expected, rtol=0, atol=1e-10)
    assert full.exit_layer.tolist() == [LAYERS] * 6


def _fitted_rules(model) -> list:
    with torch.no_grad():
        fit_logits = model(pixel_values=make_images(32, seed=5))  # (L, 32, C)
    fit = LogitCache(fit_logits, fit_logits[-1].argmax(-1), split="validation")
    return [PCEE(0.5, num_bins=4).fit(fit), PCEEWS(0.5, num_bins=4, smoothing="isotonic").fit(fit),
            TemperatureMaxProb(0.8).fit(fit), Budget(0.6).fit(fit)]


@pytest.mark.parametrize("feature", FEATURES)
def test_engine_exits_equal_simulated_exits_for_every_rule(vits, feature):
    model = vits[feature]
    images = make_images(16, seed=7)
    with torch.no_grad():
        reference = model(pixel_values=images)  # (L, N, C)
    rules = [make_rule(name, **params) for name in DEFAULT_SWEEP
             if not getattr(RULES.get(name), "needs", ())  # rules reading policies need a ConsistentEE model
             for params in RULES.get(name).grid(LAYERS, NUM_LABELS)[::3]]
    rules += _fitted_rules(model)
    targets = {"oracle-gold": torch.arange(16) % NUM_LABELS, "oracle-agreement": reference[-1].argmax(-1)}
    rules += [make_rule(name) for name in targets]
    layers_seen = set()
    for rule in rules:
        target = targets.get(rule.name)
        sim = simulate(rule, reference, target)
        out = model.early_exit(pixel_values=images, rule=rule, targets=target)
        assert torch.equal(out.exit_layer, sim.exit_layer), rule
        assert torch.equal(out.predictions, sim.predictions), rule
        taken = reference[out.exit_layer - 1, torch.arange(16)]  # (N, C) the reference logits of each exit taken
        torch.testing.assert_close(out.logits, taken, rtol=0, atol=1e-12)
        layers_seen |= set(sim.exit_layer.tolist())
    assert len(layers_seen) > 2  # rows really leave the batch at different layers


def test_layers_past_the_exit_are_never_called(vits):
    model = vits["cls"]
    calls = [0] * LAYERS
    hooks = [model.adapter.layer_module(i).register_forward_hook(
        lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i in range(LAYERS)]
    try:
        out = model.early_exit(pixel_values=make_images(1, seed=3), rule=make_rule("static", layer=2))
    finally:
        for hook in hooks:
            hook.remove()
    assert out.exit_layer.tolist() == [2] and calls == [1, 1, 0, 0]


def test_batched_equals_batch_one(vits):
    model = vits["mean"]
    images = make_images(8, seed=11)
    rule = make_rule("maxprob", threshold=0.8)
    batched = model.early_exit(pixel_values=images, rule=rule)
    for i in range(8):
        single = model.early_exit(pixel_values=images[i : i + 1], rule=rule)
        assert single.exit_layer.item() == batched.exit_layer[i].item()
        torch.testing.assert_close(single.logits[0], batched.logits[i], rtol=0, atol=1e-10)


def test_save_and_load_round_trip(vits, tmp_path):
    model = vits["cls"]
    model.save_pretrained(tmp_path / "vit")
    loaded = MultiExitModel.from_pretrained(tmp_path / "vit").double()
    images = make_images(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=images), model(pixel_values=images), rtol=0, atol=0)


def test_wrong_input_kind_is_refused_clearly(vits):
    batch = make_batch("bert")
    with pytest.raises(LayerExitError, match=r"input_ids=.*ViT encoder reads images: pass pixel_values"):
        vits["cls"].early_exit(batch["input_ids"], batch["attention_mask"], rule=make_rule("full"))
    with pytest.raises(LayerExitError, match=r"pixel_values=\(2, 1, 8, 8\).*reads text"):
        make_model("bert", "cls").early_exit(pixel_values=make_images(2), rule=make_rule("full"))
    with pytest.raises(LayerExitError, match=r"pixel_values=\(2, 3, 8, 8\).*expected \(B, 1, 8, 8\)"):
        vits["cls"](pixel_values=torch.zeros(2, 3, 8, 8, dtype=torch.float64))


def test_digits_example_runs_end_to_end(tmp_path, monkeypatch):
    """The examples/ ViT-on-digits script, shrunk to one epoch of a 2-layer model (scikit-learn's bundled data)."""
    pytest.importorskip("sklearn")
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "vit_digits_pcee.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--epochs", "1", "--layers", "2", "--hidden", "16",
                                      "--threads", "1", "--output", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["engine_matches_simulation"] == 1.0
    assert len(results["test_per_layer_accuracy"]) == 2
    assert set(results["controllability"]["target_accuracy"]["rules"]) == {"pcee", "pcee-ws", "maxprob", "maxprob-ts"}
    assert (tmp_path / "controllability.png").is_file()
