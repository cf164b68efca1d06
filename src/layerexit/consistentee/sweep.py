"""The ``consistentee`` curve: one point per trained alpha, each model's policy at a fixed threshold.

The paper (Zeng et al., AAAI 2024, Figure 3) draws its accuracy-speed trade-off by training with several
alphas; a single model's threshold sweep is the separate ``consistentee-threshold`` curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import AutoTokenizer

from ..data import Encoded, TextClassificationData, check_labels
from ..errors import bad_value
from ..evaluation.cache import collect_logits
from ..evaluation.simulate import simulate
from ..model import MultiExitModel
from ..rules.policy import PolicyRule


def alpha_sweep_curve(run_dirs: list[str | Path], data: TextClassificationData, threshold: float = 0.5,
                      batch_size: int = 128) -> list[dict]:
    """Simulated POINTs (params: alpha, threshold, run) of ConsistentEE models trained with different alphas."""
    points = []
    for run in run_dirs:
        run = Path(run)
        settings = run / "consistentee.json"
        if not settings.is_file():
            raise bad_value("--consistentee-runs", str(run), "give `final` folders written by "
                            "`layerexit train --method consistentee` (they hold consistentee.json)")
        model = MultiExitModel.from_pretrained(run)
        check_labels(data, model.config.num_labels, model.config.label_names)
        cache = collect_logits(model, Encoded(data, AutoTokenizer.from_pretrained(run), model.config.max_length),
                               batch_size, progress=False)
        alpha = json.loads(settings.read_text())["alpha"]
        params = {"alpha": alpha, "threshold": threshold, "run": str(run)}
        points.append(simulate(PolicyRule(threshold), cache.logits, signals=cache.signals).point(
            cache.labels, model.config.num_layers, params))
    return sorted(points, key=lambda p: p["params"]["alpha"])


def set_alpha(model: MultiExitModel, alpha: float) -> MultiExitModel:
    """Turn an alpha-conditioned model's dial: its policies use ``alpha`` wherever a rule gives none (the
    ``consistentee`` rule, the logit cache's ``policy`` signal, the report)."""
    if model.policies is None or not model.alpha_conditioned:
        raise bad_value("--alpha", alpha, "only an alpha-conditioned ConsistentEE model has an alpha dial; train "
                        "one with `layerexit train --method consistentee --alpha-range LOW,HIGH`")
    if not math.isfinite(float(alpha)):
        raise bad_value("--alpha", alpha, "use a finite alpha in the trained range (larger alpha: earlier exits)")
    low, high = model.config.policy_alpha_range
    if not low <= float(alpha) <= high:
        import warnings

        warnings.warn(f"alpha={alpha} lies outside the range [{low}, {high}] the policy was trained on",
                      stacklevel=2)
    model.config.policy_alpha = float(alpha)
    return model
