"""Run every exit once over a data set and cache the logits (the Zero-Time-Waste pattern).

All rules and thresholds are then simulated over this cache; chosen points are confirmed by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import Encoded, model_inputs


@dataclass
class LogitCache:
    """logits (L, N, C) float32 of every exit for every example, labels (N,), and, for models with
    ConsistentEE policies, each layer's exit probability ``policy`` (L, N)."""

    logits: torch.Tensor
    labels: torch.Tensor
    policy: torch.Tensor | None = None
    #: for an alpha-conditioned policy, its probabilities (L, N) at each alpha of the dial
    policy_by_alpha: dict[float, torch.Tensor] | None = None
    #: the split these examples are (e.g. "dev"); rules fitted on this cache remember it and evaluation refuses
    #: to report them on the same split (see layerexit.rules.fitting)
    split: str = ""
    #: digest of the examples (token ids and labels), so a renamed split is still recognised
    data_id: str = ""
    #: one short digest per example, so evaluating on some of the fitting rows is recognised too
    row_ids: list[str] = field(default_factory=list)

    @property
    def signals(self) -> dict[str, torch.Tensor]:
        """Per-layer signals for rules that need more than logits (see ``ExitRule.needs``)."""
        from ..rules.policy import policy_key

        signals = {"policy": self.policy} if self.policy is not None else {}
        signals.update({policy_key(a): v for a, v in (self.policy_by_alpha or {}).items()})
        return signals

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    @property
    def final_predictions(self) -> torch.Tensor:
        return self.logits[-1].argmax(dim=-1)

    def save(self, path: str | Path) -> None:
        torch.save({"logits": self.logits, "labels": self.labels, "policy": self.policy, "split": self.split,
                    "data_id": self.data_id, "row_ids": self.row_ids, "policy_by_alpha": self.policy_by_alpha}, path)

    @classmethod
    def load(cls, path: str | Path) -> "LogitCache":
        data = torch.load(path, weights_only=True)  # never unpickle objects from a file on disk
        return cls(data["logits"], data["labels"], data.get("policy"), data.get("policy_by_alpha"),
                   split=data.get("split", ""), data_id=data.get("data_id", ""),
                   row_ids=list(data.get("row_ids", [])))


@torch.no_grad()
def collect_logits(model, encoded: Encoded, batch_size: int = 64, progress: bool = True,
                   alphas: list[float] | None = None) -> LogitCache:
    """Every exit's logits over ``encoded``, batching rows of similar length to waste little padding.

    With ConsistentEE policies also their probabilities; for an alpha-conditioned policy at its default alpha
    and at every alpha of ``alphas`` (default: :func:`default_dial` of its trained range).
    """
    if getattr(model, "policies", None) is not None and model.alpha_conditioned and alphas is None:
        alphas = default_dial(model.config.policy_alpha_range)
    alphas = [float(a) for a in alphas or []]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids in encoded.features["input_ids"]])
    order = torch.argsort(lengths, descending=True)
    chunks, policy_chunks, dial_chunks = [], [], []
    for start in tqdm(range(0, len(order), batch_size), desc="exit logits", disable=not progress, leave=False):
        idx = order[start : start + batch_size].tolist()
        batch = encoded.collate([encoded[i] for i in idx])
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        logits, features = model(**inputs, return_features=True)  # (L, b, C), (L, b, H)
        chunks.append(logits.float().cpu())
        if model.policies is not None:
            policy_chunks.append(policy_probabilities(model, features, logits, None))  # (L, b)
            if alphas:
                dial = [policy_probabilities(model, features, logits, a) for a in alphas]
                dial_chunks.append(torch.stack(dial, -1))  # (L, b, A)
    model.train(was_training)
    by_alpha = None
    if dial_chunks:
        dial = _unsort(dial_chunks, order)  # (L, N, A)
        by_alpha = {a: dial[..., i].contiguous() for i, a in enumerate(alphas)}
    return LogitCache(_unsort(chunks, order), torch.tensor(encoded.labels, dtype=torch.long),
                      _unsort(policy_chunks, order) if policy_chunks else None, by_alpha)


def default_dial(alpha_range, points: int = 21) -> list[float]:
    """Evenly spaced alphas over an alpha-conditioned policy's trained ``[low, high]``."""
    low, high = (float(v) for v in alpha_range)
    return [round(low + (high - low) * i / (points - 1), 6) for i in range(points)]


def policy_probabilities(model, features: torch.Tensor, logits: torch.Tensor, alpha=None) -> torch.Tensor:
    """(L, b, H) features and (L, b, C) logits -> (L, b) policy probabilities at ``alpha``."""
    return torch.stack([model.policy_probability(i, f, z, alpha)
                        for i, (f, z) in enumerate(zip(features, logits))]).float().cpu()


def _unsort(chunks: list[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """Concatenate (L, b, ...) chunks along examples and put them back in data order."""
    values = torch.cat(chunks, dim=1)
    restored = torch.empty_like(values)
    restored[:, order] = values
    return restored


def data_digest(encoded: Encoded) -> str:
    """A digest of the examples (token ids and labels): equal for the same examples under any split name."""
    import hashlib

    digest = hashlib.sha1()
    for ids in encoded.features["input_ids"]:
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    digest.update(torch.tensor(encoded.labels, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def row_digests(encoded: Encoded) -> list[str]:
    """One 64-bit digest (16 hex digits) per example, of its token ids and label."""
    import hashlib
    from array import array

    return [hashlib.sha1(array("q", ids).tobytes() + b"|%d" % label).hexdigest()[:16]
            for ids, label in zip(encoded.features["input_ids"], encoded.labels)]


def tag_split(cache: LogitCache, split: str, encoded: Encoded | None = None) -> LogitCache:
    """Record which split ``cache`` holds (and, given ``encoded``, the examples' digest); returns ``cache``."""
    cache.split = str(split)
    if encoded is not None:
        cache.data_id = data_digest(encoded)
        cache.row_ids = row_digests(encoded)
    return cache
