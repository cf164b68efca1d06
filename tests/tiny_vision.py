"""Tiny random ViTs built offline from a config, and random images, for the vision tests and the example."""

from __future__ import annotations

import torch
from transformers import AutoModel, ViTConfig

from layerexit.model import MultiExitModel

IMAGE, PATCH, CHANNELS = 8, 2, 1
LAYERS, NUM_LABELS = 4, 3


def vit_config(layers: int = LAYERS, hidden: int = 32) -> ViTConfig:
    return ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=hidden,
                     num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37, initializer_range=0.1)


def make_vit(feature: str | None = "cls", seed: int = 0, double: bool = True, head_scale: float = 4.0,
             layers: int = LAYERS) -> MultiExitModel:
    """A multi-exit model on a tiny random ViT (eval mode); exit weights scaled so confidences spread."""
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(vit_config(layers)).eval()
    torch.manual_seed(seed + 1)
    model = MultiExitModel.from_module(backbone, NUM_LABELS, exit_feature=feature)
    with torch.no_grad():
        for head in model.exits:
            head.linear.weight.mul_(head_scale)
            head.linear.bias.normal_(0.0, 0.5)
    if double:
        model.double()
    return model.eval()


def make_images(n: int = 16, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(n, channels, image, image) random images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=gen).to(dtype)
