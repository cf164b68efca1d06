"""Per-architecture adapters for decoder LMs: where an unmodified causal LM keeps its parts.

An adapter embeds tokens at given positions, prepares what every layer call needs (rotary position
embeddings for Llama), runs layer ``i`` against a KV cache, projects a hidden state to layer ``i``'s keys and
values (state propagation), and exposes the final norm and LM head. Everything else (the early-exit decoder,
speculative decoding, training) goes through :meth:`DecoderAdapter.run_layers`, the one primitive that runs a
range of layers for consecutive positions against a cache (LayerSkip's ``forward_early`` /
``forward_remainder`` idea, Elhoushi et al. ACL 2024).

Verified (token-for-token equality with ``generate`` in the test suite, tiny random models): ``llama``,
``mistral``, ``qwen2`` (same layer layout: pre-norm, rotary, GQA, ``k_proj``/``v_proj``) and ``gpt2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import catalog
from ..backbones.base import LayerStackAdapter
from ..errors import bad_value
from ..registry import Registry
from .cache import LayerKVCache

DECODERS: Registry[type["DecoderAdapter"]] = Registry("decoder", {n: d for n, (_, d) in catalog.DECODERS.items()})
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class DecoderAdapter(LayerStackAdapter):
    """Base adapter. Subclasses fill in the structure and the per-layer K/V projection, and name the modules
    LoRA adapts (``lora_targets``; ``lora_fan_in_fan_out`` when they store their weight transposed)."""

    lora_targets: tuple[str, ...] = ()
    lora_fan_in_fan_out: bool = False

    def __init__(self, lm: nn.Module):
        super().__init__(lm)
        self.lm = lm
        impl = getattr(self.config, "_attn_implementation", "eager") or "eager"
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise bad_value("attn_implementation", impl, "load the model with attn_implementation='sdpa' or "
                            "'eager'; the layer-range primitive builds its own causal masks for those two")
        self.attn_implementation = impl

    # --- structure (layers, num_layers, hidden_size: see LayerStackAdapter) --------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def sliding_window(self) -> int | None:
        """Attention window the causal masks built here ignore; longer sequences are refused."""
        return None

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.lm_head

    # --- computation ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, n) token ids at ``positions`` (n,) -> (B, n, H) input of layer 0."""
        raise NotImplementedError

    def layer_kwargs(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """Extra arguments of every layer call for tokens at ``positions`` (n,)."""
        return {}

    def run_layer(self, index: int, hidden: torch.Tensor, mask, kwargs: dict, cache) -> torch.Tensor:
        """Layer ``index`` (0-based): (B, n, H) -> (B, n, H); appends the n tokens' K/V to ``cache``."""
        raise NotImplementedError

    def project_kv(self, index: int, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values of (B, n, H) inputs, each (B, kv_heads, n, head_dim), as cached."""
        raise NotImplementedError

    def kv_projector(self):
        """A function ``(start, hidden (B, n, H), kwargs) -> [(key, value)]`` for layers start..L-1, used by
        state propagation; the default calls :meth:`project_kv` layer by layer."""
        def project(start, hidden, kwargs):
            return [self.project_kv(index, hidden, kwargs) for index in range(start, self.num_layers)]

        return project

    def causal_mask(self, q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor | None:
        """Additive mask (1, 1, q_len, kv_len) for queries at the last q_len of kv_len positions, or None.

        None where attention is causal without one: a single query sees the whole cache; SDPA with
        q_len == kv_len uses its own ``is_causal`` path (as transformers does, keeping outputs identical).
        """
        if q_len == 1 or (self.attn_implementation == "sdpa" and q_len == kv_len):
            return None
        q_pos = torch.arange(kv_len - q_len, kv_len, device=like.device)[:, None]  # (q, 1)
        k_pos = torch.arange(kv_len, device=like.device)[None, :]  # (1, kv)
        mask = torch.zeros(q_len, kv_len, dtype=like.dtype, device=like.device)
        mask.masked_fill_(k_pos > q_pos, torch.finfo(like.dtype).min)
        return mask[None, None]  # (1, 1, q, kv)

    def run_layers(self, hidden: torch.Tensor, start: int, stop: int, positions: torch.Tensor,
                   cache: LayerKVCache | None = None, kwargs: dict | None = None) -> torch.Tensor:
        """Run layers ``start..stop-1`` (0-based) for tokens at consecutive ``positions`` (n,).

        hidden (B, n, H) is the input of layer ``start``; returns the output of layer ``stop-1``. With a
        cache, every layer in the range must hold exactly the positions before ``positions[0]`` (the
        deferred-recomputation and speculative code keep that invariant); their K/V for the n tokens are
        appended. Without a cache (training, scoring) the n tokens attend causally among themselves.
        """
        n = hidden.shape[1]
        first = int(positions[0]) if n else 0
        if cache is not None:
            for index in range(start, stop):
                if cache.length(index) != first:
                    raise RuntimeError(f"layer {index} caches {cache.length(index)} positions, expected {first}")
        kv_len = first + n if cache is not None else n
        mask = self.causal_mask(n, kv_len, hidden)
        if kwargs is None:
            kwargs = self.layer_kwargs(hidden, positions)
        for index in range(start, stop):
            hidden = self.run_layer(index, hidden, mask, kwargs, cache)  # (B, n, H)
        return hidden


@DECODERS.register("llama")
class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral", "qwen2")
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.model.layers

    @property
    def sliding_window(self) -> int | None:
        if self.config.model_type == "qwen2" and not getattr(self.config, "use_sliding_window", False):
            return None
        return getattr(self.config, "sliding_window", None)

    def final_norm(self, hidden):
        return self.lm.model.norm(hidden)

    def embed(self, input_ids, positions):
        return self.lm.model.embed_tokens(input_ids)  # (B, n, H)

    def layer_kwargs(self, hidden, positions):
        position_ids = positions[None, :]  # (1, n)
        return {"position_ids": position_ids,
                "position_embeddings": self.lm.model.rotary_emb(hidden, position_ids=position_ids)}

    def run_layer(self, index, hidden, mask, kwargs, cache):
        return self.layers[index](hidden, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
                                  **kwargs)

    def project_kv(self, index, hidden, kwargs):
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)  # (B, n, H)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        key = attn.k_proj(x).view(shape).transpose(1, 2)  # (B, kv_heads, n, d)
        value = attn.v_proj(x).view(shape).transpose(1, 2)  # (B, kv_heads, n, d)
        cos, sin = kwargs["position_embeddings"]  # (1, n, d) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, n, d)
        half = key.shape[-1] // 2
        rotated = torch.cat((-key[..., half:], key[..., :half]), dim=-1)
        return key * cos + rotated * sin, value


    def kv_projector(self):
        """Fused state propagation: RMSNorm's scale folded into every layer's K/V weights, so all skipped
        layers' keys and values come from one batched product (built per call: LoRA-wrapped or otherwise
        non-plain projections fall back to the layer-by-layer path)."""
        layers = list(self.layers)
        attn = layers[0].self_attn
        plain = all(type(l.self_attn.k_proj) is nn.Linear and type(l.self_attn.v_proj) is nn.Linear
                    and type(l.input_layernorm).__name__.endswith("RMSNorm") for l in layers)
        if not plain:
            return super().kv_projector()
        with torch.no_grad():
            weight = torch.stack([torch.cat([l.self_attn.k_proj.weight, l.self_attn.v_proj.weight])
                                  * l.input_layernorm.weight[None, :] for l in layers])  # (L, 2D, H)
            bias = torch.stack([torch.cat([l.self_attn.k_proj.bias, l.self_attn.v_proj.bias])
                                if l.self_attn.k_proj.bias is not None else weight.new_zeros(weight.shape[1])
                                for l in layers])  # (L, 2D)
        eps = layers[0].input_layernorm.variance_epsilon
        head_dim, width = attn.head_dim, weight.shape[1] // 2

        def project(start, hidden, kwargs):
            if start >= len(layers):
                return []
            x = hidden.float()
            x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)  # (B, n, H)
            kv = torch.einsum("ldh,bnh->lbnd", weight[start:], x) + bias[start:, None, None]  # (l, B, n, 2D)
            shape = (*kv.shape[:3], -1, head_dim)
            key = kv[..., :width].reshape(shape).transpose(2, 3)  # (l, B, kv_heads, n, d)
            value = kv[..., width:].reshape(shape).transpose(2, 3)
            cos, sin = kwargs["position_embeddings"]  # (1, n, d)
            cos, sin = cos[:, None], sin[:, None]  # (1, 1, n, d)
            half = head_dim // 2
            rotated = torch.cat((-key[..., half:], key[..., :half]), dim=-1)
            key = key * cos + rotated * sin
            return list(zip(key.unbind(0), value.unbind(0)))

        return project


@DECODERS.register("gpt2")
class GPT2Adapter(DecoderAdapter):
    model_types = ("gpt2",)
    lora_targets = ("c_attn",)
    lora_fan_in_fan_out = True  # GPT-2's Conv1D stores W transposed

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.transformer.h

    @property
    def max_positions(self) -> int | None:
        return self.config.n_positions

    def final_norm(self, hidden):
        return self.lm.transformer.ln_f(hidden)

    def embed(self, input_ids, positions):
        tr = self.lm.transformer
        return tr.drop(tr.wte(input_ids) + tr.wpe(positions)[None])  # (B, n, H)

    def run_layer(self, index, hidden, mask, kwargs, cache):
        return self.layers[index](hidden, past_key_values=cache, attention_mask=mask, use_cache=cache is not None)

    def project_kv(self, index, hidden, kwargs):
        layer = self.layers[index]
        attn = layer.attn
        _, key, value = attn.c_attn(layer.ln_1(hidden)).split(attn.split_size, dim=2)  # (B, n, H) each
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)  # (B, heads, n, d)


def decoder_adapter_for(lm: nn.Module) -> DecoderAdapter:
    """The adapter for a causal LM, chosen by ``config.model_type``."""
    model_type = getattr(lm.config, "model_type", None)
    for name in DECODERS.names():
        cls = DECODERS.get(name)
        if model_type in cls.model_types:
            return cls(lm)
    known = sorted(t for n in DECODERS.names() for t in DECODERS.get(n).model_types)
    raise bad_value("model_type", model_type, f"decoder early exit supports {', '.join(known)}; add an adapter "
                    "in layerexit/generation/adapters.py for other layouts")
