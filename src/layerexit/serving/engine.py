"""The serving engine: the model's own primitives, driven one layer step at a time for rows that come and go.

A :class:`Row` is one input in flight: its tokens, the rule that decides its exit, that rule's per-row state
and, once embedded, its hidden states (T_i, H) trimmed to its own length. :meth:`Engine.step` runs one layer
for any set of rows waiting at that layer, whatever request or batch they came from: it re-pads their hidden
states to the longest row of the step (right padding, masked), rebuilds the layer arguments with the encoder's
own ``prepare``, calls :meth:`MultiExitModel.run_layers` and the layer's exit head, and asks each row's rule
whether it exits. There is no second copy of the model maths: the schedulers only choose which rows to step.

Rows that share a step may carry different rules (per-request thresholds or target accuracies): the step
groups them by rule object, so rules see their own rows and their own per-row state only.

Padding choice: re-padding to the step's longest row (not length buckets or packing). Positions were added at
embedding time and the attention mask hides padded keys, so a row's hidden states do not depend on the padding
around it (up to floating-point rounding); the price is the padded tokens computed for nothing, which
:attr:`StepStats.padded_tokens` counts so that a benchmark can report it.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..backbones import EncoderState
from ..errors import bad_value
from ..model import MultiExitModel
from ..rules import ExitRule

_ids = itertools.count()


@dataclass
class Prediction:
    """What a row answers: its exit's probabilities over the labels, the exit taken (1-based) and timings."""

    probabilities: list[float]
    exit_layer: int
    logits: list[float]
    #: cumulative cost of exiting at each layer up to the exit, as a fraction of the full model (layers)
    cost: float


@dataclass(eq=False)
class Row:
    """One input in flight. ``layer`` is the next layer to run (0-based); ``hidden`` is (T_i, H)."""

    input_ids: torch.Tensor  # (T_i,)
    token_type_ids: torch.Tensor | None  # (T_i,) or None
    rule: ExitRule
    future: Future = field(default_factory=Future)
    rule_state: dict[str, torch.Tensor] = field(default_factory=dict)
    layer: int = 0
    hidden: torch.Tensor | None = None
    created: float = field(default_factory=time.perf_counter)
    waiting_since: float = 0.0  # when the row arrived at its current layer (perf_counter)
    id: int = field(default_factory=lambda: next(_ids))
    #: called with (row, prediction) when the row exits, before its future resolves (budget controller)
    on_exit: Any = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class StepStats:
    """Running totals of the work done, for metrics and benchmarks."""

    steps: int = 0
    rows_run: int = 0  # row-layers computed
    real_tokens: int = 0
    padded_tokens: int = 0  # tokens computed only because a longer row shared the step
    rows_per_layer: list[int] = field(default_factory=list)


class Engine:
    """A loaded :class:`MultiExitModel` and its tokenizer, stepped one layer at a time (not thread-safe: one
    scheduler thread drives it)."""

    def __init__(self, model: MultiExitModel, tokenizer=None, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.num_layers = model.config.num_layers
        self.max_length = int(max_length or model.config.max_length)
        self.labels = list(model.config.label_names)
        self.uses_token_types = model.adapter.uses_token_type_ids
        self.pad_id = int(getattr(model.backbone.config, "pad_token_id", None) or 0)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stats = StepStats(rows_per_layer=[0] * self.num_layers)
        self._prepare = None  # the encoder's prepare(hidden, mask), taken from the first embedded state
        #: called with (row, prediction) for every row that exits (metrics); must be quick and never raise
        self.observers: list = []

    # --- tokens ----------------------------------------------------------------------------------------
    def encode(self, texts: list[str], pairs: list[str] | None = None, truncate: bool = True
               ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Tokenize texts (and second texts of pairs): one (input_ids (T_i,), token_type_ids (T_i,) | None)
        per text. Longer inputs are cut to ``max_length`` tokens (the tokenizer's own truncation, which keeps
        the special tokens and, for pairs, shortens the longer text first); with ``truncate=False`` they are
        refused with an error naming the input and its length."""
        if self.tokenizer is None:
            raise bad_value("tokenizer", None, "the engine was built without a tokenizer: pass token ids to rows")
        encoded = self.tokenizer(texts, pairs, truncation=False)
        out = []
        for i, ids in enumerate(encoded["input_ids"]):
            types = encoded.get("token_type_ids")
            types = types[i] if types is not None else None
            if len(ids) > self.max_length:
                if not truncate:
                    raise InputTooLong(i, len(ids), self.max_length)
                one = self.tokenizer(texts[i], pairs[i] if pairs else None, truncation=True,
                                     max_length=self.max_length)
                ids, types = one["input_ids"], one.get("token_type_ids")
            out.append((torch.tensor(ids, dtype=torch.long),
                        torch.tensor(types, dtype=torch.long) if types is not None and self.uses_token_types
                        else None))
        return out

    def new_row(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, rule: ExitRule) -> Row:
        rule.bind(self.num_layers, self.config.num_labels)
        return Row(input_ids, token_type_ids, rule, rule_state=rule.init_state(1))  # every value (1, ...)

    # --- the two steps --------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, rows: list[Row]) -> None:
        """Embed new rows (their state before layer 0), batched, then keep each row's own (T_i, H)."""
        with self.model.backend.host():
            self._embed(rows)

    def _embed(self, rows: list[Row]) -> None:
        ids = pad_sequence([r.input_ids for r in rows], batch_first=True, padding_value=self.pad_id)
        ids = ids.to(self.device)  # (n, T)
        mask = _mask([r.length for r in rows], self.device)  # (n, T)
        types = None
        if self.uses_token_types and all(r.token_type_ids is not None for r in rows):
            types = pad_sequence([r.token_type_ids for r in rows], batch_first=True).to(self.device)
        state = self.model.start(ids, mask, types)
        self._prepare = state.prepare
        now = time.perf_counter()
        for i, row in enumerate(rows):
            row.hidden = state.hidden[i, : row.length]  # (T_i, H)
            row.layer = 0
            row.waiting_since = now

    @torch.inference_mode()
    def step(self, rows: list[Row], layer: int) -> list[Row]:
        """Run ``layer`` (0-based) for ``rows`` (all waiting at it); returns the rows that exited there.

        Exited rows get their prediction (and their future resolves); the others move to ``layer + 1``.
        """
        assert all(r.layer == layer for r in rows), "every row of a step waits at that step's layer"
        with self.model.backend.host():
            return self._step(rows, layer)

    def _step(self, rows: list[Row], layer: int) -> list[Row]:
        lengths = [r.length for r in rows]
        hidden = pad_sequence([r.hidden for r in rows], batch_first=True)  # (n, T, H), zeros past each row's end
        mask = _mask(lengths, hidden.device)  # (n, T)
        state = EncoderState(hidden, mask, self._prepare)
        state, feature, logits = self.model.run_layer_and_exit(state, layer)  # (n, H), (n, C)
        n, width = hidden.shape[0], hidden.shape[1]
        self.stats.steps += 1
        self.stats.rows_run += n
        self.stats.real_tokens += sum(lengths)
        self.stats.padded_tokens += n * width - sum(lengths)
        self.stats.rows_per_layer[layer] += n
        done = torch.ones(n, dtype=torch.bool) if layer == self.num_layers - 1 else self._decide(
            rows, logits, layer, feature)
        exited, now = [], time.perf_counter()
        probabilities = logits.double().softmax(dim=-1)  # (n, C)
        for i, row in enumerate(rows):
            if bool(done[i]):
                row.layer = layer + 1
                row.hidden = None
                self._finish(row, logits[i], probabilities[i], layer + 1)
                exited.append(row)
            else:
                row.hidden = state.hidden[i, : row.length]  # (T_i, H)
                row.layer = layer + 1
                row.waiting_since = now
        return exited

    def run(self, rows: list[Row]) -> None:
        """Run rows as one batch to their exits (rows leave as they exit): the reference path of a scheduler."""
        self.embed(rows)
        for layer in range(self.num_layers):
            rows = [r for r in rows if r not in self.step(rows, layer)]
            if not rows:
                return

    # --- helpers --------------------------------------------------------------------------------------
    def _decide(self, rows: list[Row], logits: torch.Tensor, layer: int, feature: torch.Tensor) -> torch.Tensor:
        """(n, C) logits -> (n,) bool exits, asking each rule about its own rows with their own state."""
        done = torch.zeros(len(rows), dtype=torch.bool)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(id(row.rule), []).append(i)
        for members in groups.values():
            rule = rows[members[0]].rule
            index = torch.tensor(members, device=logits.device)
            state = _join_state([rows[i].rule_state for i in members])
            signals = self.model.rule_signals(rule, layer, feature[index], logits[index])  # this rule's rows only
            state.update(signals)
            exits = rule.should_exit(logits[index], layer, state).cpu()  # (k,)
            for name in signals:  # per-layer signals are not carried to the next layer
                state.pop(name)
            for i, one in zip(members, _split_state(state, len(members))):
                rows[i].rule_state = one
            done[members] = exits
        return done

    def _finish(self, row: Row, logits: torch.Tensor, probabilities: torch.Tensor, exit_layer: int) -> None:
        prediction = Prediction(probabilities.tolist(), exit_layer, logits.double().tolist(),
                                exit_layer / self.num_layers)
        for observer in ([row.on_exit] if row.on_exit is not None else []) + self.observers:
            try:
                observer(row, prediction)
            except Exception:  # an observer's bug must never lose the answer
                pass
        if not row.future.done():
            row.future.set_result(prediction)


class InputTooLong(Exception):
    """An input longer than the model's maximum, refused because the client asked not to truncate."""

    def __init__(self, index: int, length: int, limit: int):
        super().__init__(f"inputs[{index}] has {length} tokens, more than the model's maximum of {limit}; send "
                         "shorter text or allow truncation (\"truncate\": true)")
        self.index, self.length, self.limit = index, length, limit


def _mask(lengths: list[int], device) -> torch.Tensor:
    """(n,) lengths -> (n, max) right-padded attention mask of 1s and 0s."""
    lengths_t = torch.tensor(lengths, device=device)
    return (torch.arange(max(lengths), device=device)[None, :] < lengths_t[:, None]).long()


def _join_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not states or not states[0]:
        return {}
    return {key: torch.cat([s[key] for s in states]) for key in states[0]}


def _split_state(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """A rule state with leading dimension n -> n one-row states."""
    return [{k: v[i : i + 1] for k, v in state.items()} for i in range(n)]
