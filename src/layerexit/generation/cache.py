"""A KV cache whose layers may hold different numbers of positions.

transformers' ``DynamicCache`` assumes every layer advances together; after an early exit the skipped layers
lag behind (deferred recomputation) or are filled from another hidden state (state propagation), and
speculative decoding rolls layers back. This cache keeps one growing buffer per layer with its own length;
the attention modules of transformers only call :meth:`update`, so it plugs into unmodified layers.
Batch rows share one length (generation here runs at batch size 1).
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """Per-layer key/value buffers (B, kv_heads, capacity, head_dim) with per-layer lengths."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append (B, h, n, d) keys/values to layer ``layer_idx``; return everything it holds."""
        n = key.shape[2]
        cur = self.lengths[layer_idx]
        buf = self.keys[layer_idx]
        if buf is None or cur + n > buf.shape[2]:  # grow geometrically: appends stay amortised O(n)
            capacity = max(64, 2 * (cur + n))
            new_k = key.new_empty(*key.shape[:2], capacity, key.shape[3])  # (B, h, cap, d)
            new_v = value.new_empty(*value.shape[:2], capacity, value.shape[3])
            if buf is not None:
                new_k[:, :, :cur] = buf[:, :, :cur]
                new_v[:, :, :cur] = self.values[layer_idx][:, :, :cur]
            self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        self.keys[layer_idx][:, :, cur:cur + n] = key
        self.values[layer_idx][:, :, cur:cur + n] = value
        self.lengths[layer_idx] = cur + n
        return self.keys[layer_idx][:, :, :cur + n], self.values[layer_idx][:, :, :cur + n]

    def crop(self, length: int, layers: range | None = None) -> None:
        """Forget positions ``length`` and later in ``layers`` (default all)."""
        for layer in layers if layers is not None else range(len(self.lengths)):
            self.lengths[layer] = min(self.lengths[layer], length)
