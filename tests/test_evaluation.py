"""Library pieces of an evaluation: the plain model every speed-up is measured against, and the timing's
spread and plausibility checks."""

from __future__ import annotations

import pytest
import torch

from layerexit.evaluation.benchmark import Batches, plain_forward
from layerexit.evaluation.timing import paired_speedup, spread, timing_warnings
from tiny import CASE_IDS, CASES, make_batch
from tiny_vision import make_images, make_vit


@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
def test_plain_forward_equals_the_models_last_exit(models, arch, feature):
    """The denominator of every measured speed-up computes exactly the multi-exit model's last exit."""
    model = models(arch, feature)
    batch = make_batch(arch)
    inputs = {k: v for k, v in batch.items() if v is not None}
    with torch.no_grad():
        reference = model(**inputs)[-1]  # (B, C)
    plain = plain_forward(model, inputs)
    assert plain.shape == reference.shape
    torch.testing.assert_close(plain, reference, rtol=0, atol=1e-10)


def test_plain_forward_equals_the_last_exit_on_a_vit():
    model = make_vit("cls")
    images = make_images(3)
    with torch.no_grad():
        reference = model(pixel_values=images)[-1]
    torch.testing.assert_close(plain_forward(model, {"pixel_values": images}), reference, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------ timing


def _entry(**overrides) -> dict:
    entry = {"speedup_measured": 1.5, "speedup_ideal": 1.6, "overhead_heads": 0.04, "rounds": 5,
             "overhead_spread": spread([0.03, 0.04, 0.05]), "speedup_spread": spread([1.45, 1.5, 1.55])}
    return {**entry, **overrides}


def test_spread_quartiles_and_a_single_value():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"min": 1.0, "q1": 2.0, "median": 3.0, "q3": 4.0, "max": 5.0}
    assert spread([2.5]) == {"min": 2.5, "q1": 2.5, "median": 2.5, "q3": 2.5, "max": 2.5}


def test_paired_speedup_divides_within_each_round():
    """A slow round slows both variants alike, so the per-round ratio stays put; the range shows when not."""
    reference, other = [2.0, 4.0, 2.2, 4.4, 2.0], [1.0, 2.0, 1.1, 2.2, 1.0]  # other twice as fast in every round
    assert paired_speedup(reference, other) == {"median": 2.0, "min": 2.0, "max": 2.0}
    unsteady = [2.0, 2.0, 2.2, 4.4, 2.0]  # as fast as the reference but for one round: 1x to 2x
    assert paired_speedup(reference, unsteady) == {"median": 1.0, "min": 1.0, "max": 2.0}
    with pytest.raises(ValueError, match="same rounds"):
        paired_speedup([1.0, 2.0], [1.0])


def test_sound_timing_has_no_warning():
    assert timing_warnings(_entry()) == []
    assert timing_warnings(_entry(speedup_measured=1.6 * 1.09)) == []  # within 10% of the ideal: noise


def test_speedup_above_ideal_is_flagged():
    """The figure a loaded machine printed: 3.08x measured against 1.41x ideal."""
    (warning,) = timing_warnings(_entry(speedup_measured=3.08, speedup_ideal=1.41))
    assert "3.08x" in warning and "1.41x" in warning and "above the ideal" in warning


def test_negative_head_overhead_beyond_noise_is_flagged():
    (warning,) = timing_warnings(_entry(overhead_heads=-0.577))
    assert "-57.7%" in warning and "negative beyond noise" in warning
    # within the noise band (the rounds' own interquartile range) it is not flagged
    assert timing_warnings(_entry(overhead_heads=-0.05, overhead_spread=spread([-0.1, -0.05, 0.0, 0.05]))) == []


def test_few_rounds_and_unsteady_rounds_are_flagged():
    assert "no spread" in timing_warnings(_entry(rounds=1))[0]
    assert "range from 1.00x to 1.50x" in timing_warnings(_entry(speedup_spread=spread([1.0, 1.2, 1.5])))[0]


def test_measure_keeps_every_round_and_simulation_uses_the_timed_rows(models):
    """A real (tiny) timing run keeps each round's time; the simulation beside it covers exactly the timed
    rows (the first 8 of a 16-row cache) and agrees with the engine there."""
    from layerexit.evaluation.benchmark import compare_with_simulation, measure
    from layerexit.evaluation.cache import LogitCache
    from layerexit.rules import make_rule

    model = models("bert", "cls")
    batch = make_batch("bert", batch=8)
    inputs = {k: v for k, v in batch.items() if v is not None}
    rule = make_rule("maxprob", threshold=0.6)
    result = measure(model, Batches([inputs], torch.zeros(8, dtype=torch.long)), {"maxprob": rule}, rounds=3,
                     progress=False)
    assert {len(v) for v in result["rounds"].values()} == {3}
    with torch.no_grad():
        logits = model(**inputs)  # (L, 8, C)
    cache = LogitCache(torch.cat([logits, logits], dim=1).float(), torch.zeros(16, dtype=torch.long))
    exit_layer, _ = result["outputs"]["maxprob"]
    (entry,) = compare_with_simulation([{"rule": "maxprob", "exit_layers": exit_layer.tolist()}], cache,
                                       {"maxprob": rule})
    assert entry["matches_simulation"] == 1.0
    assert entry["simulated_avg_layers"] == pytest.approx(float(exit_layer.double().mean()))



def test_generation_report_flags_a_speedup_above_the_ideal(tmp_path):
    from layerexit.evaluation.generation_report import generation_report

    entry = {"name": "maxprob", "avg_layers": 20.0, "speedup_measured": 1.9, "speedup_ideal": 1.5,
             "tokens_per_second": 9.5, "token_match": 0.9, "rouge_l": 0.9, "identical_prompts": 1}
    entry["warnings"] = timing_warnings(entry)
    payload = {"full": {"tokens_per_second": 5.0}, "prompts": 2, "max_new_tokens": 8, "exit_parameters": 0,
               "backbone_parameters": 100, "results": [entry]}
    text = generation_report(payload)
    assert "| maxprob | 20.00 | 9.50 | 1.90x | 1.50x |" in text
    assert "**Timing warnings**" in text and "above the ideal L/avg_layers 1.50x" in text
