"""Calibration of exits: reliability bins, expected calibration error, temperature scaling, bin smoothing.

The pieces PCEE (Mofakhami et al., 2024, arXiv 2412.19325) builds on:

- :func:`reliability_bins`: one exit's reliability diagram: the max-softmax confidences binned into
  ``num_bins`` equal-width bins over [0, 1] (``binning="width"``) or bins holding about the same number of
  examples (``binning="mass"``, edges at the confidences' quantiles), with each bin's count, accuracy and mean
  confidence. Bin ``b`` holds the confidences in ``[edges[b], edges[b+1])``; the last bin also holds 1.0.
- :func:`expected_calibration_error`: ECE (Naeini et al., AAAI 2015; Guo et al., ICML 2017),
  ``sum_b (n_b / N) |acc_b - conf_b|``.
- :func:`fit_temperature`: temperature scaling (Guo et al., ICML 2017): the one scalar ``T > 0`` that
  minimises the negative log-likelihood of ``softmax(z / T)`` on validation data. The NLL is convex in
  ``1 / T``, so a golden-section search over ``log T`` finds its minimum; no optimiser state, deterministic.
- :func:`smooth_bins`: the per-bin accuracies smoothed before PCEE-WS thresholds them: ``"isotonic"``
  (pool-adjacent-violators weighted by bin counts: non-decreasing in confidence, as promised) or
  ``"neighbour"`` (each bin's accuracy averaged with its neighbours', weighted by their counts and a
  triangular kernel, so bins with few examples lean on their neighbours). Empty bins stay empty (NaN) in every
  variant: PCEE never exits on a confidence it has no evidence for.

All computation is in float64 on the CPU; inputs may be any float dtype and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import bad_value

from .catalog import BINNINGS, SMOOTHINGS  # names kept in the torch-free index


def check_binning(param: str, num_bins: int, binning: str) -> tuple[int, str]:
    """Validate a bin count and bin type, naming ``param`` in the error."""
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise bad_value(f"{param}.num_bins", num_bins, "use a whole number of bins >= 1 (10-20 is usual)")
    if binning not in BINNINGS:
        raise bad_value(f"{param}.binning", binning, "use 'width' (equal-width bins over [0, 1]) or 'mass' "
                        "(bins holding about the same number of validation examples)")
    return int(num_bins), binning


def confidence_and_correct(logits: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits, (N,) labels -> (N,) max-softmax confidence (float64) and (N,) bool correctness."""
    probs = (logits.double() / temperature).softmax(dim=-1)  # (N, C)
    confidence, prediction = probs.max(dim=-1)  # (N,), (N,)
    return confidence.cpu(), (prediction.cpu() == labels.cpu())


def bin_edges(confidence: torch.Tensor, num_bins: int, binning: str = "width") -> torch.Tensor:
    """(N,) confidences -> (num_bins + 1,) float64 edges from 0 to 1.

    ``mass``: inner edges at the confidences' quantiles k/num_bins; tied quantiles give repeated edges, i.e.
    empty bins (which PCEE treats as "continue").
    """
    num_bins, binning = check_binning("reliability", num_bins, binning)
    if binning == "width":
        return torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    if confidence.numel() == 0:
        raise bad_value("confidence", "[]", "mass binning needs at least one validation example")
    levels = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[1:-1]  # (B-1,)
    inner = torch.quantile(confidence.double().cpu(), levels)  # (B-1,)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)])


def bin_index(confidence: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(N,) confidences -> (N,) bin of each, bin b = [edges[b], edges[b+1]); 1.0 falls in the last bin.

    Runs on ``confidence``'s device and dtype so the engine and the simulator bin identically.
    """
    inner = edges[1:-1].to(device=confidence.device, dtype=confidence.dtype)  # (B-1,)
    return torch.bucketize(confidence, inner, right=True)  # (N,) in 0..B-1


@dataclass
class ReliabilityBins:
    """One exit's reliability diagram. edges (B+1,); count (B,); accuracy and confidence (B,), NaN if empty."""

    edges: torch.Tensor
    count: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.count.sum())

    def ece(self) -> float:
        """Expected calibration error: count-weighted mean of |accuracy - confidence| over non-empty bins."""
        full = self.count > 0
        if not bool(full.any()):
            return float("nan")
        gap = (self.accuracy[full] - self.confidence[full]).abs()
        return float((self.count[full].double() * gap).sum() / self.count.sum())

    def to_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "count": self.count.tolist(),
                "accuracy": _nan_to_none(self.accuracy), "confidence": _nan_to_none(self.confidence)}


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 10,
                     binning: str = "width", edges: torch.Tensor | None = None) -> ReliabilityBins:
    """Bin (N,) confidences with their (N,) correctness; ``edges`` (B+1,) overrides ``num_bins``/``binning``."""
    confidence = confidence.double().cpu()
    correct = correct.cpu().double()
    if edges is None:
        edges = bin_edges(confidence, num_bins, binning)
    edges = edges.double().cpu()
    num = edges.numel() - 1
    index = bin_index(confidence, edges)  # (N,)
    count = torch.bincount(index, minlength=num)  # (B,)
    hits = torch.bincount(index, weights=correct, minlength=num)  # (B,)
    conf_sum = torch.bincount(index, weights=confidence, minlength=num)  # (B,)
    denominator = count.double()
    empty = count == 0
    accuracy = torch.where(empty, torch.nan, hits / denominator.clamp(min=1))
    mean_conf = torch.where(empty, torch.nan, conf_sum / denominator.clamp(min=1))
    return ReliabilityBins(edges, count, accuracy, mean_conf)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15,
                               binning: str = "width") -> float:
    """ECE of (N,) confidences against (N,) correctness (Guo et al., ICML 2017)."""
    return reliability_bins(confidence, correct, num_bins, binning).ece()


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL of softmax(logits / T) for (N, C) logits and (N,) labels."""
    logp = (logits.double() / temperature).log_softmax(dim=-1)  # (N, C)
    return float(-logp.gather(1, labels.long().view(-1, 1)).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = 0.02, high: float = 50.0,
                    iterations: int = 80) -> float:
    """Temperature scaling (Guo et al., ICML 2017): argmin over T in [low, high] of the NLL of softmax(z / T).

    Golden-section search over log T (the NLL is convex in 1/T, hence unimodal in log T).
    """
    if logits.shape[0] == 0:
        raise bad_value("logits", "(0 examples)", "temperature scaling needs validation examples")
    logits, labels = logits.double().cpu(), labels.cpu()
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = (negative_log_likelihood(logits, labels, math.exp(x)) for x in (c, d))
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = negative_log_likelihood(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = negative_log_likelihood(logits, labels, math.exp(d))
    return math.exp((a + b) / 2.0)


def isotonic(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted pool-adjacent-violators: the non-decreasing sequence closest to ``values`` in weighted L2.

    (B,) values and (B,) weights > 0 -> (B,) float64 non-decreasing.
    """
    blocks: list[list[float]] = []  # [weighted mean, total weight, length]
    for value, weight in zip(values.double().tolist(), weights.double().tolist()):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:  # a violation: pool the last two blocks
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out = [value for value, _, length in blocks for _ in range(length)]
    return torch.tensor(out, dtype=torch.float64)


def smooth_bins(accuracy: torch.Tensor, count: torch.Tensor, smoothing: str | None, window: int = 1) -> torch.Tensor:
    """(B,) per-bin accuracies (NaN = empty) and (B,) counts -> (B,) smoothed accuracies; empty bins stay NaN.

    ``isotonic``: non-decreasing over the non-empty bins in confidence order. ``neighbour``: for bin b,
    ``sum_j k_bj n_j acc_j / sum_j k_bj n_j`` over non-empty bins j with ``|b - j| <= window`` and triangular
    kernel ``k_bj = 1 - |b - j| / (window + 1)``.
    """
    accuracy = accuracy.double().cpu()
    count = count.double().cpu()
    if smoothing is None:
        return accuracy.clone()
    full = count > 0
    out = torch.full_like(accuracy, torch.nan)
    if not bool(full.any()):
        return out
    if smoothing == "isotonic":
        out[full] = isotonic(accuracy[full], count[full])
        return out
    if smoothing == "neighbour":
        if int(window) != window or window < 0:
            raise bad_value("window", window, "use a whole number of neighbouring bins >= 0")
        positions = torch.arange(accuracy.numel(), dtype=torch.float64)
        distance = (positions[:, None] - positions[None, :]).abs()  # (B, B)
        kernel = (1.0 - distance / (window + 1)).clamp(min=0.0) * count[None, :]  # (B, B), 0 for empty j
        hits = torch.nan_to_num(accuracy) * count  # (B,) correct examples per bin
        smoothed = (kernel @ (hits / count.clamp(min=1))) / kernel.sum(dim=1)  # (B,)
        out[full] = smoothed[full]
        return out
    raise bad_value("smoothing", smoothing, f"use one of {', '.join(SMOOTHINGS)} (or None for no smoothing)")


def _nan_to_none(values: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in values.double().tolist()]


def none_to_nan(values: list) -> torch.Tensor:
    """The inverse of the JSON form: ``None`` entries back to NaN, float64."""
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
