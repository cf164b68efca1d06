"""Self-speculative decoding (LayerSkip, Elhoushi et al., ACL 2024).

Draft tokens with the first E layers and the shared exit head, then verify them with the remaining layers
in one pass. The verification reuses the draft's work: the drafted tokens' hidden states after layer E and
the K/V caches of layers 1..E are exactly what the full model would compute for them, so only layers
E+1..L run on the drafts (the last draft, never fed while drafting, runs layers 1..E first). The longest
prefix on which the drafts agree with the full model is kept, plus the full model's next token after it (the
correction, or a bonus token when every draft was accepted), so the output equals greedy decoding of the
full model (up to floating-point summation order). Batch size 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import bad_value
from .cache import LayerKVCache
from .decode import Generation, greedy_token, check_request, prefill


def check_draft_layers(model, draft_layers: int) -> int:
    L = model.num_layers
    if not 1 <= int(draft_layers) < L:
        raise bad_value("draft_layers", draft_layers, f"draft with between 1 and {L - 1} of the model's {L} layers")
    return int(draft_layers)


@dataclass
class DraftHead:
    """The exit head that drafts: the whole LM head (``vocab`` None), or only its rows for ``vocab`` (K,) ids,
    so that drafting costs K/V of the head's time."""

    vocab: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # (K, H) rows of the LM head
    bias: torch.Tensor | None = None  # (K,)

    @classmethod
    def build(cls, model, draft_vocab: torch.Tensor | None) -> "DraftHead":
        if draft_vocab is None:
            return cls()
        vocab = torch.as_tensor(draft_vocab, dtype=torch.long)
        size = model.adapter.vocab_size
        if vocab.dim() != 1 or vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= size:
            raise bad_value("draft_vocab", f"{vocab.numel()} ids", f"give a 1-D tensor of ids in 0..{size - 1}")
        lm_head = model.adapter.lm_head
        bias = lm_head.bias[vocab] if getattr(lm_head, "bias", None) is not None else None
        return cls(vocab, lm_head.weight[vocab], bias)

    @property
    def size(self) -> int | None:
        return None if self.vocab is None else len(self.vocab)

    def draft(self, model, layer: int, hidden: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(H,) hidden state after ``layer`` -> (drafted token id, the head's logits over its vocabulary)."""
        if self.vocab is None:
            logits = model.exit_logits(layer, hidden)  # (V,)
            return greedy_token(logits), logits
        logits = torch.nn.functional.linear(model.exit_hidden(layer, hidden), self.weight, self.bias)  # (K,)
        return int(self.vocab[greedy_token(logits)]), logits


@torch.inference_mode()
def generate_speculative(model, input_ids: torch.Tensor, draft_layers: int, num_draft: int = 4,
                         max_new_tokens: int = 32, eos_token_id: int | None = None,
                         on_token: Callable[[int], None] | None = None,
                         draft_vocab: torch.Tensor | None = None,
                         draft_threshold: float | None = None, bonus: bool = True) -> Generation:
    """Greedy decoding of the full model, sped up by drafting ``num_draft`` tokens with ``draft_layers``.

    ``draft_vocab`` (K,) token ids restricts the draft head to those rows of the LM head (e.g. the corpus's
    most frequent tokens): drafting then costs K/V of the head's time, and the output is still exactly the
    full model's, because verification uses the whole vocabulary. ``draft_threshold`` stops drafting after a
    draft token whose (draft-head) probability is below it, so hopeless drafts are not paid for (an adaptive
    draft length; the token is still proposed, verification is free for it). ``bonus`` runs the last draft
    through layers 1..E too, so that verification also yields the full model's token after it: one extra
    token when every draft is accepted, for E/L of a token's cost every cycle. With a ``draft_threshold`` this
    is done only when the last draft was confident (drafting stopped at ``num_draft``), since an unconfident
    last draft is usually rejected (docs/benchmarks.md has the measured cost of always doing it).
    """
    E = check_draft_layers(model, draft_layers)
    head = DraftHead.build(model, draft_vocab)
    if int(num_draft) < 1:
        raise bad_value("num_draft", num_draft, "draft at least one token per step")
    prompt_length = check_request(model, input_ids, max_new_tokens)
    L = model.num_layers
    start = time.perf_counter()
    cache = LayerKVCache(L)
    token = greedy_token(model.exit_logits(L, prefill(model, input_ids, cache)))
    tokens = [token]  # the last one is always a full-model token not yet fed to the model
    if on_token:
        on_token(token)
    drafted = accepted = bonuses = cycles = layer_tokens = 0
    while len(tokens) < max_new_tokens and token != eos_token_id:
        t = prompt_length + len(tokens) - 1  # position of the last token
        budget = min(int(num_draft), max_new_tokens - len(tokens))
        drafts, states, confident = _draft(model, head, E, cache, token, t, budget, eos_token_id, draft_threshold,
                                           input_ids.device)
        k = len(drafts)
        if bonus and confident and drafts[-1] != eos_token_id and len(tokens) + k < max_new_tokens:
            # d_k joins the verification too, so a fully accepted draft also earns the full model's next token
            states.append(_run_shallow(model, E, cache, drafts[-1], t + k, input_ids.device))
        m = len(states)  # inputs verified: x_t, d_1..d_{k-1}, and d_k when it was fed
        n, new = _verify(model, E, cache, drafts, states, t)
        drafted += k
        accepted += n
        bonuses += int(n == k < m)
        cycles += 1
        layer_tokens += m * L  # each verified input ran layers 1..E drafting and E+1..L verifying
        for tok in new:
            tokens.append(tok)
            if on_token:
                on_token(tok)
            if tok == eos_token_id:
                break
        token = tokens[-1]
    seconds = time.perf_counter() - start
    stats = {"strategy": "speculative", "draft_layers": E, "draft_vocab": head.size, "num_draft": int(num_draft),
             "draft_threshold": draft_threshold, "bonus_enabled": bool(bonus), "drafted": drafted,
             "accepted": accepted, "bonus": bonuses, "cycles": cycles,
             "acceptance": accepted / drafted if drafted else 0.0,
             "tokens_per_cycle": (len(tokens) - 1) / cycles if cycles else 0.0}
    return Generation(prompt_length, tokens, [], L, seconds, layer_tokens, stats)


def _run_shallow(model, E: int, cache: LayerKVCache, token: int, position: int, device) -> torch.Tensor:
    """Feed ``token`` at ``position`` through layers 1..E (writing their cache): (1, 1, H) after layer E."""
    pos = torch.tensor([position], device=device)
    return model.adapter.run_layers(model.adapter.embed(torch.tensor([[token]], device=device), pos), 0, E, pos, cache)


def _draft(model, head: DraftHead, E: int, cache: LayerKVCache, token: int, t: int, budget: int,
           eos_token_id: int | None, draft_threshold: float | None,
           device) -> tuple[list[int], list[torch.Tensor], bool]:
    """Draft up to ``budget`` tokens after ``token`` (at position t) with layers 1..E and the draft head.

    Returns the drafts, the (1, 1, H) states after layer E of the inputs fed (``token``, then every draft but
    the last) and whether the last draft was confident (always, without ``draft_threshold``)."""
    drafts, states, x, confident = [], [], token, True
    for i in range(budget):
        h = _run_shallow(model, E, cache, x, t + i, device)
        states.append(h)
        x, logits = head.draft(model, E, h[0, -1])
        drafts.append(x)
        if x == eos_token_id:
            break
        if draft_threshold is not None:
            confident = float(torch.softmax(logits.float(), -1).max()) >= draft_threshold
            if not confident:
                break
    return drafts, states, confident


def _verify(model, E: int, cache: LayerKVCache, drafts: list[int], states: list[torch.Tensor],
            t: int) -> tuple[int, list[int]]:
    """Run layers E+1..L on the fed inputs in one pass; returns how many drafts the full model accepts and the
    tokens to emit (the accepted drafts, then the full model's next token: the correction, or a bonus)."""
    L, m = model.num_layers, len(states)
    positions = torch.arange(t, t + m, device=states[0].device)
    deep = model.adapter.run_layers(torch.cat(states, dim=1), E, L, positions, cache)  # (1, m, H)
    full = model.exit_logits(L, deep[0]).argmax(dim=-1).tolist()  # (m,) full model's next tokens
    n = 0
    while n < len(drafts) and drafts[n] == full[n]:
        n += 1
    cache.crop(t + n + 1)  # keep inputs x_t, d_1..d_n; forget rejected drafts in every layer
    return n, drafts[:n] + full[n:n + 1]
