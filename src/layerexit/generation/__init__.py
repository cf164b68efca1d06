"""Early exit for generation on decoder LMs: adapters, exit heads, per-token rules, KV-cache strategies,
self-speculative decoding, exit training and evaluation. Generation runs at batch size 1."""

from .adapters import DECODERS, DecoderAdapter, decoder_adapter_for
from .cache import LayerKVCache
from .decode import KV_STRATEGIES, Generation, generate
from .model import EarlyExitLM
from .rules import TOKEN_RULES, TokenRule, make_token_rule
from .speculative import generate_speculative

__all__ = ["DECODERS", "DecoderAdapter", "decoder_adapter_for", "LayerKVCache", "KV_STRATEGIES", "Generation",
           "generate", "EarlyExitLM", "TOKEN_RULES", "TokenRule", "make_token_rule", "generate_speculative"]
