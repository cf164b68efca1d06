"""The configuration of a multi-exit model, saved as JSON beside its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LayerExitError

CONFIG_NAME = "layerexit_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MultiExitConfig:
    """What layerexit adds to a backbone, and which backbone it was trained on.

    ``backbone_fingerprint`` (model type, layers, hidden size, vocabulary size) lets a heads-only checkpoint
    refuse a backbone it was not trained on.
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

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "MultiExitConfig":
        path = Path(directory, CONFIG_NAME)
        if not path.is_file():
            raise LayerExitError(
                f"checkpoint={str(directory)!r} is invalid: it has no {CONFIG_NAME}; pass a folder written by "
                "MultiExitModel.save_pretrained or `layerexit train`"
            )
        data = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
