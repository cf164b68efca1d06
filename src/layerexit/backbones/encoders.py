"""Adapters for the encoder families layerexit supports, keyed by ``config.model_type``.

Exit-feature defaults (``default_feature``): the model's own pooler on each layer's first token where the
architecture has one, as ConsistentEE does; DistilBERT has no pooler and classifies its first token, so it
uses ``cls``. A checkpoint that declares its own pooling (sentence-transformers' ``1_Pooling`` folder, e.g.
all-MiniLM-L6-v2 declares mean pooling) overrides this default, see ``layerexit.model``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import catalog
from ..registry import Registry
from .base import EncoderAdapter

ADAPTERS: Registry[type[EncoderAdapter]] = Registry("backbone", {n: d for n, (_, d) in catalog.BACKBONES.items()})


@ADAPTERS.register("bert")
class BertAdapter(EncoderAdapter):
    model_types = ("bert",)


@ADAPTERS.register("roberta")
class RobertaAdapter(EncoderAdapter):
    model_types = ("roberta", "xlm-roberta")


@ADAPTERS.register("albert")
class AlbertAdapter(EncoderAdapter):
    model_types = ("albert",)

    @property
    def layers(self):
        groups = self.backbone.encoder.albert_layer_groups
        per_group = self.config.num_hidden_layers / self.config.num_hidden_groups
        return [groups[int(i / per_group)] for i in range(self.config.num_hidden_layers)]

    def embed(self, input_ids, token_type_ids):
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (n, T, E)
        return self.backbone.encoder.embedding_hidden_mapping_in(hidden)  # (n, T, H)

    def pool(self, hidden):
        return self.backbone.pooler_activation(self.backbone.pooler(hidden[:, 0]))


@ADAPTERS.register("distilbert")
class DistilBertAdapter(EncoderAdapter):
    model_types = ("distilbert",)
    default_feature = "cls"
    uses_token_type_ids = False

    @property
    def layers(self):
        return list(self.backbone.transformer.layer)

    @property
    def hidden_size(self):
        return self.config.dim

    def has_pooler(self):
        return False


@ADAPTERS.register("mpnet")
class MPNetAdapter(EncoderAdapter):
    model_types = ("mpnet",)
    uses_token_type_ids = False

    def prepare(self, hidden, attention_mask) -> dict[str, Any]:
        kwargs = super().prepare(hidden, attention_mask)
        kwargs["position_bias"] = self.backbone.encoder.compute_position_bias(hidden)  # (n, heads, T, T)
        return kwargs

    def call_layer(self, layer, hidden, layer_kwargs) -> torch.Tensor:
        return layer(hidden, layer_kwargs["attention_mask"], layer_kwargs["position_bias"])[0]


def adapter_for(backbone) -> EncoderAdapter:
    """The adapter for ``backbone.config.model_type``, or a clear error listing the supported ones."""
    model_type = backbone.config.model_type
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        if model_type in cls.model_types:
            return cls(backbone)
    supported = sorted(t for n in ADAPTERS.names() for t in ADAPTERS.get(n).model_types)
    from ..errors import bad_value

    raise bad_value(
        "backbone (config.model_type)",
        model_type,
        f"layerexit supports encoders of type {', '.join(supported)}; "
        "add an adapter in layerexit/backbones/encoders.py for another architecture",
    )
