"""What layerexit adds to a backbone, encoder or decoder, and its one saved form (``config.json``, ``model_type``
"layerexit", with a ``kind``).

:class:`MultiExitConfig` (kind ``classifier``: exits of a sequence classifier) and :class:`CausalLMExitConfig`
(kind ``causal-lm``: exits of a decoder LM) are what the code reads (``model.config``); both derive
:class:`BackboneExits`, which names the backbone the exits were trained on. On disk a checkpoint holds it as a
Hugging Face ``config.json`` (:class:`LayerExitConfig`, registered with ``AutoConfig`` on ``import layerexit``)
that also embeds the backbone's own configuration, so ``AutoConfig.from_pretrained(ckpt)`` and
``AutoModel.from_pretrained(ckpt)`` work and the checkpoint needs no ``backbone/`` folder. It is the only
configuration file written.

Checkpoints of the earlier format (``layerexit_config.json`` plus ``backbone/config.json``, no ``config.json``)
still load, with ``MultiExitModel.from_pretrained`` and, after ``import layerexit``, with the Auto classes:
:func:`install_legacy_loading` lets ``AutoConfig.from_pretrained`` read such a folder (and only such a folder;
everything else goes to transformers unchanged). ``layerexit.model.upgrade_checkpoint`` rewrites one in the
current format. Folders that also hold a ``layerexit_config.json`` beside ``config.json`` (written by layerexit
before it stopped writing that file) load from ``config.json``; the extra file is ignored.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig

from .errors import LayerExitError, bad_value

#: the Hugging Face configuration file (current format)
HF_CONFIG_NAME = "config.json"
#: the configuration file of checkpoints of the earlier format (still read, no longer written)
CONFIG_NAME = "layerexit_config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "layerexit"
#: what a checkpoint's exits sit on: a sequence classifier's encoder or a causal LM
KINDS = ("classifier", "causal-lm")


@dataclass
class BackboneExits:
    """The backbone a set of exits was trained on (shared by every kind). ``model_type`` is the backbone's."""

    backbone: str
    model_type: str
    num_layers: int
    hidden_size: int
    #: the kind of backbone these exits sit on (one of ``KINDS``), saved as config.json's ``kind``
    kind: ClassVar[str] = ""

    @classmethod
    def check_kind(cls, data: dict[str, Any], where: str) -> None:
        """Refuse a saved configuration of another kind, naming the class that loads it."""
        kind = data.get("kind", "classifier")  # written before kinds existed: a classifier's
        if kind != cls.kind:
            loader = {"classifier": "MultiExitModel.from_pretrained(folder)",
                      "causal-lm": "EarlyExitLM.with_exits(lm, folder)"}.get(kind, "a newer layerexit")
            raise LayerExitError(f"{where} holds the exits of a {kind} (kind={kind!r}), not of a {cls.kind}; "
                                 f"load it with {loader}")


@dataclass
class MultiExitConfig(BackboneExits):
    """What layerexit adds to a classifier's encoder, and which backbone it was trained on.

    ``backbone_fingerprint`` (model type, layers, hidden size, vocabulary size) lets a heads-only checkpoint
    refuse a backbone it was not trained on. ``model_type`` is the backbone's (e.g. "bert").
    """

    backbone: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_labels: int
    exit_feature: str
    dropout: float = 0.1
    label_names: list[str] = field(default_factory=list)
    backbone_fingerprint: dict = field(default_factory=dict)
    max_length: int = 128
    #: hidden width of the per-layer ConsistentEE policies; 0 = the model has no policies
    policy_hidden: int = 0
    #: the policies' inputs beside the exit feature (layerexit.heads.POLICY_INPUTS); [] = the paper's form
    policy_inputs: list[str] = field(default_factory=list)
    #: [low, high] of the layer cost alpha an alpha-conditioned policy was trained on ([] = one fixed alpha)
    policy_alpha_range: list[float] = field(default_factory=list)
    #: the alpha an alpha-conditioned policy uses when the rule gives none
    policy_alpha: float = 1.0
    layerexit_version: str = ""
    kind: ClassVar[str] = "classifier"

    @classmethod
    def load(cls, directory: str | Path) -> "MultiExitConfig":
        """Read a checkpoint's configuration: ``config.json`` (current) or ``layerexit_config.json`` (legacy)."""
        directory = Path(directory)
        if (directory / HF_CONFIG_NAME).is_file():
            data = read_json(directory / HF_CONFIG_NAME, "checkpoint")
            if data.get("model_type") == MODEL_TYPE:
                return cls.from_hf_dict(data)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise LayerExitError(
                f"checkpoint={str(directory)!r} is invalid: it has neither a layerexit config.json (model_type "
                f"{MODEL_TYPE!r}) nor {CONFIG_NAME}; pass a folder written by MultiExitModel.save_pretrained or "
                "`layerexit train`"
            )
        data = read_json(path, "checkpoint")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise LayerExitError(f"checkpoint={str(directory)!r} is invalid: {path.name} lacks fields ({err}); "
                                 "write the checkpoint again with save_pretrained") from None

    # --- the Hugging Face form ----------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of ``config.json`` that are layerexit's (the backbone's config is added by the model)."""
        data = asdict(self)
        data["backbone_type"] = data.pop("model_type")
        data["max_seq_length"] = data.pop("max_length")  # `max_length` is a generation option in transformers
        data.pop("num_labels")  # carried by id2label
        labels = data.pop("label_names") or [str(i) for i in range(self.num_labels)]
        data["id2label"] = {str(i): name for i, name in enumerate(labels)}
        data["label2id"] = {name: i for i, name in enumerate(labels)}
        data["kind"] = self.kind
        return data

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "MultiExitConfig":
        cls.check_kind(data, "config.json")
        id2label = {int(k): v for k, v in (data.get("id2label") or {}).items()}
        labels = [id2label[i] for i in sorted(id2label)]
        try:
            return cls(
                backbone=data["backbone"], model_type=data["backbone_type"], num_layers=int(data["num_layers"]),
                hidden_size=int(data["hidden_size"]), num_labels=len(labels), exit_feature=data["exit_feature"],
                dropout=float(data.get("dropout", 0.1)), label_names=labels,
                backbone_fingerprint=dict(data.get("backbone_fingerprint") or {}),
                max_length=int(data.get("max_seq_length", 128)), policy_hidden=int(data.get("policy_hidden", 0)),
                policy_inputs=[str(v) for v in data.get("policy_inputs") or []],
                policy_alpha_range=[float(v) for v in data.get("policy_alpha_range") or []],
                policy_alpha=float(data.get("policy_alpha", 1.0)),
                layerexit_version=str(data.get("layerexit_version", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LayerExitError(f"config.json is invalid for a layerexit checkpoint: field {err} is missing or "
                                 "malformed; write the checkpoint again with save_pretrained") from None


@dataclass
class CausalLMExitConfig(BackboneExits):
    """What layerexit adds to a causal LM (:class:`~layerexit.generation.EarlyExitLM`): per-exit adapters and the
    token policy. The backbone itself is never saved (it is reloaded by name), so its checkpoints are always
    ``heads_only``. ``training`` records how the exits were trained."""

    adapter_rank: int = 0
    policy: bool = False
    adapter_kind: str = "lowrank"
    training: dict = field(default_factory=dict)
    layerexit_version: str = ""
    kind: ClassVar[str] = "causal-lm"
    #: the files of exits saved before the one format (still read)
    LEGACY_CONFIG: ClassVar[str] = "exit_config.json"
    LEGACY_WEIGHTS: ClassVar[str] = "exits.safetensors"

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json's fields (the same ``model_type``, ``kind`` and names as a classifier's)."""
        data = asdict(self)
        data["backbone_type"] = data.pop("model_type")
        return {"model_type": MODEL_TYPE, "kind": self.kind, **data, "heads_only": True}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "CausalLMExitConfig":
        cls.check_kind(data, "config.json")
        try:
            return cls(backbone=str(data["backbone"]), model_type=str(data["backbone_type"]),
                       num_layers=int(data["num_layers"]), hidden_size=int(data["hidden_size"]),
                       adapter_rank=int(data.get("adapter_rank", 0)), policy=bool(data.get("policy", False)),
                       adapter_kind=str(data.get("adapter_kind", "lowrank")), training=dict(data.get("training") or {}),
                       layerexit_version=str(data.get("layerexit_version", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise LayerExitError(f"config.json is invalid for a layerexit causal-lm checkpoint: field {err} is missing "
                                 "or malformed; save the exits again with save_exits") from None

    def save(self, directory: str | Path) -> None:
        """Write ``config.json``."""
        Path(directory, HF_CONFIG_NAME).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> tuple["CausalLMExitConfig", Path]:
        """(the configuration, the weights file) of saved exits: ``config.json`` + ``model.safetensors``, or the
        earlier ``exit_config.json`` + ``exits.safetensors``."""
        directory = Path(directory)
        if (directory / HF_CONFIG_NAME).is_file():
            data = read_json(directory / HF_CONFIG_NAME, "exits")
            if data.get("model_type") == MODEL_TYPE:
                return cls.from_hf_dict(data), directory / WEIGHTS_NAME
        path = directory / cls.LEGACY_CONFIG
        if not path.is_file():
            raise bad_value("exits", str(directory), f"no layerexit {HF_CONFIG_NAME} (or {cls.LEGACY_CONFIG}) there; "
                            "give a folder written by save_exits or `layerexit generate --train-exits`")
        data = read_json(path, "exits")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known}), directory / cls.LEGACY_WEIGHTS
        except TypeError as err:
            raise LayerExitError(f"exits={str(directory)!r} is invalid: {path.name} lacks fields ({err}); "
                                 "save the exits again with save_exits") from None


class LayerExitConfig(PretrainedConfig):
    """The ``config.json`` of a layerexit checkpoint, as a Hugging Face configuration (``model_type`` "layerexit").

    Holds the :class:`MultiExitConfig` fields (``backbone_type`` and ``max_seq_length`` renamed to stay clear of
    transformers' own ``model_type`` and generation ``max_length``), the backbone's configuration as a dict
    (``backbone_config``), whether the checkpoint holds only the exits (``heads_only``) and an optional default
    exit rule (``exit_rule``: ``{"name": ..., "params": {...}}``, used by :func:`layerexit.pipeline`). The exits of a
    causal LM are saved in the same file with ``kind`` "causal-lm" (:class:`CausalLMExitConfig`).
    """

    model_type = MODEL_TYPE

    backbone: str = ""
    backbone_type: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    exit_feature: str = "cls"
    dropout: float = 0.1
    backbone_fingerprint: dict | None = None
    max_seq_length: int = 128
    policy_hidden: int = 0
    policy_inputs: list | None = None
    policy_alpha_range: list | None = None
    policy_alpha: float = 1.0
    layerexit_version: str = ""
    heads_only: bool = False
    backbone_config: dict | None = None
    exit_rule: dict | None = None
    #: one of ``KINDS``; a causal-lm checkpoint also holds ``adapter_rank``, ``adapter_kind``, ``policy``, ``training``
    kind: str = "classifier"

    def to_multi_exit_config(self) -> MultiExitConfig:
        return MultiExitConfig.from_hf_dict(self.to_dict())


def read_json(path: Path, param: str) -> dict:
    """A JSON object from ``path``, or layerexit's error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayerExitError(f"{param}={str(path.parent)!r} is invalid: {path.name} is not valid JSON ({err}); "
                             "write the checkpoint again with save_pretrained") from None
    if not isinstance(data, dict):
        raise LayerExitError(f"{param}={str(path.parent)!r} is invalid: {path.name} must hold a JSON object")
    return data


def rule_spec(rule) -> dict | None:
    """An exit rule (instance or dict) -> its JSON form for config.json, or None."""
    if rule is None:
        return None
    from .rules.base import ExitRule
    from .rules.fitting import rule_from_dict, rule_to_dict

    if isinstance(rule, dict):
        rule = rule_from_dict(rule)  # validates the name and parameters
    if not isinstance(rule, ExitRule):
        raise bad_value("exit_rule", rule, "pass an ExitRule (e.g. layerexit.make_rule('maxprob', threshold=0.9)) "
                        "or its dict form {'name': ..., 'params': {...}}")
    return rule_to_dict(rule)


# --- checkpoints of the earlier format through the Auto classes -------------------------------------------
BACKBONE_DIR = "backbone"
#: AutoConfig.from_pretrained's loading options (consumed; the rest are handed back as unused)
_LOADER_KWARGS = {"cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
                  "code_revision", "trust_remote_code", "return_unused_kwargs", "_from_auto", "_from_pipeline",
                  "_commit_hash", "user_agent", "resume_download"}


def legacy_folder(name_or_path, subfolder: str | None = None) -> Path | None:
    """``name_or_path`` (+ ``subfolder``) when it is a local checkpoint of the earlier format (a
    ``layerexit_config.json`` and no ``config.json``), else None."""
    try:
        path = Path(name_or_path) / (subfolder or "")
    except TypeError:
        return None
    if path.is_dir() and not (path / HF_CONFIG_NAME).is_file() and (path / CONFIG_NAME).is_file():
        return path
    return None


def legacy_hf_config(directory: str | Path) -> LayerExitConfig:
    """The ``config.json`` form of a checkpoint of the earlier format (its ``layerexit_config.json``, and the
    backbone's ``backbone/config.json`` when present)."""
    directory = Path(directory)
    config = MultiExitConfig.load(directory)
    backbone = directory / BACKBONE_DIR / HF_CONFIG_NAME
    backbone_config = read_json(backbone, "checkpoint") if backbone.is_file() else None
    if backbone_config is not None:
        backbone_config.pop("dtype", None)
        backbone_config.pop("torch_dtype", None)
    return LayerExitConfig(**config.to_hf_dict(), backbone_config=backbone_config, architectures=["MultiExitModel"])


def install_legacy_loading() -> None:
    """Let ``AutoConfig.from_pretrained`` (and so ``AutoModel``, ``AutoModelForSequenceClassification`` and
    ``transformers.pipeline``) read a local checkpoint of the earlier format. Only a folder with
    ``layerexit_config.json`` and no ``config.json`` is intercepted; every other call goes to transformers
    unchanged. Idempotent."""
    current = AutoConfig.__dict__["from_pretrained"]
    original = current.__func__
    if getattr(original, "_layerexit_legacy", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        folder = legacy_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if folder is None or args:
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        config = legacy_hf_config(folder)
        if kwargs.get("return_unused_kwargs"):
            return config, {k: v for k, v in kwargs.items() if k not in _LOADER_KWARGS}
        return config

    from_pretrained._layerexit_legacy = True
    AutoConfig.from_pretrained = classmethod(from_pretrained)


AutoConfig.register(MODEL_TYPE, LayerExitConfig, exist_ok=True)
install_legacy_loading()
