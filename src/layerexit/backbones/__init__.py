"""Backbone adapters: one small class per architecture family, chosen by ``config.model_type``."""

from .base import EncoderAdapter, EncoderState
from .encoders import ADAPTERS, adapter_for
from .vision import ViTAdapter

__all__ = ["ADAPTERS", "EncoderAdapter", "EncoderState", "ViTAdapter", "adapter_for"]
