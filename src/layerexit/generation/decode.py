"""Greedy decoding with per-token early exit, and the two ways of filling the KV cache of skipped layers.

When a token exits at layer e, layers e+1..L hold no keys/values for it. ``kv="propagate"`` (state
propagation, CALM, Schuster et al. NeurIPS 2022; ConsistentEE-LLM, Zeng et al. AAAI 2024) feeds the exit
hidden state through each skipped layer's own K/V projections. ``kv="recompute"`` (deferred recomputation,
EE-LLM, Chen et al. ICML 2024; FREE) keeps the exit hidden states and runs the skipped layers for those
pending tokens together with the next token that goes deep enough, so every cached K/V is the exact one of
the tokens' real (early-exited) path. Both run through :meth:`DecoderAdapter.run_layers`.

Batch size 1: one prompt at a time, (1, T) ids; the prompt itself always runs the full model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import bad_value
from .cache import LayerKVCache
from .rules import TokenRule, make_token_rule, token_signals

KV_STRATEGIES = ("propagate", "recompute")


@dataclass
class Generation:
    """One prompt's greedy continuation and what it cost."""

    prompt_length: int
    tokens: list[int]
    exit_layers: list[int]  # per generated token (1-based); empty for speculative decoding
    num_layers: int
    seconds: float
    layer_tokens: int = 0  # (layer, token) computations after the prompt, recomputed ones included
    stats: dict = field(default_factory=dict)

    @property
    def avg_layers(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float(self.num_layers)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def check_request(model, input_ids: torch.Tensor, max_new_tokens: int) -> int:
    """Validate a generation request; returns the prompt length."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise bad_value("input_ids", tuple(input_ids.shape), "generation runs one prompt at a time: pass (1, T) ids")
    length = input_ids.shape[1]
    if length < 1:
        raise bad_value("prompt", "", "give a prompt of at least one token")
    if int(max_new_tokens) < 1:
        raise bad_value("max_new_tokens", max_new_tokens, "ask for at least one new token")
    limit = model.adapter.max_positions
    if limit is not None and length + max_new_tokens > limit:
        raise bad_value("prompt", f"{length} tokens + max_new_tokens={max_new_tokens}",
                        f"the model's context is {limit} positions; shorten the prompt or lower max_new_tokens")
    window = model.adapter.sliding_window
    if window is not None and length + max_new_tokens > window:
        raise bad_value("max_new_tokens", max_new_tokens, f"prompt + new tokens exceed the sliding window "
                        f"({window}) which these exits do not implement; stay within {window} positions")
    return length


def prefill(model, input_ids: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
    """Run the whole prompt through every layer; returns the last position's final hidden state (H,)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    hidden = model.adapter.embed(input_ids, positions)  # (1, T, H)
    hidden = model.adapter.run_layers(hidden, 0, model.num_layers, positions, cache)
    return hidden[0, -1]


def greedy_token(logits: torch.Tensor) -> int:
    """(V,) or (1, V) logits of one position -> the greedy token id."""
    return int(logits.argmax(dim=-1))


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, rule: TokenRule | None = None, max_new_tokens: int = 32,
             kv: str = "propagate", eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy decoding where each new token stops at the first layer ``rule`` accepts.

    ``rule=None`` (or ``never``) runs the full model, the reference the exits are measured against.
    ``on_token`` is called with every token as soon as it is chosen (streaming).
    """
    if kv not in KV_STRATEGIES:
        raise bad_value("kv", kv, f"choose one of {', '.join(KV_STRATEGIES)}")
    prompt_length = check_request(model, input_ids, max_new_tokens)
    rule = (rule or make_token_rule("never")).bind(model.num_layers, model.adapter.vocab_size)
    rule.with_horizon(max_new_tokens)
    full = rule.is_full
    L, adapter, device = model.num_layers, model.adapter, input_ids.device
    start = time.perf_counter()
    project = adapter.kv_projector() if kv == "propagate" and not full else None
    cache = LayerKVCache(L)
    token = greedy_token(model.exit_logits(L, prefill(model, input_ids, cache)))
    tokens, exits, layer_tokens = [token], [L], 0
    if on_token:
        on_token(token)
    pending = None  # recompute: (1, m, H) hidden states of positions base..p-1 at the input of their depth
    base = prompt_length
    while len(tokens) < max_new_tokens and token != eos_token_id:
        p = prompt_length + len(tokens) - 1  # position of the token being fed
        positions = torch.tensor([p], device=device)
        flow = adapter.embed(torch.tensor([[token]], device=device), positions)  # (1, 1, H)
        kwargs = adapter.layer_kwargs(flow, positions)
        if full:
            flow = adapter.run_layers(flow, 0, L, positions, cache, kwargs)
            layer_tokens += L
            token = greedy_token(model.exit_logits(L, flow[0, -1]))
            tokens.append(token)
            exits.append(L)
            if on_token:
                on_token(token)
            continue
        flow_start, exit_logits, exit_layer = p, None, L
        state = {**rule.init_state(1, device=device), "position": torch.tensor([len(tokens)], device=device)}
        for index in range(L):
            have = cache.length(index)
            if have < flow_start:  # recompute: pending tokens missing at this layer join the block
                flow = torch.cat([pending[:, have - base:flow_start - base], flow], dim=1)  # (1, n, H)
                flow_start = have
                positions = torch.arange(flow_start, p + 1, device=device)
                kwargs = adapter.layer_kwargs(flow, positions)
            previous = flow[0, -1]
            flow = adapter.run_layers(flow, index, index + 1, positions, cache, kwargs)  # (1, n, H)
            layer_tokens += flow.shape[1]
            layer = index + 1
            if layer < L and rule.is_candidate(layer):
                logits = model.exit_logits(layer, flow[0, -1]) if rule.reads_logits else None  # (V,)
                state.update(token_signals(model, rule.rule.needs, layer, flow[0, -1], previous))
                if bool(rule.should_exit(None if logits is None else logits[None], index, state)[0]):
                    exit_layer, exit_logits = layer, logits
                    break
        hidden = flow[0, -1]  # (H,)
        if exit_layer < L:
            if kv == "propagate":
                last = flow[:, -1:]  # (1, 1, H); no pending tokens under propagation, so kwargs are this token's
                for index, (key, value) in enumerate(project(exit_layer, last, kwargs), start=exit_layer):
                    cache.update(key, value, index)  # (1, h, 1, d) each
            else:
                new_base = cache.length(L - 1)
                kept = pending[:, new_base - base:flow_start - base] if pending is not None else flow[:, :0]
                pending = torch.cat([kept, flow], dim=1)  # (1, p + 1 - new_base, H)
                base = new_base
        elif kv == "recompute":
            pending, base = None, p + 1
        token = greedy_token(exit_logits if exit_logits is not None else model.exit_logits(exit_layer, hidden))
        tokens.append(token)
        exits.append(exit_layer)
        if on_token:
            on_token(token)
    seconds = time.perf_counter() - start
    return Generation(prompt_length, tokens, exits, L, seconds, layer_tokens,
                      {"kv": kv, "rule": rule.name, "params": rule.params})
