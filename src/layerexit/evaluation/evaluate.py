"""`layerexit evaluate`: cache every exit's logits once, sweep every rule over its thresholds (simulated),
confirm each rule's operating point with the real engine and a wall clock (measured), write results.json,
plots and a Markdown report.
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import DEFAULT_ROUNDS
from ..data import Encoded, TextClassificationData, check_labels
from ..errors import LayerExitError
from ..io import write_json_atomic
from ..model import MultiExitModel
from ..rules import DEFAULT_SWEEP, RULES, AgreementOracle, GoldOracle, make_rule
from .benchmark import compare_with_simulation, speed_report
from .cache import LogitCache, collect_logits, tag_split
from .control import ControlOptions, control_report, write_control_figures
from .metrics import DEFAULT_TOLERANCE, operating_point
from .report import write_report
from .simulate import per_layer_accuracy, simulate


def curve_name(rule_name: str) -> str:
    """The key of a rule's curve in results.json (ConsistentEE's threshold sweep is "consistentee-threshold")."""
    return RULES.get(rule_name, "rules").curve_name or rule_name


def sweep(cache: LogitCache, rule_names: list[str]) -> dict[str, list[dict]]:
    """Simulated curve of every rule, keyed by curve name: one POINT per parameter setting of its sweep grid
    (thresholds at the quantiles of the rule's own signal on this cache, see ``ExitRule.sweep_grid``)."""
    num_layers = cache.num_layers
    curves = {}
    for name in rule_names:
        cls = RULES.get(name, "rules")
        points = []
        for params in cls.sweep_grid(cache.logits, cache.signals):
            rule = cls(**params)
            points.append(simulate(rule, cache.logits, signals=cache.signals).point(cache.labels, num_layers,
                                                                                     rule.params))
        curves[curve_name(name)] = points
        dial = cls.dial_grid(cache.signals) if hasattr(cls, "dial_grid") else []
        if dial:  # an alpha-conditioned ConsistentEE policy: its alpha dial is a curve of its own
            curves[cls.dial_curve_name] = [
                simulate(cls(**params), cache.logits, signals=cache.signals).point(cache.labels, num_layers, params)
                for params in dial]
    return curves


def simulated_results(cache: LogitCache, model_name: str, data: TextClassificationData,
                      rule_names: list[str] = DEFAULT_SWEEP, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Everything in results.json that comes from the cache alone."""
    num_layers = cache.num_layers
    accs = per_layer_accuracy(cache.logits, cache.labels)
    oracles = {
        "gold": simulate(GoldOracle(), cache.logits, cache.labels).point(cache.labels, num_layers, {}),
        "agreement": simulate(AgreementOracle(), cache.logits, cache.final_predictions).point(
            cache.labels, num_layers, {}),
    }
    usable = [n for n in rule_names if all(s in cache.signals for s in RULES.get(n, "rules").needs)]
    curves = sweep(cache, usable)
    return {
        "model": model_name, "dataset": data.name, "split": data.split, "num_layers": num_layers,
        "num_examples": int(cache.labels.numel()), "full": {"accuracy": accs[-1]},
        "per_layer_accuracy": accs, "oracles": oracles, "curves": curves, "tolerance": tolerance,
        "operating_points": {name: operating_point(points, accs[-1], tolerance) for name, points in curves.items()},
        "measured": [],
    }


def measured_results(model: MultiExitModel, encoded: Encoded, cache: LogitCache, results: dict,
                     rule_names: list[str], batch_sizes: list[int], limit: int | None, rounds: int) -> list[dict]:
    """Run the operating point of each rule in ``rule_names`` through the engine, timed against the full model.

    Each entry also records the simulation of the same rule over the same rows (see
    ``compare_with_simulation``).
    """
    rules = {}
    for name in rule_names:
        point = results["operating_points"].get(curve_name(name))
        if point is not None:
            rules[name] = make_rule(name, **point["params"])
    if not rules:
        return []
    return [entry for batch_size in batch_sizes
            for entry in compare_with_simulation(speed_report(model, encoded, rules, batch_size, limit=limit,
                                                              rounds=rounds), cache, rules)]


def benchmark(model: MultiExitModel, tokenizer, data: TextClassificationData, rule_name: str,
              params: dict | None = None, tolerance: float = DEFAULT_TOLERANCE, batch_sizes: tuple[int, ...] = (1, 32),
              examples: int | None = 500, rounds: int = DEFAULT_ROUNDS) -> list[dict]:
    """Time one rule against the full model at each batch size (``speed_report`` entries, ``exit_layers``
    dropped). Without ``params`` the rule runs at its operating point, found by simulation on the same data:
    the most layers saved within ``tolerance`` of the full model's accuracy."""
    check_labels(data, model.config.num_labels, model.config.label_names)
    encoded = Encoded(data, tokenizer, model.config.max_length)
    if not params and rule_name != "full":
        cache = collect_logits(model, encoded)
        full = per_layer_accuracy(cache.logits, cache.labels)[-1]
        point = operating_point(sweep(cache, [rule_name])[curve_name(rule_name)], full, tolerance)
        if point is None:
            raise LayerExitError(f"--rule={rule_name!r}: no setting stays within --tolerance={tolerance} of "
                                 "the full model; raise --tolerance or give --param")
        params = point["params"]
    rule = make_rule(rule_name, **(params or {}))
    entries = [entry for batch_size in batch_sizes
               for entry in speed_report(model, encoded, {rule_name: rule}, batch_size, examples, rounds)]
    for entry in entries:
        entry.pop("exit_layers")
    return entries


def evaluate(
    model: MultiExitModel,
    tokenizer,
    data: TextClassificationData,
    output_dir: str | Path,
    rule_names: list[str] = DEFAULT_SWEEP,
    tolerance: float = DEFAULT_TOLERANCE,
    measure_rules: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    measure_examples: int | None = 500,
    rounds: int = DEFAULT_ROUNDS,
    batch_size: int = 128,
    control: ControlOptions | None = None,
    consistentee_runs: list[str | Path] = (),
    provenance: dict | None = None,
) -> dict:
    """The whole evaluation; writes results.json, logits.pt, report.md and plots into ``output_dir`` once.

    ``provenance`` (the evaluation's options, the checkpoint's effective training configuration, versions)
    is stored as ``results["provenance"]`` so a results.json says how its model was trained and evaluated.

    ``control`` adds accuracy control and budgets (rules fitted on another split; see
    ``layerexit.evaluation.control``): its checks run before any timing, its results go into
    ``results["controllability"]`` and the report, its δ-sweeps into the curves. ``consistentee_runs``
    (ConsistentEE ``final`` folders trained with different alphas) add the ``consistentee`` curve.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_labels(data, model.config.num_labels, model.config.label_names)
    encoded = Encoded(data, tokenizer, model.config.max_length)
    cache = tag_split(collect_logits(model, encoded, batch_size), data.split, encoded)
    cache.save(output_dir / "logits.pt")
    results = simulated_results(cache, model.config.backbone, data, rule_names, tolerance)
    if provenance is not None:
        results["provenance"] = provenance
    if consistentee_runs:
        from ..consistentee.sweep import alpha_sweep_curve

        curve = alpha_sweep_curve(list(consistentee_runs), data)
        results["curves"]["consistentee"] = curve
        results["operating_points"]["consistentee"] = operating_point(curve, results["full"]["accuracy"], tolerance)
    if measure_rules is None:
        measure_rules = rule_names
    timing = (list(batch_sizes), measure_examples, rounds)
    if control is not None:  # before the sweep is timed: a split mix-up fails in seconds, not after the timing
        out = control_report(model, tokenizer, encoded, cache, control, *timing)
        results["controllability"] = out["controllability"]
        results["curves"].update(out["curves"])
        write_control_figures(results["controllability"], output_dir)
    if measure_rules and batch_sizes:
        results["measured"] = measured_results(model, encoded, cache, results, measure_rules, *timing)
    write_json_atomic(output_dir / "results.json", results)
    write_report(results, output_dir, tolerance=tolerance)
    return results
