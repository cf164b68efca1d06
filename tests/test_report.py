"""Report, table and figures from a synthetic results dict (no model, no other package module)."""

from __future__ import annotations

import copy

import pytest

from layerexit.evaluation.metrics import area_under_curve, operating_point
from layerexit.evaluation.report import write_report
from layerexit.evaluation.table import format_summary, format_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def point(accuracy: float, saved: float, num_layers: int = 6, **params) -> dict:
    return {
        "params": params,
        "accuracy": accuracy,
        "avg_layers": num_layers * (1.0 - saved),
        "saved_layers": saved,
    }


def make_results() -> dict:
    return {
        "model": "tiny-bert",
        "dataset": "sst2",
        "split": "validation",
        "num_layers": 6,
        "num_examples": 872,
        "full": {"accuracy": 0.86},
        "per_layer_accuracy": [0.68, 0.78, 0.83, 0.859, 0.858, 0.86],
        "oracles": {"gold": point(0.97, 0.70), "agreement": point(0.86, 0.76)},
        "curves": {
            # unsorted on purpose
            "maxprob": [
                point(0.85, 0.43, threshold=0.9),
                point(0.86, 0.10, threshold=0.99),
                point(0.70, 0.80, threshold=0.5),
                point(0.80, 0.60, threshold=0.7),
            ],
            "patience": [point(0.86, 0.20, patience=3), point(0.852, 0.35, patience=2), point(0.75, 0.6, patience=1)],
            "consistentee": [point(0.866, 0.51, threshold=0.2), point(0.83, 0.7, threshold=0.4)],
            "static_layer": [point(0.68, 5 / 6, layer=1), point(0.78, 4 / 6, layer=2)],
        },
        "measured": [
            {"rule": "maxprob", "params": {"threshold": 0.9}, "batch_size": 1, "accuracy": 0.85, "avg_layers": 3.42,
             "speedup_measured": 1.4, "speedup_ideal": 1.75, "matches_simulation": True,
             "seconds_plain": 2.5, "seconds_early_exit": 1.7857},
            {"rule": "maxprob", "params": {"threshold": 0.9}, "batch_size": 32, "accuracy": 0.85, "avg_layers": 3.42,
             "speedup_measured": 1.225, "speedup_ideal": 1.75, "matches_simulation": False},
        ],
        "tolerance": 0.01,
        "operating_points": {"maxprob": point(0.85, 0.43, threshold=0.9)},
    }


# ------------------------------------------------------------------------------------------- operating_point


def test_operating_point_picks_most_saved_within_tolerance():
    curve = make_results()["curves"]["maxprob"]
    chosen = operating_point(curve, full_accuracy=0.86, tolerance=0.01)
    assert chosen is not None and chosen["params"] == {"threshold": 0.9}
    # a looser tolerance admits the 0.80 point that saves more
    assert operating_point(curve, 0.86, 0.06)["params"] == {"threshold": 0.7}
    # zero tolerance: only the point matching full accuracy
    assert operating_point(curve, 0.86, 0.0)["params"] == {"threshold": 0.99}


def test_operating_point_none_when_nothing_within_tolerance():
    curve = make_results()["curves"]["static_layer"]
    assert operating_point(curve, 0.86, 0.01) is None
    assert operating_point([], 0.86, 0.01) is None


def test_operating_point_ties_go_to_higher_accuracy():
    curve = [point(0.855, 0.5, t=1), point(0.87, 0.5, t=2), point(0.86, 0.5, t=3), point(0.9, 0.1, t=4)]
    assert operating_point(curve, 0.86, 0.01)["params"] == {"t": 2}
    # full tie: the first one listed
    same = [point(0.86, 0.5, t=1), point(0.86, 0.5, t=2)]
    assert operating_point(same, 0.86, 0.01)["params"] == {"t": 1}


def test_operating_point_boundary_survives_float_rounding():
    # 0.8 - 0.1 == 0.7000000000000001 in floating point; 0.7 must still be within ten points
    assert 0.7 < 0.8 - 0.1
    assert operating_point([point(0.7, 0.4, t=1)], 0.8, 0.1) is not None
    assert operating_point([point(0.6999, 0.4, t=1)], 0.8, 0.1) is None


def test_operating_point_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        operating_point([point(0.9, 0.4)], 0.9, -0.01)


# ------------------------------------------------------------------------------------------ area_under_curve


def test_area_under_curve_steps_over_front():
    curve = [point(0.6, 1.0), point(0.9, 0.0), point(0.8, 0.5)]  # unsorted
    # best accuracy saving >= s: 0.8 for s in (0, 0.5], 0.6 for s in (0.5, 1]
    assert area_under_curve(curve) == pytest.approx(0.5 * 0.8 + 0.5 * 0.6)


def test_area_under_curve_ignores_dominated_points():
    front = [point(0.9, 0.0), point(0.8, 0.5), point(0.6, 1.0)]
    dominated = [point(0.7, 0.4), point(0.5, 0.9), point(0.75, 0.5), point(0.9, 0.0)]
    assert area_under_curve(front + dominated) == pytest.approx(0.7)
    # a point that lifts the front does change the area
    lifted = front + [point(0.88, 0.25)]
    assert area_under_curve(lifted) == pytest.approx(0.25 * 0.88 + 0.25 * 0.8 + 0.5 * 0.6)


def test_area_under_curve_credits_only_reached_savings():
    # nothing saves more than 0.6: best(s) = 0 beyond it; a rule reaching further scores more
    short = [point(0.8, 0.2), point(0.6, 0.6)]
    assert area_under_curve(short) == pytest.approx(0.2 * 0.8 + 0.4 * 0.6)
    assert area_under_curve(short + [point(0.5, 0.9)]) > area_under_curve(short)


def test_area_under_curve_degenerate():
    assert area_under_curve([]) == 0.0
    assert area_under_curve([point(0.9, 0.5)]) == pytest.approx(0.45)  # one point: 0.9 up to s = 0.5


# ------------------------------------------------------------------------------------------------- report


def test_write_report_writes_markdown_and_pngs(tmp_path):
    results = make_results()
    original = copy.deepcopy(results)
    path = write_report(results, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    assert results == original, "write_report must not modify its input"

    for name in ("tradeoff.png", "per_layer_accuracy.png"):
        png = tmp_path / "out" / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == PNG_MAGIC, name

    text = path.read_text(encoding="utf-8")
    for rule in results["curves"]:
        assert rule in text, rule
    assert "simulated" in text.lower() and "measured" in text.lower()
    assert "Simulated over cached logits" in text
    assert "Measured (real layer skipping, wall clock)" in text
    assert "](tradeoff.png)" in text and "](per_layer_accuracy.png)" in text
    assert "tiny-bert" in text and "sst2" in text and "validation" in text and "872" in text
    assert "86.0" in text  # full accuracy, one decimal
    assert "| maxprob | threshold=0.9 | 85.0 | 3.42 | 43.0 |" in text  # operating point row
    assert "none within 1.0 pt" in text  # static_layer has no point within tolerance
    assert "| 1.40x | 1.75x | 0.80 |" in text  # measured / ideal of the first measured run: 1.4 / 1.75
    assert "| 1.23x | 1.75x | 0.70 |" in text  # second run: 1.225 / 1.75
    assert "some rows did not exit at the same layer" in text  # one run does not match the simulation


def test_write_report_without_measured_runs(tmp_path):
    results = make_results()
    results["measured"] = []
    for key in ("tolerance", "operating_points"):
        del results[key]
    text = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert "No measured runs" in text
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC


def test_format_table_first_row_is_full_then_rules_and_oracles():
    results = make_results()
    lines = format_table(results).splitlines()
    assert lines[0].split()[0] == "rule"
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[0] == "full"
    assert lines[2].split()[2] == "86.0"
    firsts = [line.split()[0] for line in lines[3:] if line.strip()]
    for name in [*results["curves"], "oracle:gold", "oracle:agreement"]:
        assert name in firsts, name
    maxprob = next(line for line in lines if line.startswith("maxprob"))
    assert "threshold=0.9" in maxprob and "85.0" in maxprob and "43.0" in maxprob


def test_report_shows_spread_and_flags_implausible_timings(tmp_path):
    from layerexit.evaluation.timing import spread, timing_warnings

    results = make_results()
    entry = {"rule": "maxprob", "params": {"threshold": 0.9}, "batch_size": 1, "accuracy": 0.85, "avg_layers": 4.26,
             "speedup_measured": 3.08, "speedup_ideal": 1.41, "overhead_heads": -0.577, "rounds": 1,
             "speedup_spread": spread([3.08]), "simulated_accuracy": 0.86}
    entry["warnings"] = timing_warnings(entry)
    results["measured"] = [entry]
    text = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert "spread (min–max)" in text and "| 3.08x | 3.08–3.08x | 1.41x | 2.18 |" in text
    assert "**Timing warnings**" in text and "above the ideal L/avg_layers 1.41x" in text
    assert "negative beyond noise" in text and "no spread" in text
    assert "simulated accuracy, same rows %" in text and "| 86.0 |" in text
    assert "WARNING (maxprob, batch 1)" in format_summary(results)


def test_report_without_warnings_has_no_warning_section(tmp_path):
    assert "Timing warnings" not in write_report(make_results(), tmp_path).read_text(encoding="utf-8")
