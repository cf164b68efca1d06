"""The per-architecture adapter: where an unmodified Hugging Face encoder keeps its parts.

An adapter knows how to embed the input, how to prepare whatever a layer needs besides the hidden states
(the attention mask in the layout the attention implementation expects, MPNet's relative position bias),
how to run layer ``i``, and where the pooler is. The model wrapper never touches the backbone otherwise, so
adding an architecture is one small class (peft's ``model_type`` mapping pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


@dataclass
class EncoderState:
    """Hidden states of the rows still running, plus what their layers need.

    hidden: (n, T, H); attention_mask: (n, T) with 1 for real tokens (right padding);
    ``layer_kwargs``: extra arguments of every layer call (the attention mask in the attention
    implementation's layout, ...), built by ``prepare`` for the current rows when first asked for. Built
    lazily because a backend that runs the layers elsewhere (ONNX Runtime) never asks.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    prepare: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]
    prepared: dict[str, Any] | None = field(default=None, repr=False)  # layer_kwargs once built
    #: values that depend on the rows' attention mask only (the exit feature's pooling weights), kept while the
    #: rows stay the same: computed once per row set instead of at every exit
    row_cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layer_kwargs(self) -> dict[str, Any]:
        if self.prepared is None:
            self.prepared = self.prepare(self.hidden, self.attention_mask)
        return self.prepared

    def with_hidden(self, hidden: torch.Tensor) -> "EncoderState":
        """The same rows (and their layer arguments, if built) with new hidden states of the same shape."""
        return EncoderState(hidden, self.attention_mask, self.prepare, self.prepared, self.row_cache)

    def select(self, rows: torch.Tensor) -> "EncoderState":
        """Keep only ``rows`` (bool (n,) or long (k,)) and drop padding columns no kept row needs."""
        mask = self.attention_mask[rows]  # (k, T)
        length = int(mask.sum(dim=1).max()) if mask.shape[0] else 0
        if length < mask.shape[1] and bool((mask[:, length:] == 0).all()):
            mask = mask[:, :length]  # right padding past every kept row's end is dead weight
        hidden = self.hidden[:, : mask.shape[1]][rows]  # (k, T', H), one contiguous copy
        return EncoderState(hidden, mask, self.prepare)


class LayerStackAdapter:
    """What every adapter, encoder or decoder, says about an unmodified Hugging Face model: which model types
    it serves, where the stack of layers is, how many there are and their width. Subclasses register in
    their side's registry (``backbones.ADAPTERS``, ``generation.DECODERS``) and add how to run the layers."""

    model_types: tuple[str, ...] = ()

    def __init__(self, module: nn.Module):
        self.config = module.config

    @property
    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


class EncoderAdapter(LayerStackAdapter):
    """Base adapter for BERT-like encoders whose layers take ``(hidden, attention_mask)``."""

    #: exit feature used when neither the user nor the checkpoint chooses one
    default_feature: str = "pooler"
    uses_token_type_ids: bool = True
    #: whether the input is token ids (:meth:`embed`); vision adapters embed images instead
    reads_text: bool = True

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.backbone = backbone

    # --- structure -----------------------------------------------------------------------------------
    @property
    def layers(self) -> list[nn.Module]:
        return list(self.backbone.encoder.layer)

    def has_pooler(self) -> bool:
        return getattr(self.backbone, "pooler", None) is not None

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooler on the first token: (n, T, H) -> (n, H)."""
        return self.backbone.pooler(hidden)

    # --- computation ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """(n, T) token ids -> (n, T, H) input of layer 0."""
        if self.uses_token_type_ids:
            return self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.backbone.embeddings(input_ids=input_ids)

    def prepare(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Arguments of every layer call for these rows, in the attention implementation's own layout."""
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}

    def run_layer(self, index: int, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        """Layer ``index`` (0-based): (n, T, H) -> (n, T, H)."""
        return self.call_layer(self.layers[index], hidden, layer_kwargs)

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        """Call one layer module (the backbone's own, or a backend's bf16/int8 copy): (n, T, H) -> (n, T, H)."""
        return layer(hidden, layer_kwargs["attention_mask"])

    def start(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        hidden = self.embed(input_ids, token_type_ids)  # (B, T, H)
        return EncoderState(hidden, attention_mask, self.prepare)

    def start_images(self, pixel_values: torch.Tensor) -> EncoderState:
        """Embed a batch of images (vision adapters); text encoders refuse."""
        from ..errors import bad_value

        raise bad_value("pixel_values", tuple(pixel_values.shape), f"a {self.config.model_type} encoder reads "
                        "text: pass input_ids and attention_mask")

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """What every exit sees of a layer's output: (n, T, H) -> (n, T, H). Identity for post-norm encoders
        (their layers end in a LayerNorm); pre-norm models apply their final norm here (ViT)."""
        return hidden

    def layer_module(self, index: int) -> nn.Module:
        """The module that runs layer ``index`` (shared between layers in ALBERT); used to count calls."""
        return self.layers[index]
