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


@dataclass
class TokenFlow:
    """The rows a generated token drags through the layers: its own, plus (deferred recomputation) pending
    tokens that joined it. hidden (1, n, H) for positions ``start..start+n-1``, and the layer call arguments."""

    hidden: torch.Tensor
    start: int
    positions: torch.Tensor
    kwargs: dict


class Propagate:
    """State propagation (CALM; ConsistentEE's decoder version): after a token exits at layer e, its exit
    hidden state goes through each skipped layer's own K/V projections, so layers e+1..L hold keys and
    values for it at once."""

    name = "propagate"

    def __init__(self, model, cache: LayerKVCache, prompt_length: int):
        self.cache, self.adapter, self.project = cache, model.adapter, None

    def before_layer(self, index: int, flow: TokenFlow, adapter) -> TokenFlow:
        return flow  # nothing is ever pending

    def after_token(self, exit_layer: int, flow: TokenFlow, num_layers: int, p: int) -> None:
        if exit_layer == num_layers:
            return
        if self.project is None:  # built once per generation, at the first early exit
            self.project = self.adapter.kv_projector()
        last = flow.hidden[:, -1:]  # (1, 1, H); no pending tokens under propagation: kwargs are this token's
        for index, (key, value) in enumerate(self.project(exit_layer, last, flow.kwargs), start=exit_layer):
            self.cache.update(key, value, index)  # (1, h, 1, d) each


class Recompute:
    """Deferred recomputation (EE-LLM; FREE): an exited token's hidden state waits; the next token that goes
    deeper than it takes it along through the layers it skipped, so every cached key and value is the exact
    one of the tokens' real (early-exited) path."""

    name = "recompute"

    def __init__(self, model, cache: LayerKVCache, prompt_length: int):
        self.cache = cache
        self.pending: torch.Tensor | None = None  # (1, m, H): positions base..base+m-1 at the input of their depth
        self.base = prompt_length

    def before_layer(self, index: int, flow: TokenFlow, adapter) -> TokenFlow:
        have = self.cache.length(index)
        if have >= flow.start:
            return flow
        # pending tokens missing at this layer join the block
        hidden = torch.cat([self.pending[:, have - self.base:flow.start - self.base], flow.hidden], dim=1)  # (1, n, H)
        end = flow.start + flow.hidden.shape[1]
        positions = torch.arange(have, end, device=hidden.device)
        return TokenFlow(hidden, have, positions, adapter.layer_kwargs(hidden, positions))

    def after_token(self, exit_layer: int, flow: TokenFlow, num_layers: int, p: int) -> None:
        if exit_layer == num_layers:
            self.pending, self.base = None, p + 1
            return
        new_base = self.cache.length(num_layers - 1)
        if self.pending is not None:
            kept = self.pending[:, new_base - self.base:flow.start - self.base]
        else:
            kept = flow.hidden[:, :0]
        self.pending = torch.cat([kept, flow.hidden], dim=1)  # (1, p + 1 - new_base, H)
        self.base = new_base


KV_STRATEGIES = {"propagate": Propagate, "recompute": Recompute}


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, rule: TokenRule | None = None, max_new_tokens: int = 32,
             kv: str = "propagate", eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy decoding where each new token stops at the first layer ``rule`` accepts.

    ``rule=None`` (or ``never``) runs the full model, the reference the exits are measured against.
    ``kv`` fills the skipped layers' KV cache (see ``KV_STRATEGIES``). ``on_token`` is called with every token
    as soon as it is chosen (streaming).
    """
    if kv not in KV_STRATEGIES:
        raise bad_value("kv", kv, f"choose one of {', '.join(KV_STRATEGIES)}")
    prompt_length = check_request(model, input_ids, max_new_tokens)
    rule = (rule or make_token_rule("never")).bind(model.num_layers, model.adapter.vocab_size)
    rule.with_horizon(max_new_tokens)
    L, adapter, device = model.num_layers, model.adapter, input_ids.device
    start = time.perf_counter()
    cache = LayerKVCache(L)
    strategy = KV_STRATEGIES[kv](model, cache, prompt_length)
    token = greedy_token(model.exit_logits(L, prefill(model, input_ids, cache)))
    tokens, exits, layer_tokens = [token], [L], 0
    if on_token:
        on_token(token)
    while len(tokens) < max_new_tokens and token != eos_token_id:
        p = prompt_length + len(tokens) - 1  # position of the token being fed
        positions = torch.tensor([p], device=device)
        hidden = adapter.embed(torch.tensor([[token]], device=device), positions)  # (1, 1, H)
        flow = TokenFlow(hidden, p, positions, adapter.layer_kwargs(hidden, positions))
        if rule.is_full:
            hidden = adapter.run_layers(flow.hidden, 0, L, positions, cache, flow.kwargs)
            exit_layer, logits, layer_tokens = L, model.exit_logits(L, hidden[0, -1]), layer_tokens + L
        else:
            flow, exit_layer, logits, ran = _run_token(model, rule, strategy, flow, cache, len(tokens))
            layer_tokens += ran
            strategy.after_token(exit_layer, flow, L, p)
        token = greedy_token(logits)
        tokens.append(token)
        exits.append(exit_layer)
        if on_token:
            on_token(token)
    seconds = time.perf_counter() - start
    return Generation(prompt_length, tokens, exits, L, seconds, layer_tokens,
                      {"kv": kv, "rule": rule.name, "params": rule.params})


def _run_token(model, rule: TokenRule, strategy, flow: TokenFlow, cache: LayerKVCache, t: int):
    """Run the t-th generated token layer by layer until ``rule`` lets it exit (pending tokens joining as the
    strategy says). Returns the final flow, the exit layer (1-based), the exit's (V,) logits and the number
    of (layer, token) computations."""
    L, adapter = model.num_layers, model.adapter
    state = {**rule.init_state(1, device=flow.hidden.device), "position": torch.tensor([t], device=flow.hidden.device)}
    ran = 0
    for index in range(L):
        flow = strategy.before_layer(index, flow, adapter)
        previous = flow.hidden[0, -1]
        hidden = adapter.run_layers(flow.hidden, index, index + 1, flow.positions, cache, flow.kwargs)  # (1, n, H)
        flow = TokenFlow(hidden, flow.start, flow.positions, flow.kwargs)
        ran += hidden.shape[1]
        layer = index + 1
        if layer < L and rule.may_exit_at(layer):
            logits = model.exit_logits(layer, hidden[0, -1]) if rule.reads_logits else None  # (V,)
            state.update(token_signals(model, rule.needs, layer, hidden[0, -1:], previous[None]))
            if bool(rule.should_exit(None if logits is None else logits[None], index, state)[0]):
                return flow, layer, logits if logits is not None else model.exit_logits(layer, hidden[0, -1]), ran
    return flow, L, model.exit_logits(L, flow.hidden[0, -1]), ran
