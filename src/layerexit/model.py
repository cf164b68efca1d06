"""The multi-exit wrapper around an unmodified Hugging Face encoder, and its layer-skipping engine.

Everything runs through one primitive, :meth:`MultiExitModel.run_layers`, which runs a range of layers for
the rows held in an :class:`~layerexit.backbones.EncoderState`. Training and the logit cache call it for all
rows and all layers (:meth:`forward`); the engine (:meth:`early_exit`) calls it one layer at a time and lets
rows that exit leave the batch between layers, so layers past an input's exit are never computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from .backbones import EncoderState, adapter_for
from .config import WEIGHTS_NAME, MultiExitConfig
from .errors import LayerExitError, bad_value
from .heads import FEATURES, POLICY_INPUTS, ExitClassifier, PolicyNetwork, mean_weights, policy_extras
from .io import atomic_directory
from .resources import resolve_model

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

    Exit feature per layer (``exit_feature``): ``pooler`` (ConsistentEE, Zeng et al. AAAI 2024: the shared
    pooler on the layer's first token), ``cls`` or ``mean``; see :data:`layerexit.heads.FEATURES`.
    """

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
            if not 0 <= low < high:
                raise bad_value("alpha_range", list(alpha_range), "give low < high, both >= 0")
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
            PolicyNetwork(self.config.hidden_size, hidden_size, extra) for _ in range(self.config.num_layers)
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
        else:
            state = self.adapter.start(input_ids, attention_mask, token_type_ids)
        if self.config.exit_feature == "mean":  # averaging weights travel with the rows
            prepare = self.adapter.prepare
            state.prepare = lambda h, m: {**prepare(h, m), "exit_weights": mean_weights(m, h.dtype)}
            state.layer_kwargs = state.prepare(state.hidden, state.attention_mask)
        return state

    def run_layers(self, state: EncoderState, start: int, stop: int) -> EncoderState:
        """Run layers ``start..stop-1`` (0-based) for the rows of ``state``; returns the new state."""
        hidden = state.hidden
        for index in range(start, stop):
            hidden = self.adapter.run_layer(index, hidden, state.layer_kwargs)  # (n, T, H)
        return EncoderState(hidden, state.attention_mask, state.prepare, state.layer_kwargs)

    def exit_feature(self, state: EncoderState) -> torch.Tensor:
        """(n, T, H) hidden states -> (n, H) exit feature."""
        kind = self.config.exit_feature
        hidden = self.adapter.normalize(state.hidden)  # (n, T, H); identity except for pre-norm models (ViT)
        if kind == "mean":
            return torch.bmm(state.layer_kwargs["exit_weights"].unsqueeze(1), hidden).squeeze(1)
        if kind == "cls":
            return hidden[:, 0]
        return self.adapter.pool(hidden)

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

    # --- reference path (training, logit cache) ------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_features: bool = False,
                pixel_values=None, **_: object):
        """All layers, all exits: logits (L, B, C); with ``return_features`` also the exit features (L, B, H)."""
        state = self.start(input_ids, attention_mask, token_type_ids, pixel_values)
        logits, features = [], []
        for index in range(self.config.num_layers):
            state = self.run_layers(state, index, index + 1)
            feature = self.exit_feature(state)  # (B, H)
            features.append(feature)
            logits.append(self.exits[index](feature))
        if return_features:
            return torch.stack(logits), torch.stack(features)
        return torch.stack(logits)

    # --- the engine ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def early_exit(self, input_ids=None, attention_mask=None, token_type_ids=None, *, rule, targets=None,
                   pixel_values=None) -> EarlyExitOutput:
        """Run each row only until ``rule`` lets it exit; exited rows leave the batch between layers.

        ``targets`` (B,) feeds the oracles (gold labels, or the full model's predictions); other rules
        ignore it. The last exit always answers.
        """
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
        rows = torch.arange(batch, device=device)  # original index of each running row
        out_logits = state.hidden.new_zeros(batch, self.config.num_labels)
        exit_layer = torch.full((batch,), num_layers, dtype=torch.long, device=device)
        for index in range(num_layers):
            state = self.run_layers(state, index, index + 1)
            feature = self.exit_feature(state)  # (n, H)
            logits = self.exits[index](feature)  # (n, C)
            if index == num_layers - 1:
                out_logits[rows] = logits
                break
            if "policy" in rule.needs:  # per-layer signals a rule asked for travel in its state
                rule_state["policy"] = self.policy_probability(index, feature, logits, getattr(rule, "alpha", None))
            done = rule.should_exit(logits, index, rule_state)  # (n,) bool
            if bool(done.any()):
                out_logits[rows[done]] = logits[done]
                exit_layer[rows[done]] = index + 1
                keep = ~done
                if not bool(keep.any()):
                    break
                rows = rows[keep]
                state = state.select(keep)
                rule_state = {k: v[keep] for k, v in rule_state.items()}
        return EarlyExitOutput(out_logits, exit_layer)

    # --- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer=None, heads_only: bool = False) -> None:
        """Write the checkpoint atomically: JSON config + safetensors (+ backbone config and tokenizer).

        ``heads_only`` saves just the exits (for a frozen backbone); loading it needs the same backbone.
        """
        with atomic_directory(directory) as tmp:
            self.config.save(tmp)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            if heads_only:
                tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
            else:
                self.backbone.config.save_pretrained(tmp / BACKBONE_DIR)
            save_file(_dedupe(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "heads_only": str(heads_only)})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: str | nn.Module | None = None) -> "MultiExitModel":
        """Load a checkpoint written by :meth:`save_pretrained`.

        A heads-only checkpoint loads onto ``backbone`` (default: the one it records) after checking that
        the backbone matches the one it was trained on.
        """
        directory = Path(directory)
        config = MultiExitConfig.load(directory)
        tensors = load_file(str(directory / WEIGHTS_NAME))
        external = backbone is not None or not (directory / BACKBONE_DIR).is_dir()
        if external:  # exits only, onto a backbone that must match the recorded one
            module = _load_matching_backbone(backbone or config.backbone, config, directory)
            tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
        else:
            module = AutoModel.from_config(AutoConfig.from_pretrained(directory / BACKBONE_DIR))
        model = cls(module, config)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if external:
            missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise LayerExitError(
                f"checkpoint={str(directory)!r} is invalid: missing weights {missing[:5]}, unexpected "
                f"{unexpected[:5]}; it was not written by layerexit for this kind of backbone"
            )
        model.eval()
        return model


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
