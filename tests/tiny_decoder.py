"""Tiny random decoder LMs (Llama, Mistral, Qwen2, GPT-2) built offline from configs, in float64."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 97
DECODER_ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def decoder_config(arch: str, layers: int = 4, hidden: int = 32, attn: str = "sdpa"):
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "mistral":
        config = MistralConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        raise KeyError(arch)
    config._attn_implementation = attn
    return config


def make_lm(arch: str, seed: int = 0, scale: float = 1.0, **kwargs) -> torch.nn.Module:
    """A tiny random causal LM in eval mode, float64 (greedy ties are then practically impossible).

    ``scale`` multiplies the LM head so that exit confidences spread out (random heads are near uniform).
    """
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(decoder_config(arch, **kwargs)).double().eval()
    if scale != 1.0:
        with torch.no_grad():
            lm.get_output_embeddings().weight.mul_(scale)
    return lm


def prompt(length: int = 7, seed: int = 0) -> torch.Tensor:
    """(1, length) random ids avoiding the special ids 0-2."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=gen)
