"""One-line early-exit inference: ``layerexit.pipeline(ckpt)("some text")`` -> label, score and exit layer.

:func:`pipeline` loads a checkpoint (folder or hub id) with its tokenizer and an exit rule: one you pass, one
fitted by ``layerexit calibrate`` (``calibration=`` folder), the checkpoint's stored default, or max-prob at its
default threshold. :class:`EarlyExitPipeline` tokenizes in batches and runs the engine, so layers past each
text's exit are skipped.

``transformers.pipeline("text-classification", model=ckpt)`` also works after ``import layerexit``:
:class:`LayerExitForSequenceClassification` (registered with ``AutoModelForSequenceClassification``) runs the
engine with the checkpoint's default rule and returns its logits, so the standard pipeline reports label and
score; ask :func:`pipeline` for the exit layer too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import ModelOutput

from .config import LayerExitConfig
from .errors import LayerExitError, bad_value
from .model import MultiExitModel, as_dtype, resolve_checkpoint
from .rules.base import ExitRule, make_rule

#: the rule used when none is given and the checkpoint stores none
DEFAULT_RULE = "maxprob"
#: the fitted rule taken from a calibration folder when ``rule`` is not given
DEFAULT_CALIBRATED_RULE = "pcee"


class EarlyExitPipeline:
    """Texts in, one ``{"label", "score", "exit_layer"}`` per text out (``exit_layer`` 1-based).

    ``score`` is the softmax probability of the label at the exit taken. Texts are tokenized once (truncated
    to the checkpoint's ``max_length``), grouped by length into batches of ``batch_size`` (right padding) and
    answered in their original order.
    """

    def __init__(self, model: MultiExitModel, tokenizer, rule: ExitRule, batch_size: int = 32):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise bad_value("batch_size", batch_size, "give a whole number of texts per batch, at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rule = rule
        self.batch_size = batch_size

    def __call__(self, texts: str | list[str], batch_size: int | None = None) -> list[dict]:
        texts = _check_texts(texts)
        size = self.batch_size if batch_size is None else batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise bad_value("batch_size", size, "give a whole number of texts per batch, at least 1")
        labels = self.model.config.label_names
        features = self.tokenizer(texts, truncation=True, max_length=self._max_length())
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features]
        # batches of similar length waste little on padding; answers do not depend on the batching
        order = sorted(range(len(texts)), key=lambda i: len(features["input_ids"][i]))
        results: list[dict | None] = [None] * len(texts)
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            batch = self.tokenizer.pad([{k: features[k][i] for k in keep} for i in rows], padding=True,
                                       return_tensors="pt")
            out = self.model.early_exit(**{k: batch[k].to(self.model.device) for k in keep}, rule=self.rule)
            probs = out.logits.float().softmax(dim=-1)  # (b, C)
            score, index = probs.max(dim=-1)
            for row, i, s, layer in zip(rows, index.tolist(), score.tolist(), out.exit_layer.tolist()):
                results[row] = {"label": labels[i], "score": s, "exit_layer": layer}
        return results

    def _max_length(self) -> int:
        limit = self.model.max_positions()
        return min(self.model.config.max_length, limit) if limit else self.model.config.max_length


def pipeline(model: str | Path | MultiExitModel, rule: str | ExitRule | None = None, *, tokenizer=None,
             calibration: str | Path | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, batch_size: int = 32, **rule_params) -> EarlyExitPipeline:
    """Build an :class:`EarlyExitPipeline`.

    model: a checkpoint folder, a hub id, or a loaded :class:`MultiExitModel` (then pass ``tokenizer``).
    rule: an :class:`ExitRule`, or a rule name with its parameters as keywords
        (``pipeline(ckpt, "maxprob", threshold=0.8)``). With ``calibration`` (a folder written by
        ``layerexit calibrate``) the name picks one of its fitted rules (default "pcee"). Without either: the
        checkpoint's stored ``exit_rule``, else max-prob at its default threshold.
    device, dtype: where and in which precision the model runs (default: as loaded / as saved).
    """
    from transformers import AutoTokenizer

    if isinstance(model, MultiExitModel):
        if tokenizer is None:
            raise bad_value("tokenizer", None, "a loaded model needs its tokenizer: pipeline(model, tokenizer=...)"
                            " (or pass the checkpoint folder instead of the model)")
        stored = None
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=as_dtype(dtype))
    else:
        folder = resolve_checkpoint(model)
        loaded = MultiExitModel.from_pretrained(folder, dtype=dtype, device=device)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        stored = _stored_rule(folder)
        model = loaded
    return EarlyExitPipeline(model, tokenizer, choose_rule(rule, rule_params, calibration, stored), batch_size)


def choose_rule(rule, rule_params: dict, calibration, stored: dict | None) -> ExitRule:
    """The rule a pipeline runs: explicit, from a calibration folder, stored in the checkpoint, or the default."""
    from .rules.fitting import load_rules, rule_from_dict

    if isinstance(rule, ExitRule):
        if rule_params or calibration is not None:
            raise bad_value("rule", rule, "pass either a rule object, or a rule name with parameters / calibration=")
        return rule
    if rule is not None and not isinstance(rule, str):
        raise bad_value("rule", type(rule).__name__, "pass a rule name (e.g. 'maxprob') or an ExitRule")
    if calibration is not None:
        path = Path(calibration)
        rules = load_rules(path / "rules.json" if path.is_dir() else path)
        key = rule or DEFAULT_CALIBRATED_RULE
        if key not in rules:
            raise bad_value("rule", key, f"{calibration} holds the fitted rules {sorted(rules)}; pick one of them")
        if rule_params:
            raise bad_value("rule parameters", rule_params, "a fitted rule keeps the parameters it was fitted with")
        return rules[key]
    if rule is not None:
        return make_rule(rule, **rule_params)
    if rule_params:
        raise bad_value("rule parameters", rule_params, "name the rule they belong to, e.g. rule='maxprob'")
    return rule_from_dict(stored) if stored else make_rule(DEFAULT_RULE)


def _stored_rule(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None  # layerexit 0.1 checkpoints store no rule
    from .config import read_json

    return read_json(path, "checkpoint").get("exit_rule")


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise bad_value("texts", texts if not isinstance(texts, (list, tuple)) else [],
                        "pass a string or a non-empty list of strings")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise bad_value("texts", f"items {bad[:10]} are not strings", "pass a string or a list of strings")
    return list(texts)


# --- transformers.pipeline("text-classification", model=ckpt) --------------------------------------------------

@dataclass
class EarlyExitClassifierOutput(ModelOutput):
    """What :class:`LayerExitForSequenceClassification` returns: logits (B, C) and exit_layer (B,)."""

    logits: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None


class LayerExitForSequenceClassification(nn.Module):
    """A layerexit checkpoint as a sequence classifier for transformers' ``text-classification`` pipeline.

    ``forward`` runs the early-exit engine with the checkpoint's stored rule (max-prob if none) and returns the
    logits of the exit each row took. Registered with ``AutoModelForSequenceClassification`` for
    :class:`~layerexit.config.LayerExitConfig`.
    """

    config_class = LayerExitConfig

    def __init__(self, model: MultiExitModel, config: LayerExitConfig, rule: ExitRule):
        super().__init__()
        self.model = model
        self.config = config
        self.rule = rule

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        model = MultiExitModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        folder = resolve_checkpoint(pretrained_model_name_or_path, **hub)
        if not isinstance(config, LayerExitConfig):
            config = model.to_hf_config(exit_rule=_stored_rule(folder))
        return cls(model, config, choose_rule(None, {}, None, config.exit_rule))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def can_generate(self) -> bool:
        return False

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **_) -> EarlyExitClassifierOutput:
        out = self.model.early_exit(input_ids, attention_mask, token_type_ids, rule=self.rule)
        return EarlyExitClassifierOutput(logits=out.logits, exit_layer=out.exit_layer)


AutoModelForSequenceClassification.register(LayerExitConfig, LayerExitForSequenceClassification, exist_ok=True)

__all__ = ["EarlyExitPipeline", "LayerExitForSequenceClassification", "LayerExitError", "pipeline"]
