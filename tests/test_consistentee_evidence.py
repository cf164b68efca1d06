"""Multi-seed summaries, differences claimed only beyond the spread, and the alpha dial's checks."""

from __future__ import annotations

import pytest

from layerexit.consistentee.evidence import compare, dial_coverage, dial_versus_runs, summarize


def test_summarize_uses_the_sample_std():
    s = summarize([0.70, 0.72, 0.74])
    assert s["mean"] == pytest.approx(0.72) and s["std"] == pytest.approx(0.02)
    assert summarize([0.5])["std"] == 0.0


def test_difference_counts_only_beyond_the_spread():
    assert compare([0.80, 0.81, 0.82], [0.70, 0.71, 0.72])["verdict"] == "higher"
    assert compare([0.70, 0.71, 0.72], [0.80, 0.81, 0.82])["verdict"] == "lower"
    # a mean difference of 0.01 with a spread of ~0.04: not claimed
    close = compare([0.70, 0.74, 0.72], [0.69, 0.73, 0.71 - 0.0])
    assert close["verdict"] == "within spread" and close["spread"] > abs(close["difference"])
    # one seed is never evidence
    assert compare([0.9], [0.1])["verdict"] == "within spread"
    # large mean difference but the seeds disagree on the sign: not claimed
    assert compare([0.9, 0.1, 0.9], [0.5, 0.5, 0.5])["verdict"] == "within spread"


def _p(saved, acc, **params):
    return {"saved_layers": saved, "accuracy": acc, "params": params}


def test_dial_coverage_finds_gaps_and_ends():
    even = [_p(s / 100, 0.8) for s in range(10, 80, 8)]
    assert dial_coverage(even)["covers"]
    cliff = [_p(0.1, 0.85), _p(0.39, 0.85), _p(0.83, 0.72)]  # the fixed-alpha cliff: 39% then all at layer 1
    report = dial_coverage(cliff)
    assert not report["covers"] and report["largest_gap"] == pytest.approx(0.31)
    short = [_p(0.25, 0.8), _p(0.3, 0.8), _p(0.4, 0.8)]  # never reaches 20% or 70%
    assert not dial_coverage(short)["covers"]
    assert not dial_coverage([])["covers"]


def test_dial_versus_separately_trained_runs():
    dial = [_p(0.2, 0.86), _p(0.4, 0.85), _p(0.6, 0.80)]
    runs = [_p(0.38, 0.853, alpha=1.0), _p(0.55, 0.81, alpha=2.0)]
    out = dial_versus_runs(dial, runs, tolerance=0.005)
    assert [round(r["shortfall"], 4) for r in out["points"]] == [0.003, 0.01]
    assert not out["within"]
    assert dial_versus_runs(dial, runs[:1])["within"]
    assert not dial_versus_runs(dial, [_p(0.9, 0.7)])["within"]  # the dial never reaches that level
