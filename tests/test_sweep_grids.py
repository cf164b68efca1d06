"""Sweep grids derived from the quantiles of each rule's own signal cover the whole saved-layers range.

The fixed grids of the confidence rules start at probability 0.5; on a many-class task whose exits are rarely
that sure, max-prob's curve then stopped far from "every row exits at layer 1" while entropy's went on, and
areas under the curves compared grids rather than rules.
"""

from __future__ import annotations

import torch

from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.evaluate import sweep
from layerexit.evaluation.simulate import simulate
from layerexit.rules import RULES, make_rule

L, C, N = 6, 6, 600
MOST_SAVED = (L - 1) / L  # every row exits at layer 1


def six_class_cache(seed: int = 0) -> LogitCache:
    """A 6-class, 6-layer toy task whose exits grow more confident with depth but stay unsure (max-prob mostly
    below 0.5 early on), as a fresh model on a many-class task is."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=gen)
    scale = torch.linspace(0.3, 2.0, L)[:, None, None]  # (L, 1, 1)
    logits = scale * (torch.randn(L, N, C, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, C))
    policy = torch.sigmoid(torch.randn(L, N, generator=gen) * 2 + torch.linspace(-2, 2, L)[:, None])  # (L, N)
    return LogitCache(logits, labels, policy)


def _saved_range(points):
    saved = [p["saved_layers"] for p in points]
    return min(saved), max(saved)


def test_quantile_grids_cover_the_whole_range_on_six_classes():
    cache = six_class_cache()
    curves = sweep(cache, ["maxprob", "margin", "entropy", "patience-confidence", "consistentee"])
    for name in ("maxprob", "margin", "entropy", "patience-confidence", "consistentee-threshold"):
        low, high = _saved_range(curves[name])
        assert low <= 0.02, (name, low)  # near 0% saved: hardly any row exits early
        assert high >= 0.98 * MOST_SAVED, (name, high)  # near 100% of what can be saved: all at layer 1
        # no gap: neighbouring points of the curve differ by at most 10 points of saved layers
        saved = sorted(p["saved_layers"] for p in curves[name])
        assert max(b - a for a, b in zip(saved, saved[1:])) <= 0.10, name


def test_fixed_confidence_grid_fell_short_on_this_task():
    """The data-free grid stops at threshold 0.5: the check above is one the old grids fail."""
    cache = six_class_cache()
    fixed = [simulate(make_rule("maxprob", **p), cache.logits).point(cache.labels, L, p)
             for p in RULES.get("maxprob").grid(L, C)]
    assert _saved_range(fixed)[1] < 0.9 * MOST_SAVED


def test_quantile_grids_are_sorted_distinct_and_valid():
    cache = six_class_cache(seed=1)
    for name in ("maxprob", "margin", "entropy", "patience-confidence", "consistentee"):
        grid = RULES.get(name).sweep_grid(cache.logits, cache.signals)
        assert 2 < len(grid) <= 3 * 34
        assert len({tuple(sorted(p.items())) for p in grid}) == len(grid), name
        for params in grid:
            make_rule(name, **params).bind(L, C)  # every threshold is one the rule accepts


def test_rules_without_a_scalar_signal_keep_their_fixed_grid():
    cache = six_class_cache()
    for name in ("static", "patience"):
        assert RULES.get(name).sweep_grid(cache.logits, cache.signals) == RULES.get(name).grid(L, C)
