"""Rules fitted on one split and evaluated on another, and how fitted rules are saved.

**The split contract.** A rule that learns from data (PCEE, temperature-scaled max-prob, budget) is fitted on
a :class:`~layerexit.evaluation.cache.LogitCache` that carries the name of its split (``cache.split``) and
remembers it (``fit_split_``, plus ``fit_data_id_``, a digest of the examples when the cache has one). Two
checks keep fitting and reporting apart:

1. ``fit`` refuses a cache without a split name, and a split whose name says it is test data
   (``test``, ``test.tsv``, ``testing``, ``test-matched`` ...): figures reported on test data must come from
   rules that never saw it.
2. :func:`check_held_out` (called by every evaluation that reports a fitted rule: the controllability report,
   ``layerexit evaluate --calibration``) refuses to evaluate a rule on the split it was fitted on, by name or
   by the examples' digest, so renaming a split does not get around it; and row by row (``fit_row_ids_``,
   one digest per fitting row), so a subset of the fitting rows does not either: more than
   ``MAX_FITTED_SHARE`` (1%) of the evaluated rows fitted on is refused, any smaller overlap is warned about.

**Saving.** :func:`rule_to_dict` / :func:`rule_from_dict` turn any registered rule into JSON and back (fitted
state included); :func:`save_rules` / :func:`load_rules` write a file of named rules (``layerexit calibrate``
writes ``rules.json``; ``layerexit evaluate --calibration`` reads it).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..data import is_test_split
from ..errors import LayerExitError, bad_value
from ..io import write_json_atomic
from .base import RULES, ExitRule, FittedRule, make_rule

RULES_FORMAT = "layerexit-rules/1"


def check_fit_data(rule_name: str, cache: Any) -> None:
    """Refuse fitting data that is not a split-tagged cache, or that is a test split."""
    if not hasattr(cache, "logits") or not hasattr(cache, "labels"):
        raise bad_value(f"{rule_name}.fit(cache)", type(cache).__name__,
                        "pass a LogitCache of a validation split, e.g. collect_logits(model, encoded, split='dev')")
    split = str(getattr(cache, "split", "") or "")
    if not split:
        raise bad_value(f"{rule_name}.fit(cache.split)", split,
                        "the fitting data must be tagged with its split name, e.g. LogitCache(logits, labels, "
                        "split='validation'), so that evaluation can refuse that same split")
    if is_test_split(split):
        raise bad_value(f"{rule_name}.fit(cache.split)", split,
                        "rules are fitted on a validation split and reported on the test split; fitting on test "
                        "data would report figures the rule has already seen: fit on 'validation' or 'dev'")
    if cache.logits.dim() != 3 or cache.logits.shape[1] != cache.labels.shape[0] or cache.labels.numel() == 0:
        raise bad_value(f"{rule_name}.fit(cache)", f"logits {tuple(cache.logits.shape)}, labels "
                        f"{tuple(cache.labels.shape)}", "expected logits (L, N, C) and labels (N,) with N >= 1")


def record_fit_data(rule: FittedRule, cache: Any) -> None:
    rule.fit_split_ = str(cache.split)
    rule.fit_data_id_ = str(getattr(cache, "data_id", "") or "")
    rule.fit_row_ids_ = sorted(set(getattr(cache, "row_ids", None) or []))


#: the share of evaluated rows that may have been fitted on (a few duplicate sentences across splits) before
#: the evaluation is refused; any overlap at all is reported as a warning
MAX_FITTED_SHARE = 0.01


def check_held_out(rule: ExitRule, cache: Any) -> None:
    """Refuse to evaluate a fitted ``rule`` on the split (or the very examples) it was fitted on."""
    fitted_on = getattr(rule, "fit_split_", None)
    if fitted_on is None:
        return
    split = str(getattr(cache, "split", "") or "")
    same_name = bool(split) and split == fitted_on
    fit_id, data_id = getattr(rule, "fit_data_id_", ""), str(getattr(cache, "data_id", "") or "")
    same_data = bool(fit_id) and fit_id == data_id
    fitted_rows = set(getattr(rule, "fit_row_ids_", None) or [])
    rows = list(getattr(cache, "row_ids", None) or [])
    overlap = sum(row in fitted_rows for row in rows)
    if not (same_name or same_data) and overlap > MAX_FITTED_SHARE * len(rows):
        raise LayerExitError(
            f"rule={rule.name!r} is invalid for this evaluation: {overlap} of the {len(rows)} evaluated rows (split "
            f"{split!r}) are rows it was fitted on (split {fitted_on!r}, compared row by row); its accuracy there "
            "says nothing about control on unseen data. Evaluate on rows kept apart from the fitting split (remove "
            "the shared rows, or fit on 'dev' and evaluate on 'test')"
        )
    if overlap and not (same_name or same_data):
        import warnings

        warnings.warn(f"{overlap} of the {len(rows)} evaluated rows were also in the fitting split {fitted_on!r} "
                      "(duplicates across splits?); their figures are not held out", stacklevel=2)
    if same_name or same_data:
        why = f"split {split!r}" if same_name else f"the same examples (split {split!r}, digest {data_id[:12]})"
        raise LayerExitError(
            f"rule={rule.name!r} is invalid for this evaluation: it was fitted on split {fitted_on!r} and would "
            f"be evaluated on {why}; its accuracy there says nothing about control on unseen data. Evaluate on "
            "another split (e.g. fit on 'dev' or 'validation', evaluate on 'test')"
        )


# ------------------------------------------------------------------------------------------------ saving


def rule_to_dict(rule: ExitRule) -> dict:
    """JSON-ready form of any registered rule: name, params, and fitted state for fitted rules."""
    if hasattr(rule, "to_dict"):
        return rule.to_dict()
    return {"name": rule.name, "params": dict(rule.params)}


def rule_from_dict(data: dict) -> ExitRule:
    """Inverse of :func:`rule_to_dict`."""
    if not isinstance(data, dict) or "name" not in data:
        raise bad_value("rule", data, "expected a mapping with 'name' and 'params' (written by save_rules)")
    cls = RULES.get(data["name"], "rule")
    if hasattr(cls, "from_dict"):
        return cls.from_dict(data)
    return make_rule(data["name"], **data.get("params", {}))


def save_rules(path: str | Path, rules: dict[str, ExitRule], **info: Any) -> Path:
    """Write named rules (and any JSON-able ``info``) to ``path`` atomically."""
    payload = {"format": RULES_FORMAT, **info, "rules": {key: rule_to_dict(r) for key, r in rules.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)
    return path


def check_calibration_backend(folder: str | Path, backend: str) -> None:
    """Warn when the rules in ``folder`` (written by ``layerexit calibrate``) were fitted on the logits of
    another layer backend than ``backend``, the one about to use them: quantized layers move logits, so
    thresholds and PCEE tables fitted on one backend are off on another (files without the field: eager)."""
    path = Path(folder) / "rules.json"
    try:
        fitted_on = json.loads(path.read_text()).get("backend", "eager")
    except (OSError, json.JSONDecodeError):
        return  # load_rules reports unreadable files with a clear error
    if fitted_on != backend:
        warnings.warn(f"calibration={str(folder)!r} was fitted with backend {fitted_on!r} but the model runs "
                      f"backend {backend!r}: refit it with `layerexit calibrate --backend {backend}` so thresholds "
                      "and PCEE tables match this backend's logits", stacklevel=2)


def load_rules(path: str | Path) -> dict[str, ExitRule]:
    """Read a file written by :func:`save_rules`: ``{key: rule}``."""
    path = Path(path)
    if not path.is_file():
        raise bad_value("rules file", str(path), "give a rules.json written by `layerexit calibrate`")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise bad_value("rules file", str(path), f"it is not valid JSON: {err}") from None
    if payload.get("format") != RULES_FORMAT:
        raise bad_value("rules file", str(path), f"expected format {RULES_FORMAT!r}; write it with save_rules")
    return {key: rule_from_dict(value) for key, value in payload["rules"].items()}


class CalibratedRule(FittedRule):
    """Base of the rules fitted on a split-tagged cache and saved as JSON.

    Subclasses list their fitted attributes in ``fitted_attributes`` (each a float64 tensor or a plain value)
    and implement ``fit(cache)``, which calls :meth:`_begin_fit` first and returns :meth:`_finish_fit`.
    """

    fitted_attributes: tuple[str, ...] = ()

    def _begin_fit(self, cache: Any) -> None:
        check_fit_data(self.name, cache)

    def _finish_fit(self, cache: Any) -> "CalibratedRule":
        record_fit_data(self, cache)
        return self

    def _check_depth(self, num_layers: int, fitted_layers: int) -> None:
        if fitted_layers != num_layers:
            raise bad_value(f"{self.name} (fitted)", f"{fitted_layers} layers",
                            f"it was fitted on a model with {fitted_layers} layers and is used on one with "
                            f"{num_layers}; fit it on this model's validation logits")

    def to_dict(self) -> dict:
        self.check_fitted()
        import torch

        fitted = {}
        for key in self.fitted_attributes + ("fit_split_", "fit_data_id_", "fit_row_ids_"):
            value = getattr(self, key) if key != "fit_row_ids_" else getattr(self, key, [])
            if isinstance(value, torch.Tensor):
                value = {"tensor": [[None if v != v else v for v in row] for row in value.double().reshape(
                    value.shape[0] if value.dim() > 1 else 1, -1).tolist()], "shape": list(value.shape)}
            elif isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # strict JSON has no inf/nan: "inf" (a budget of 1.0 never exits early)
            fitted[key] = value
        return {"name": self.name, "params": dict(self.params), "fitted": fitted}

    @classmethod
    def from_dict(cls, data: dict) -> "CalibratedRule":
        import torch

        rule = cls(**data.get("params", {}))
        for key, value in (data.get("fitted") or {}).items():
            if isinstance(value, dict) and "tensor" in value:
                flat = [float("nan") if v is None else float(v) for row in value["tensor"] for v in row]
                value = torch.tensor(flat, dtype=torch.float64).reshape(value["shape"])
            elif value in ("inf", "-inf", "nan"):
                value = float(value)
            setattr(rule, key, value)
        return rule
