"""What a server holds: the engine, the exit rule (and per-request variants of it), the scheduler.

:func:`load_service` builds it from a checkpoint folder and one of three rule sources:

- ``rule`` + ``threshold`` (or ``params``): a registered rule, e.g. ``maxprob`` at 0.9;
- ``calibration`` + ``target_accuracy``: PCEE-WS (or ``rule="pcee"``) from the ``rules.json`` that
  ``layerexit calibrate`` wrote, at the asked target accuracy;
- ``budget`` (with ``calibration``): the online :class:`~.budget.BudgetController`, its starting threshold fitted
  on the calibration folder's validation logits (``fit_logits.pt``).

Per request, a client may ask for its own ``threshold`` (rules with a threshold; with a budget it means
max-prob at that threshold, outside the budget) or, with a PCEE rule, its own ``target_accuracy``. Variants are
cached per value, so rows asking for the same value share one rule object (and rule groups in a step).
"""

from __future__ import annotations

import collections
import math
import os
from concurrent.futures import Future
from pathlib import Path

from ..preflight import is_checkpoint
from ..errors import LayerExitError, bad_value
from ..rules import PCEE, ExitRule, MaxProb, make_rule
from .budget import BudgetController
from .engine import Engine, Row
from .schedulers import Scheduler, make_scheduler

#: allowed per-request threshold of each rule with one: (low, high, whether low is allowed)
THRESHOLD_RANGES = {"maxprob": (0.0, 1.0, True), "maxprob-ts": (0.0, 1.0, True), "margin": (0.0, 1.0, True),
                    "patience-confidence": (0.0, 1.0, True), "budget": (0.0, 1.0, True),
                    "entropy": (0.0, math.inf, False), "consistentee": (0.0, 1.0, True)}
TARGET_RANGE = (0.0, 1.0)  # (0, 1]


class RequestError(LayerExitError):
    """A request parameter out of range (HTTP 422): the message names it, its value and the allowed range."""


class RuleSet:
    """The server's rule and its per-request variants (bounded cache)."""

    def __init__(self, rule: ExitRule, controller: BudgetController | None = None, source: str = "rule"):
        self.base, self.controller, self.source = rule, controller, source
        self._cache: collections.OrderedDict = collections.OrderedDict()

    @property
    def name(self) -> str:
        return self.base.name

    def default(self) -> ExitRule:
        return self.controller.rule() if self.controller is not None else self.base

    def for_request(self, threshold: float | None = None, target_accuracy: float | None = None) -> ExitRule:
        if threshold is not None and target_accuracy is not None:
            raise RequestError("threshold and target_accuracy are both set; ask for one of them")
        if threshold is None and target_accuracy is None:
            return self.default()
        key = ("threshold", float(threshold)) if threshold is not None else ("target", float(target_accuracy))
        if key not in self._cache:
            self._cache[key] = self._threshold(key[1]) if threshold is not None else self._target(key[1])
            if len(self._cache) > 256:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _threshold(self, value: float) -> ExitRule:
        name = self.base.name
        if name not in THRESHOLD_RANGES:
            hint = (" ask for target_accuracy instead" if isinstance(self.base, PCEE) else
                    " start the server with a rule that has one (e.g. --rule maxprob)")
            raise RequestError(f"threshold={value!r} is invalid: this server's rule {name!r} has no threshold;{hint}")
        low, high, closed = THRESHOLD_RANGES[name]
        ok = math.isfinite(value) and (low <= value if closed else low < value) and value <= high
        if not ok:
            shown = f"{'[' if closed else '('}{low}, {high}]"
            raise RequestError(f"threshold={value!r} is invalid for rule {name!r}: allowed range {shown}")
        if self.controller is not None:
            return MaxProb(value)
        if hasattr(self.base, "with_threshold"):
            return self.base.with_threshold(value)
        return make_rule(name, **{**self.base.params, "threshold": value})

    def _target(self, value: float) -> ExitRule:
        if not isinstance(self.base, PCEE):
            raise RequestError(f"target_accuracy={value!r} is invalid here: this server's rule is {self.name!r}; "
                               "start it with --calibration DIR --target-accuracy T to serve accuracy targets")
        if not (math.isfinite(value) and TARGET_RANGE[0] < value <= TARGET_RANGE[1]):
            raise RequestError(f"target_accuracy={value!r} is invalid: allowed range (0, 1], a fraction such as 0.9")
        return self.base.with_target(value)

    def info(self) -> dict:
        out = {"name": self.base.name, "source": self.source, "params": _jsonable(self.base.params),
               "per_request": ("threshold" if self.base.name in THRESHOLD_RANGES else "target_accuracy"
                               if isinstance(self.base, PCEE) else None)}
        if self.base.name in THRESHOLD_RANGES:
            low, high, closed = THRESHOLD_RANGES[self.base.name]
            out["threshold_range"] = [low, high if math.isfinite(high) else None]
        if isinstance(self.base, PCEE):
            out["target_accuracy_range"] = [0.0, 1.0]
        if self.controller is not None:
            out["budget"] = self.controller.info()
        return out


class Service:
    """Engine + rules + scheduler: turns texts into rows, queues them, hands back one future per text."""

    def __init__(self, engine: Engine, rules: RuleSet, scheduler: Scheduler, max_client_batch: int = 32,
                 model_id: str = ""):
        self.engine, self.rules, self.scheduler = engine, rules, scheduler
        self.max_client_batch, self.model_id = int(max_client_batch), model_id

    def submit(self, texts: list[str], pairs: list[str] | None = None, threshold: float | None = None,
               target_accuracy: float | None = None, truncate: bool = True) -> list[Future]:
        """Queue the texts (raises RequestError, InputTooLong, QueueFull, ShuttingDown before queueing)."""
        rule = self.rules.for_request(threshold, target_accuracy)
        encoded = self.engine.encode(texts, pairs, truncate)
        rows = [self.engine.new_row(ids, types, rule) for ids, types in encoded]
        controller = self.rules.controller if rule is self.rules.default() and self.rules.controller else None
        if controller is not None:  # the budget's own rows: admitted at the current threshold, observed on exit
            for row in rows:
                controller.admit(row.id)
                row.on_exit = lambda r, p, c=controller: c.observe(r.id, p.cost)
        try:
            self.scheduler.submit(rows)
        except Exception:
            if controller is not None:
                for row in rows:
                    controller.cancel(row.id)
            raise
        return [row.future for row in rows]

    def info(self) -> dict:
        s = self.scheduler
        return {"model_id": self.model_id, "process": os.getpid(), "model_type": self.engine.config.model_type,
                "num_layers": self.engine.num_layers, "labels": self.engine.labels,
                "exit_feature": self.engine.config.exit_feature, "max_input_length": self.engine.max_length,
                "max_client_batch_size": self.max_client_batch, "rule": self.rules.info(),
                "scheduler": {"name": s.name, "policy": getattr(s, "policy", None), "max_batch": s.max_batch,
                              "max_wait_ms": s.max_wait * 1000.0, "max_queue": s.max_queue}}


def find_default_model() -> Path | None:
    """The model ``make demo`` writes (``runs/demo/model/best``), if it exists here."""
    for candidate in (Path("runs/demo/model/best"), Path("runs/demo/model/final")):
        if is_checkpoint(candidate):
            return candidate
    return None


def load_rules_for(engine: Engine, rule: str | None = None, threshold: float | None = None,
                   params: dict | None = None, calibration: str | Path | None = None,
                   target_accuracy: float | None = None, budget: float | None = None) -> RuleSet:
    """The server's :class:`RuleSet` from one of the three sources (see the module docstring)."""
    params = dict(params or {})
    if budget is not None:
        if calibration is None:
            raise bad_value("budget", budget, "the online budget starts from a threshold fitted on validation "
                            "logits: also give --calibration DIR (written by `layerexit calibrate`)")
        if target_accuracy is not None or threshold is not None:
            raise bad_value("budget", budget, "give either --budget, --target-accuracy or --threshold, not several")
        from ..evaluation.cache import LogitCache

        from ..rules.fitting import check_calibration_backend

        check_calibration_backend(calibration, engine.model.backend.name)
        path = Path(calibration) / "fit_logits.pt"
        if not path.is_file():
            raise bad_value("calibration", str(calibration), "it has no fit_logits.pt; write it with `layerexit "
                            "calibrate --model M --split validation --output DIR`")
        controller = BudgetController.from_cache(budget, LogitCache.load(path))
        controller.rule().bind(engine.num_layers, engine.config.num_labels)
        return RuleSet(controller.rule(), controller, source=f"budget {budget} (online, {path})")
    if calibration is not None or target_accuracy is not None:
        if calibration is None:
            raise bad_value("target_accuracy", target_accuracy, "accuracy targets need fitted PCEE tables: also "
                            "give --calibration DIR (written by `layerexit calibrate`)")
        from ..rules.fitting import check_calibration_backend, load_rules

        check_calibration_backend(calibration, engine.model.backend.name)
        saved = load_rules(Path(calibration) / "rules.json")
        name = rule or "pcee-ws"
        if name not in saved:
            raise bad_value("rule", name, f"{calibration}/rules.json holds {', '.join(sorted(saved))}")
        fitted = saved[name]
        if target_accuracy is not None:
            if not isinstance(fitted, PCEE):
                raise bad_value("target_accuracy", target_accuracy, f"rule {name!r} takes no target; use pcee or pcee-ws")
            fitted = fitted.with_target(target_accuracy)
        elif threshold is not None and hasattr(fitted, "with_threshold"):
            fitted = fitted.with_threshold(threshold)
        fitted.bind(engine.num_layers, engine.config.num_labels)
        return RuleSet(fitted, source=f"calibration {calibration}")
    name = rule or "maxprob"
    if threshold is not None:
        params["threshold"] = threshold
    built = make_rule(name, **params)
    if built.needs_targets:
        raise bad_value("rule", name, "oracles need the gold answers and cannot serve; use maxprob, entropy, ...")
    built.bind(engine.num_layers, engine.config.num_labels)
    return RuleSet(built, source="rule")


def load_service(model: str | Path | None = None, *, rule: str | None = None, threshold: float | None = None,
                 params: dict | None = None, calibration: str | Path | None = None,
                 target_accuracy: float | None = None, budget: float | None = None, scheduler: str = "layer",
                 policy: str = "largest", max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 max_client_batch: int = 32, threads: int | None = None, backend: str = "eager") -> Service:
    """Load a checkpoint folder and build a (not yet started) :class:`Service`.

    ``backend`` chooses how the layers run (``layerexit.execution``: eager, bf16, int8, onnx, onnx-int8); a
    saved ``optimized/<backend>/`` beside the checkpoint is loaded instead of being built again. Rules from a
    calibration folder keep the thresholds they were fitted with: fit them on the same backend.
    """
    import torch
    from transformers import AutoTokenizer

    from ..model import MultiExitModel
    from ..execution import own_process_options
    from ..catalog import BACKENDS as BACKEND_NAMES
    from .schedulers import POLICIES, SCHEDULERS

    # every option is checked before the model loads
    if scheduler not in SCHEDULERS:
        raise bad_value("scheduler", scheduler, f"use one of {', '.join(SCHEDULERS)}")
    if policy not in POLICIES:
        raise bad_value("policy", policy, f"use one of {', '.join(POLICIES)}")
    if backend not in BACKEND_NAMES:
        raise bad_value("backend", backend, f"use one of {', '.join(sorted(BACKEND_NAMES))}")
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_client_batch", max_client_batch)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise bad_value(name, value, "use a whole number >= 1")
    if not max_wait_ms >= 0:
        raise bad_value("max_wait_ms", max_wait_ms, "use a number of milliseconds >= 0")
    if calibration is None and budget is None and target_accuracy is None:
        make_rule(rule or "maxprob", **{**(params or {}), **({"threshold": threshold} if threshold is not None
                                                              else {})})  # unknown rule or bad value: now
    if model is None:
        model = find_default_model()
        if model is None:
            raise bad_value("--model", None, "no model given and none from `make demo` here (runs/demo/model/best): "
                            "run `make demo` (or `layerexit demo --quick`) first, or pass --model DIR written by "
                            "`layerexit train`")
    folder = Path(model)
    if not is_checkpoint(folder):
        raise bad_value("--model", str(model), "give a checkpoint folder written by `layerexit train` (it holds "
                        "config.json with model_type 'layerexit' and the weights)")
    if threads:
        torch.set_num_threads(int(threads))
    network = MultiExitModel.from_pretrained(folder)
    network.optimize(backend, saved=folder, **own_process_options(backend))
    engine = Engine(network, AutoTokenizer.from_pretrained(folder))
    rules = load_rules_for(engine, rule, threshold, params, calibration, target_accuracy, budget)
    sched = make_scheduler(scheduler, engine, max_batch, max_wait_ms, max_queue, policy)
    return Service(engine, rules, sched, max_client_batch, model_id=str(folder))


def _jsonable(params: dict) -> dict:
    return {k: (v if v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))
                else str(v)) for k, v in params.items()}


__all__ = ["RequestError", "RuleSet", "Service", "load_service", "load_rules_for", "find_default_model", "Row"]
