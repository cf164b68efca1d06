"""Vision transformers: the Hugging Face ViT (``model_type`` "vit") as a multi-exit encoder.

An image becomes a sequence of 1 + P tokens (the [CLS] token and P patch embeddings) with no padding, so the
attention mask is all ones and every layer runs without one; rows still leave the batch between layers as in
text. ViT layers are pre-norm: the model applies a final LayerNorm after the last layer, and its
image classifier reads the normalised [CLS] token. Every exit here sees the layer's output through that
shared final norm (:meth:`ViTAdapter.normalize`), so the last exit is exactly the usual ViT classifier head and
the default exit feature is the first token (``cls``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import bad_value
from .base import EncoderAdapter, EncoderState
from .encoders import ADAPTERS


@ADAPTERS.register("vit")
class ViTAdapter(EncoderAdapter):
    model_types = ("vit",)
    default_feature = "cls"
    uses_token_type_ids = False
    reads_text = False

    @property
    def layers(self):
        return list(self.backbone.layers)

    def start(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        raise bad_value("input_ids", None if input_ids is None else tuple(input_ids.shape),
                        "a ViT encoder reads images: pass pixel_values (B, channels, height, width)")

    def start_images(self, pixel_values: torch.Tensor) -> EncoderState:
        config = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
            raise bad_value("pixel_values", tuple(pixel_values.shape), f"expected (B, {config.num_channels}, "
                            f"{config.image_size}, {config.image_size}) images")
        dtype = self.backbone.embeddings.patch_embeddings.projection.weight.dtype
        hidden = self.backbone.embeddings(pixel_values.to(dtype))  # (B, 1 + P, H)
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # (B, T): no padding
        return EncoderState(hidden, mask, self.prepare)

    def prepare(self, hidden, attention_mask) -> dict[str, Any]:
        return {"attention_mask": None}  # images have no padding: full attention

    def call_layer(self, layer, hidden, layer_kwargs) -> torch.Tensor:
        return layer(hidden)  # (n, T, H) -> (n, T, H)

    def normalize(self, hidden):
        return self.backbone.layernorm(hidden)  # (n, T, H)
