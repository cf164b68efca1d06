"""The multi-exit wrapper around an unmodified Hugging Face encoder, and its layer-skipping engine.

Everything runs through one primitive, :meth:`MultiExitModel.run_layers`, which runs a range of layers for
the rows held in an :class:`~layerexit.backbones.EncoderState`. Training and the logit cache call it for all
rows and all layers (:meth:`forward`); the engine (:meth:`early_exit`) calls it one layer at a time and lets
rows that exit leave the batch between layers, so layers past an input's exit are never computed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from .backbones import EncoderState, adapter_for
from .config import CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME, LayerExitConfig, MultiExitConfig, read_json, rule_spec
from .errors import LayerExitError, bad_value
from .heads import (ALPHA_GAIN_INIT, FEATURES, POLICY_INPUTS, ExitClassifier, PolicyNetwork, mean_weights,
                    policy_extras, pool_feature)
from .io import atomic_directory
from .resources import resolve_model
from .rules.base import ExitRule

BACKBONE_DIR = "backbone"


def _package_version() -> str:
    try:
        return version("layerexit")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def declared_pooling(name_or_path: str) -> str | None:
    """The pooling a sentence-transformers checkpoint declares for itself (``1_Pooling/config.json``)."""
    path = Path(name_or_path, "1_Pooling", "config.json")
    if not path.is_file():
        return None
    pooling = json.loads(path.read_text())
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    return None


@dataclass
class EarlyExitOutput:
    """Per-row result of the engine: logits (B, C) of the exit taken, exit_layer (B,) 1-based."""

    logits: torch.Tensor
    exit_layer: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)


class MultiExitModel(nn.Module):
    """An encoder with one exit classifier after every layer.

    A plain ``nn.Module`` around an unmodified Hugging Face encoder, registered with ``AutoModel`` for
    :class:`~layerexit.config.LayerExitConfig` (its ``config.json``), so ``AutoModel.from_pretrained(ckpt)``
    returns one after ``import layerexit``. ``model.config`` is the :class:`~layerexit.config.MultiExitConfig`.

    Exit feature per layer (``exit_feature``): ``pooler`` (ConsistentEE, Zeng et al. AAAI 2024: the shared
    pooler on the layer's first token), ``cls`` or ``mean``; see :data:`layerexit.heads.FEATURES`.
    """

    config_class = LayerExitConfig

    def __init__(self, backbone: nn.Module, config: MultiExitConfig):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter_for(backbone)
        if config.exit_feature not in FEATURES:
            raise bad_value("exit_feature", config.exit_feature, f"choose one of {', '.join(FEATURES)}")
        if config.exit_feature == "pooler" and not self.adapter.has_pooler():
            raise bad_value(
                "exit_feature", "pooler", f"{config.model_type} has no pooler here; use 'cls' or 'mean'"
            )
        self.config = config
        self.exits = nn.ModuleList(
            ExitClassifier(config.hidden_size, config.num_labels, config.dropout) for _ in range(config.num_layers)
        )
        self.policies: nn.ModuleList | None = None
        if config.policy_hidden:
            self.add_policies(config.policy_hidden, config.policy_inputs, config.policy_alpha_range,
                              config.policy_alpha)
        from .execution import EagerBackend

        self.backend = EagerBackend().bind(self)  # where run_layers' layers come from; see optimize()

    def add_policies(self, hidden_size: int = 32, inputs: list[str] | tuple[str, ...] = (),
                     alpha_range: list[float] | tuple[float, float] | None = None,
                     alpha: float | None = None) -> "MultiExitModel":
        """Attach one ConsistentEE policy network per layer (saved and loaded with the model).

        ``inputs``: extra policy inputs beside the exit feature (:data:`layerexit.heads.POLICY_INPUTS`; none is
        the paper's form). ``alpha_range`` (low, high) makes the policies alpha-conditioned: alpha becomes an
        input and a dial at inference, ``alpha`` its default.
        """
        unknown = [name for name in inputs if name not in POLICY_INPUTS]
        if unknown:
            raise bad_value("policy_inputs", list(inputs), f"choose from {', '.join(POLICY_INPUTS)}")
        if alpha_range:
            low, high = (float(v) for v in alpha_range)
            if not low < high:
                raise bad_value("alpha_range", list(alpha_range), "give low < high (below 0 pays for depth)")
            alpha_range = [low, high]
        self.config.policy_hidden = int(hidden_size)
        self.config.policy_inputs = list(inputs)
        self.config.policy_alpha_range = list(alpha_range or [])
        if alpha is not None:
            self.config.policy_alpha = float(alpha)
        extra = len(inputs) + (1 if alpha_range else 0)
        device = next(self.exits.parameters()).device
        dtype = next(self.exits.parameters()).dtype
        self.policies = nn.ModuleList(
            PolicyNetwork(self.config.hidden_size, hidden_size, extra, ALPHA_GAIN_INIT if alpha_range else None)
            for _ in range(self.config.num_layers)
        ).to(device=device, dtype=dtype)
        return self

    @property
    def alpha_conditioned(self) -> bool:
        """Whether the policies take the layer cost alpha as an input (a dial at inference)."""
        return bool(self.config.policy_alpha_range)

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        name_or_path: str,
        num_labels: int,
        exit_feature: str | None = None,
        label_names: list[str] | None = None,
        dropout: float = 0.1,
        max_length: int = 128,
    ) -> "MultiExitModel":
        """Wrap a pretrained encoder (hub name or local folder) and add fresh exits."""
        if int(num_labels) < 2:
            raise bad_value("num_labels", num_labels, "a classifier needs at least 2 labels")
        hf_config = _load_hf_config(name_or_path)
        adapter_for(_ConfigOnly(hf_config))  # unsupported architecture: fail before loading any weights
        backbone = AutoModel.from_pretrained(name_or_path)
        return cls.from_module(backbone, num_labels, exit_feature, label_names, dropout, max_length, name_or_path)

    @classmethod
    def from_module(
        cls,
        backbone: nn.Module,
        num_labels: int,
        exit_feature: str | None = None,
        label_names: list[str] | None = None,
        dropout: float = 0.1,
        max_length: int = 128,
        name: str | None = None,
    ) -> "MultiExitModel":
        """Wrap an already built backbone module (tiny random models in tests, or your own)."""
        adapter = adapter_for(backbone)
        name = name or getattr(backbone.config, "_name_or_path", "") or backbone.config.model_type
        feature = exit_feature or declared_pooling(name) or adapter.default_feature
        if exit_feature is None and feature == "pooler" and not adapter.has_pooler():
            feature = "cls"  # only the default falls back; an explicit "pooler" fails loudly in __init__
        config = MultiExitConfig(
            backbone=str(name),
            model_type=backbone.config.model_type,
            num_layers=adapter.num_layers,
            hidden_size=adapter.hidden_size,
            num_labels=int(num_labels),
            exit_feature=feature,
            dropout=dropout,
            label_names=list(label_names) if label_names else [str(i) for i in range(int(num_labels))],
            backbone_fingerprint=fingerprint(backbone.config, adapter.num_layers, adapter.hidden_size),
            max_length=max_length,
            layerexit_version=_package_version(),
        )
        return cls(backbone, config)

    # --- the primitive -------------------------------------------------------------------------------
    def start(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None) -> EncoderState:
        """Embed a batch of texts (input_ids, attention_mask: (B, T)) or of images (pixel_values: (B, C, H, W)):
        the state before layer 0."""
        if pixel_values is not None:
            state = self.adapter.start_images(pixel_values)
        elif self.backend.computes_embeddings:  # one runtime call instead of the embedding modules' host ops
            state = EncoderState(self.backend.embed(input_ids, token_type_ids), attention_mask, self.adapter.prepare)
        else:
            state = self.adapter.start(input_ids, attention_mask, token_type_ids)
        dtype = self.backend.hidden_dtype
        if dtype is not None and state.hidden.dtype != dtype:  # the backend's layers take another dtype (bf16)
            state = EncoderState(state.hidden.to(dtype), state.attention_mask, state.prepare)
        return state

    def run_layers(self, state: EncoderState, start: int, stop: int) -> EncoderState:
        """Run layers ``start..stop-1`` (0-based) for the rows of ``state``; returns the new state."""
        hidden = state.hidden
        self._refuse_training()
        run_layer = self.backend.run_layer
        for index in range(start, stop):
            hidden = run_layer(index, hidden, state)  # (n, T, H)
        return state.with_hidden(hidden)

    def _refuse_training(self) -> None:
        if self.backend.name != "eager" and self.training:
            raise LayerExitError(f"backend={self.backend.name!r} is for inference: call model.eval(), or "
                                 "model.optimize('eager') before training")

    # --- layer backends ------------------------------------------------------------------------------
    def optimize(self, backend: "str | LayerBackend" = "eager", saved: str | Path | None = None,
                 **options) -> "LayerBackend":
        """Choose where the engine's layers come from: ``eager`` (the backbone's own), ``bf16``, ``int8``,
        ``onnx`` or ``onnx-int8`` (see :mod:`layerexit.execution`); returns the bound backend.

        ``saved`` is where :meth:`save_optimized` wrote the backend: a checkpoint folder (its
        ``optimized/<backend>/`` is used when present, else the backend is built) or that subfolder itself
        (it must hold the backend). Without it the backend is built now (quantized or exported from this
        model's layers). Call it after moving the model to its device and
        dtype. Quantization moves logits: fit rules and thresholds with the backend that serves (the logit
        cache runs through it).
        """
        from .execution import OPTIMIZED_DIR, LayerBackend, make_backend

        chosen = backend if isinstance(backend, LayerBackend) else make_backend(str(backend), **options)
        folder = None if saved is None or not chosen.saves_files else Path(saved)
        if folder is not None and ((folder / CONFIG_NAME).is_file() or (folder / HF_CONFIG_NAME).is_file()):
            # a checkpoint folder: its optimized/<name>/ when present, else build
            inside = folder / OPTIMIZED_DIR / chosen.name
            folder = inside if inside.is_dir() else None
        chosen.bind(self, saved=folder)
        self.eval()
        self.backend = chosen
        return chosen

    def save_optimized(self, checkpoint: str | Path) -> Path | None:
        """Write the current backend's exported graphs or int8 weights to ``<checkpoint>/optimized/<backend>/``
        (atomically); returns that folder, or None for backends that have nothing to save (eager, bf16)."""
        from .execution import OPTIMIZED_DIR

        if not self.backend.saves_files:
            return None
        target = Path(checkpoint) / OPTIMIZED_DIR / self.backend.name
        with atomic_directory(target) as tmp:
            self.backend.save(tmp)
        return target

    def _head_dtype(self) -> torch.dtype:
        return self.exits[0].linear.weight.dtype

    def exit_feature(self, state: EncoderState) -> torch.Tensor:
        """(n, T, H) hidden states -> (n, H) exit feature."""
        hidden = state.hidden.to(self._head_dtype())  # (n, T, H); heads and rules see their own dtype (bf16 layers)
        weights = None
        if self.config.exit_feature == "mean":
            weights = state.row_cache.get("mean_weights")  # (n, 1, T): 1/length on real tokens
            if weights is None or weights.dtype != hidden.dtype:
                weights = state.row_cache["mean_weights"] = mean_weights(state.attention_mask, hidden.dtype)[:, None]
        return pool_feature(self.adapter, self.config.exit_feature, hidden, weights)

    def run_layer_and_exit(self, state: EncoderState, index: int) -> tuple[EncoderState, torch.Tensor, torch.Tensor]:
        """Layer ``index`` for the rows of ``state``, then its exit: (new state, exit feature (n, H), exit
        logits (n, C)), in the exit heads' dtype. A backend whose executables carry the exit heads (the ONNX
        ones) computes all three in one call; otherwise the heads run here."""
        if self.backend.computes_exits:
            self._refuse_training()
            hidden, feature, logits = self.backend.run_layer_and_exit(index, state)
            dtype = self._head_dtype()
            return state.with_hidden(hidden), feature.to(dtype), logits.to(dtype)
        state = self.run_layers(state, index, index + 1)
        feature = self.exit_feature(state)  # (n, H)
        return state, feature, self.exits[index](feature)

    def policy_probability(self, index: int, feature: torch.Tensor, logits: torch.Tensor | None = None,
                           alpha: float | torch.Tensor | None = None) -> torch.Tensor:
        """(n, H) exit feature and (n, C) exit logits -> (n,) the policy's probability of exiting at layer
        ``index``. ``alpha`` turns the dial of an alpha-conditioned policy (default: ``config.policy_alpha``)."""
        if self.policies is None:
            raise LayerExitError(
                "rule='consistentee' is invalid for this model: it has no ConsistentEE policies; train it with "
                "`layerexit train --method consistentee` or call model.add_policies() and train them"
            )
        if alpha is not None and not self.alpha_conditioned:
            raise bad_value("alpha", alpha, "this model's policies were trained with one fixed alpha, so alpha is "
                            "no dial here; train with --alpha-range for an alpha-conditioned policy, or drop alpha")
        if self.alpha_conditioned and alpha is None:
            alpha = self.config.policy_alpha
        extra = policy_extras(logits, index, self.config.num_layers, self.config.policy_inputs, alpha)
        return self.policies[index](feature, extra)

    def rule_signals(self, rule: ExitRule, index: int, feature: torch.Tensor, logits: torch.Tensor) -> dict:
        """The per-layer signals besides the logits that ``rule`` asked for (its ``needs``), for its state at
        exit ``index``: (n, H) features and (n, C) logits -> {"policy": (n,) exit probability at the rule's
        alpha}, or {}. The offline engine and the serving engine both feed rules through it."""
        if "policy" not in rule.needs:
            return {}
        return {"policy": self.policy_probability(index, feature, logits, getattr(rule, "alpha", None))}

    # --- input checks at the public entry points ----------------------------------------------------
    def max_positions(self) -> int | None:
        """The longest sequence the backbone's position embeddings cover (None if it has no such limit)."""
        config = self.backbone.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and config.model_type in ("roberta", "xlm-roberta", "mpnet"):
            limit -= (config.pad_token_id or 0) + 1  # positions start after the padding index
        return limit

    @functools.cached_property
    def _input_limits(self) -> tuple[int | None, int | None]:
        """(longest sequence, vocabulary size) the backbone accepts, read from its config once (the checks run
        on every call)."""
        return self.max_positions(), getattr(self.backbone.config, "vocab_size", None)

    def check_inputs(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        """Refuse a malformed batch with layerexit's error; returns the attention mask (all ones if None).

        Costs O(B) plus one min/max over the ids: shapes, integer ids in the vocabulary, length within the
        model's positions, a non-empty batch, and no row that is all padding (right padding is expected, so
        such a row has ``attention_mask[:, 0] == 0``; its prediction would come from the exit bias alone).
        """
        if pixel_values is not None:
            if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
                raise bad_value("pixel_values", _describe(pixel_values), "pass a non-empty (batch, channels, "
                                "height, width) float tensor, e.g. from the model's image processor")
            return attention_mask
        if input_ids is None:
            raise bad_value("input_ids", None, "pass token ids (batch, length), e.g. tokenizer(texts, padding=True, "
                            "return_tensors='pt')['input_ids'] (or pixel_values for a vision backbone)")
        if not isinstance(input_ids, torch.Tensor):
            raise bad_value("input_ids", type(input_ids).__name__, "pass a torch tensor of token ids (batch, length): "
                            "tokenizer(..., return_tensors='pt')")
        if input_ids.dim() != 2:
            raise bad_value("input_ids", _describe(input_ids), "pass a 2-D (batch, length) tensor; for one text "
                            "add the batch dimension: input_ids.unsqueeze(0)")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise bad_value("input_ids", _describe(input_ids), "token ids must be integers: pass input_ids.long()")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise bad_value("input_ids", _describe(input_ids), "the batch is empty: pass at least one row with at "
                            "least one token")
        limit, vocab = self._input_limits
        if limit is not None and length > limit:
            raise bad_value("input_ids", _describe(input_ids), f"sequences of {length} tokens exceed the model's "
                            f"{limit} positions: tokenize with truncation=True, max_length={limit}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise bad_value("attention_mask", _describe(attention_mask), f"it must have the shape of input_ids "
                            f"{tuple(input_ids.shape)}: pass the mask the tokenizer returned with these ids")
        if token_type_ids is not None and (not isinstance(token_type_ids, torch.Tensor)
                                           or token_type_ids.shape != input_ids.shape):
            raise bad_value("token_type_ids", _describe(token_type_ids), f"it must have the shape of input_ids "
                            f"{tuple(input_ids.shape)}, or be None")
        empty = attention_mask[:, 0] == 0  # (B,) with right padding: the row has no real token
        low, high = torch.aminmax(input_ids)
        if input_ids.device.type == "cpu":  # reading three scalars costs less than stacking them
            low, high, empty_rows = int(low), int(high), int(empty.sum())
        else:
            low, high, empty_rows = torch.stack([low, high, empty.sum().to(low.dtype)]).tolist()  # one device sync
        if low < 0 or (vocab is not None and high >= vocab):
            raise bad_value("input_ids", f"ids from {low} to {high}", f"ids must lie in [0, {vocab}) for "
                            "this model's vocabulary: tokenize with the checkpoint's own tokenizer "
                            "(AutoTokenizer.from_pretrained(checkpoint))")
        if empty_rows:
            rows = empty.nonzero().flatten().tolist()
            raise bad_value("attention_mask", f"rows {rows[:10]} all padding (or left-padded)",
                            "every row needs at least one real token, padded on the right (the tokenizer's "
                            "default padding_side='right'); drop empty rows before calling the model")
        return attention_mask

    # --- reference path (training, logit cache) ------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_features: bool = False,
                pixel_values=None, **_: object):
        """All layers, all exits: logits (L, B, C); with ``return_features`` also the exit features (L, B, H)."""
        attention_mask = self.check_inputs(input_ids, attention_mask, token_type_ids, pixel_values)
        with self.backend.host():
            return self._all_exits(input_ids, attention_mask, token_type_ids, pixel_values, return_features)

    def _all_exits(self, input_ids, attention_mask, token_type_ids, pixel_values, return_features: bool):
        state = self.start(input_ids, attention_mask, token_type_ids, pixel_values)
        logits, features = [], []
        for index in range(self.config.num_layers):
            state, feature, exit_logits = self.run_layer_and_exit(state, index)  # (B, H), (B, C)
            features.append(feature)
            logits.append(exit_logits)
        if return_features:
            return torch.stack(logits), torch.stack(features)
        return torch.stack(logits)

    # --- the engine ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def early_exit(self, input_ids=None, attention_mask=None, token_type_ids=None, *, rule, targets=None,
                   pixel_values=None) -> EarlyExitOutput:
        """Run each row only until ``rule`` lets it exit; exited rows leave the batch between layers.

        ``targets`` (B,) feeds the oracles (gold labels, or the full model's predictions); other rules
        ignore it. The last exit always answers. Inputs are checked first (shapes, dtypes, id range, length,
        all-padding rows), so a bad batch gets layerexit's error naming the parameter, not a torch traceback.
        Works under ``torch.autocast``: the returned logits have the dtype of the model's hidden states.
        """
        attention_mask = self.check_inputs(input_ids, attention_mask, token_type_ids, pixel_values)
        batch = (input_ids if pixel_values is None else pixel_values).shape[0]
        _check_rule(rule, targets, batch, self.config.num_labels)
        with self.backend.host():
            if not self.training:  # the usual case: no mode switch (it walks every submodule)
                return self._early_exit(input_ids, attention_mask, token_type_ids, rule, targets, pixel_values)
            self.eval()
            try:
                return self._early_exit(input_ids, attention_mask, token_type_ids, rule, targets, pixel_values)
            finally:
                self.train()

    def _early_exit(self, input_ids, attention_mask, token_type_ids, rule, targets,
                    pixel_values=None) -> EarlyExitOutput:
        num_layers = self.config.num_layers
        rule.bind(num_layers, self.config.num_labels)
        state = self.start(input_ids, attention_mask, token_type_ids, pixel_values)
        batch, device = state.hidden.shape[0], state.hidden.device
        rule_state = rule.init_state(batch, targets=targets, device=device)
        dtype = self._head_dtype()  # autocast may compute exits in lower precision; answers come in the heads' dtype
        rows = None  # original index of each running row, once some row has left (until then: all, in order)
        for index in range(num_layers):
            state, feature, logits = self.run_layer_and_exit(state, index)  # (n, H), (n, C)
            last = index == num_layers - 1  # the last exit answers for every row still running
            if not last:
                rule_state.update(self.rule_signals(rule, index, feature, logits))
                done = rule.should_exit(logits, index, rule_state)  # (n,) bool
            if last or bool(done.all()):  # every running row leaves at this exit
                if rows is None:  # none left earlier (a batch of one, the usual case): this exit answers for all
                    every = torch.full((batch,), index + 1, dtype=torch.long, device=device)
                    return EarlyExitOutput(logits.to(dtype), every)
                out_logits[rows] = logits.to(dtype)
                exit_layer[rows] = index + 1
                return EarlyExitOutput(out_logits, exit_layer)
            if bool(done.any()):  # these rows leave the batch, the others go on
                if rows is None:
                    rows = torch.arange(batch, device=device)
                    out_logits = torch.zeros(batch, self.config.num_labels, dtype=dtype, device=device)
                    exit_layer = torch.full((batch,), num_layers, dtype=torch.long, device=device)
                out_logits[rows[done]] = logits[done].to(dtype)
                exit_layer[rows[done]] = index + 1
                keep = ~done
                rows = rows[keep]
                state = state.select(keep)
                rule_state = {k: v[keep] for k, v in rule_state.items()}

    # --- persistence ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (of the first floating-point parameter)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_hf_config(self, heads_only: bool = False, exit_rule=None) -> LayerExitConfig:
        """This model's ``config.json``: a :class:`~layerexit.config.LayerExitConfig` embedding the backbone's config.

        ``exit_rule`` (an :class:`~layerexit.rules.ExitRule`, fitted ones included, or the dict form of
        :func:`~layerexit.rules.fitting.rule_to_dict`) is recorded as the checkpoint's default rule.
        """
        backbone_config = self.backbone.config.to_dict()
        backbone_config.pop("dtype", None)  # the weights' dtype is recorded once, at the top level
        return LayerExitConfig(**self.config.to_hf_dict(), backbone_config=backbone_config,
                               heads_only=bool(heads_only), exit_rule=rule_spec(exit_rule),
                               architectures=[type(self).__name__], dtype=str(self.dtype).removeprefix("torch."))

    def save_pretrained(self, directory: str | Path, tokenizer=None, heads_only: bool = False, exit_rule=None) -> None:
        """Write the checkpoint atomically: ``config.json`` + ``model.safetensors`` (+ the tokenizer's files).

        The weights keep their dtype (a bf16 model saves and reloads as bf16). ``heads_only`` saves just the
        exits (for a frozen backbone); loading it needs the same backbone. ``exit_rule`` is stored as the
        checkpoint's default rule (:func:`layerexit.pipeline` uses it). ``config.json`` is the only configuration
        file (the earlier ``layerexit_config.json`` is no longer written).
        """
        with atomic_directory(directory) as tmp:
            self._write_checkpoint(tmp, tokenizer, heads_only, exit_rule)

    def _write_checkpoint(self, folder: Path, tokenizer=None, heads_only: bool = False, exit_rule=None) -> None:
        hf_config = self.to_hf_config(heads_only, exit_rule)
        hf_config.to_json_file(folder / HF_CONFIG_NAME, use_diff=False)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if heads_only:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
        save_file(_dedupe(tensors), str(folder / WEIGHTS_NAME), metadata={"format": "pt", "heads_only": str(heads_only)})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, backbone: str | nn.Module | None = None, *,
                        dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None,
                        local_files_only: bool = False, force_download: bool = False, subfolder: str = "",
                        **kwargs) -> "MultiExitModel":
        """Load a checkpoint: a folder written by :meth:`save_pretrained` (or by layerexit 0.1), or a hub id.

        A hub id (``"user/name"``) resolves through huggingface_hub's cache (``HF_HUB_CACHE``); with
        ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` only the cache is used. ``dtype`` (default: as saved)
        and ``device`` place the model. ``AutoModel.from_pretrained(ckpt)`` calls this after ``import layerexit``.

        The backbone comes from the checkpoint itself. Only a checkpoint saved ``heads_only`` loads an external
        one: ``backbone`` (a module, hub name or folder; default the one the checkpoint records), refused unless
        it matches the backbone the exits were trained on. A full checkpoint that lost its backbone weights is
        refused rather than completed with whatever backbone its config names.
        """
        _check_load_kwargs(kwargs)
        dtype = as_dtype(dtype if dtype is not None else kwargs.get("torch_dtype"))
        directory = resolve_checkpoint(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                       token=token, local_files_only=local_files_only, force_download=force_download)
        if subfolder:
            directory = directory / subfolder
        config, hf_config = _read_checkpoint_config(directory)
        tensors, heads_only = _read_weights(directory, device)
        backbone_config = _backbone_config(directory, hf_config)
        has_backbone = backbone_config is not None and any(k.startswith("backbone.") for k in tensors)
        if backbone is None and not has_backbone and not heads_only:
            raise bad_value(
                "backbone", None,
                f"checkpoint {str(directory)!r} was saved with its fine-tuned backbone, which is missing here (no "
                f"backbone weights or backbone config); layerexit will not load the backbone its config names "
                f"({config.backbone!r}) in its place. Restore the complete checkpoint, or pass backbone= explicitly "
                "(a module, hub name or folder) if you mean to put these exits on another encoder",
            )
        external = backbone is not None or not has_backbone
        if external:  # exits only, onto a backbone that must match the recorded one
            module = _load_matching_backbone(backbone or config.backbone, config, directory)
            tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
            target = dtype or next(p.dtype for p in module.parameters() if p.is_floating_point())
        else:
            module = AutoModel.from_config(backbone_config)
            target = dtype or _saved_dtype(hf_config, tensors)
        model = cls(module, config).to(device=device, dtype=target)  # the weights were read onto `device`
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if external:
            missing = [k for k in missing if not k.startswith("backbone.")]
        missing = _without_alpha_gains(model, missing)
        if missing or unexpected:
            raise LayerExitError(
                f"checkpoint={str(directory)!r} is invalid: missing weights {missing[:5]}, unexpected "
                f"{unexpected[:5]}; it was not written by layerexit for this kind of backbone"
            )
        model.eval()
        return model

    def push_to_hub(self, repo_id: str, tokenizer=None, *, exit_rule=None, figures: dict | None = None,
                    private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                    revision: str | None = None, create_pr: bool = False):
        """Save to a temporary folder with a generated model card (``README.md``) and upload it to the hub.

        The card lists the exits, the default ``exit_rule`` and the measured ``figures`` you pass (a flat
        ``{name: value}`` mapping, e.g. accuracy and measured speed-up). Returns huggingface_hub's commit info.
        """
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, tokenizer=tokenizer, exit_rule=exit_rule, figures=figures, private=private,
                           token=token, commit_message=commit_message, revision=revision, create_pr=create_pr)

    @classmethod
    def _from_config(cls, config: LayerExitConfig, **kwargs) -> "MultiExitModel":
        """``AutoModel.from_config(LayerExitConfig(...))``: a fresh model (random exits, backbone from its config)."""
        if not config.backbone_config:
            raise bad_value("config.backbone_config", None, "a layerexit config needs its backbone's config")
        backbone = AutoModel.from_config(AutoConfig.for_model(**config.backbone_config))
        return cls(backbone, config.to_multi_exit_config())


def upgrade_checkpoint(folder: str | Path, output: str | Path | None = None) -> Path:
    """Rewrite a checkpoint of an earlier layout in the current one; returns the folder written.

    Earlier layouts: ``layerexit_config.json`` + ``backbone/config.json`` (no ``config.json``), or ``config.json``
    with a ``layerexit_config.json`` beside it. The result has ``config.json`` (``model_type`` "layerexit", the
    backbone's config embedded) as its only configuration file, the same weights in the same dtype, and every
    other file of the folder (tokenizer, ``training_config.json``, ...) copied unchanged. ``output`` defaults to
    ``folder`` itself, replaced atomically. Also ``layerexit.upgrade_checkpoint``.
    """
    source = Path(folder)
    if not source.is_dir():
        raise bad_value("folder", str(folder), "give a local checkpoint folder")
    target = Path(output) if output is not None else source
    _, hf_config = _read_checkpoint_config(source)
    _, heads_only = _read_weights(source, None)
    exit_rule = getattr(hf_config, "exit_rule", None) if hf_config is not None else None
    model = MultiExitModel.from_pretrained(source)
    skip = {CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME, BACKBONE_DIR}
    with atomic_directory(target) as tmp:
        for entry in source.iterdir():
            if entry.name in skip or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        model._write_checkpoint(tmp, heads_only=heads_only, exit_rule=exit_rule)
    return target


#: keyword arguments transformers' Auto classes pass on (or users pass out of habit) that need nothing here
_IGNORED_LOAD_KWARGS = {"config", "trust_remote_code", "adapter_kwargs", "_from_auto", "proxies", "torch_dtype",
                        "low_cpu_mem_usage", "use_safetensors", "code_revision"}


def _check_load_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _IGNORED_LOAD_KWARGS)
    if unknown:
        raise bad_value("from_pretrained keyword arguments", unknown, "MultiExitModel.from_pretrained takes "
                        "backbone=, dtype=, device=, revision=, cache_dir=, token=, local_files_only=, "
                        "force_download=, subfolder=")


def as_dtype(dtype) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"``, ``"bf16"`` or ``"auto"``/None (as saved) -> a torch dtype or None."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "fp64": "float64", "double": "float64"}.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise bad_value("dtype", dtype, "give a floating-point dtype: float32, bfloat16, float16 (or 'auto': as saved)")
    return value


def resolve_checkpoint(name_or_path: str | Path, *, revision: str | None = None, cache_dir=None, token=None,
                       local_files_only: bool = False, force_download: bool = False) -> Path:
    """A checkpoint folder: ``name_or_path`` itself, or a hub id's snapshot from huggingface_hub's cache.

    Hub ids download once (when the network is allowed) into the cache (``HF_HUB_CACHE``); with
    ``HF_HUB_OFFLINE=1`` or ``local_files_only`` only the cached snapshot is used.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) or ".." in text:
        raise bad_value("pretrained_model_name_or_path", text, "give a checkpoint folder (written by save_pretrained "
                        "or `layerexit train`) or a hub id such as 'user/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(text, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only, force_download=force_download,
                                   library_name="layerexit", library_version=_package_version())
    except (OSError, HFValidationError) as err:
        raise bad_value("pretrained_model_name_or_path", text, "it is not a local folder, and the hub snapshot is not "
                        f"available ({str(err).splitlines()[0]}); check the id and revision, download it once with "
                        "network access (HF_HUB_OFFLINE unset), or pass a local folder") from None
    return Path(folder)


def _read_checkpoint_config(directory: Path) -> tuple[MultiExitConfig, LayerExitConfig | None]:
    """(the model's config, the config.json form or None for a layerexit 0.1 checkpoint)."""
    if (directory / HF_CONFIG_NAME).is_file():
        data = read_json(directory / HF_CONFIG_NAME, "checkpoint")
        if data.get("model_type") == LayerExitConfig.model_type:
            hf_config = LayerExitConfig.from_dict(data)
            return hf_config.to_multi_exit_config(), hf_config
    return MultiExitConfig.load(directory), None


def _read_weights(directory: Path, device) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors as saved, whether the checkpoint was saved heads_only)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise bad_value("checkpoint", str(directory), f"it has no {WEIGHTS_NAME}; pass a complete checkpoint folder")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    except SafetensorError as err:
        raise bad_value("checkpoint", str(directory), f"{WEIGHTS_NAME} is unreadable ({err}); it may be truncated: "
                        "copy or save the checkpoint again") from None
    return tensors, metadata.get("heads_only") == "True"


def _backbone_config(directory: Path, hf_config: LayerExitConfig | None):
    """The backbone's configuration: embedded in config.json, or ``backbone/config.json`` (layerexit 0.1)."""
    if hf_config is not None:
        return AutoConfig.for_model(**hf_config.backbone_config) if hf_config.backbone_config else None
    if (directory / BACKBONE_DIR / HF_CONFIG_NAME).is_file():
        return AutoConfig.from_pretrained(directory / BACKBONE_DIR)
    return None


def _without_alpha_gains(model: MultiExitModel, missing: list[str]) -> list[str]:
    """Checkpoints written before alpha-conditioned policies had alpha's direct path to the logit lack its
    weights: set them to 0, which is exactly the policy they were trained as; the other missing keys."""
    gains = [k for k in missing if k.startswith("policies.") and k.endswith(".alpha_gain")]
    with torch.no_grad():
        for key in gains:
            model.get_parameter(key).zero_()
    return [k for k in missing if k not in gains]


def _saved_dtype(hf_config: LayerExitConfig | None, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype recorded in config.json, else the most common floating dtype among the weights."""
    recorded = getattr(hf_config, "dtype", None) if hf_config is not None else None
    if recorded is not None:
        return as_dtype(recorded)
    counts: dict[torch.dtype, int] = {}
    for value in tensors.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _describe(value) -> str:
    """A short description of a tensor argument for error messages (its shape and dtype, not its values)."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {str(value.dtype).removeprefix('torch.')}"
    return repr(value) if value is None else type(value).__name__


def _check_rule(rule, targets, batch: int, num_labels: int) -> None:
    """The rule and (for oracles) the targets of an ``early_exit`` call."""
    if not isinstance(rule, ExitRule):
        raise bad_value("rule", rule if rule is None or isinstance(rule, str) else type(rule).__name__,
                        "pass an exit rule object, e.g. rule=layerexit.make_rule('maxprob', threshold=0.9) "
                        "(names: layerexit.RULES.names())")
    if targets is None:
        if rule.needs_targets:
            raise bad_value("targets", None, f"rule {rule.name!r} is an oracle: pass targets= (one label per row, "
                            "the gold labels or the full model's predictions)")
        return
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise bad_value("targets", _describe(targets), f"pass one label per row: a 1-D tensor of {batch} entries")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_labels):
        raise bad_value("targets", f"labels from {int(targets.min())} to {int(targets.max())}",
                        f"labels must lie in [0, {num_labels}) for this model")


def _load_matching_backbone(backbone: str | nn.Module, config: MultiExitConfig, directory: Path) -> nn.Module:
    module = backbone if isinstance(backbone, nn.Module) else AutoModel.from_pretrained(resolve_model(backbone))
    adapter = adapter_for(module)
    found = fingerprint(module.config, adapter.num_layers, adapter.hidden_size)
    if found != config.backbone_fingerprint:
        shown = backbone if isinstance(backbone, str) else type(backbone).__name__
        raise bad_value(
            "backbone",
            shown,
            f"checkpoint {str(directory)!r} was trained on {config.backbone!r} {config.backbone_fingerprint}, "
            f"this backbone is {found}; load it with the backbone it was trained on, or train new exits",
        )
    return module


class _ConfigOnly:
    """Lets :func:`adapter_for` check a config before any weights are loaded."""

    def __init__(self, config):
        self.config = config


def _load_hf_config(name_or_path: str):
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise bad_value(
            "backbone",
            name_or_path,
            "give a Hugging Face hub name (with network access) or a local folder holding config.json; "
            f"loading it failed with: {str(err).splitlines()[0]}",
        ) from None


def fingerprint(hf_config, num_layers: int, hidden_size: int) -> dict:
    return {
        "model_type": hf_config.model_type,
        "num_layers": int(num_layers),
        "hidden_size": int(hidden_size),
        "vocab_size": int(getattr(hf_config, "vocab_size", 0)),
    }


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; tied weights are cloned (loading re-ties them)."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in tensors.items():
        ptr = value.data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.setdefault(ptr, key)
    return out


AutoModel.register(LayerExitConfig, MultiExitModel, exist_ok=True)
