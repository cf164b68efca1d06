"""PCEE and PCEE-WS: exit where validation data says the exit is accurate enough.

Performance Control Early Exiting (Mofakhami et al., 2024, arXiv 2412.19325). On a held-out validation split,
bin each exit's max-softmax confidence and record each bin's accuracy (the exit's reliability diagram). At
inference a row exits at layer l when the accuracy of the bin its confidence falls in is at least the target
δ, one target shared by all exits; the last exit always answers. Unlike a confidence threshold, δ is an
accuracy: exits that are over-confident get a stricter effective threshold automatically.

Choices the paper leaves open, made here (see docs/methods.md): bins are equal-width over [0, 1] or
equal-mass (``binning``), ``num_bins`` is a parameter; an empty bin never exits (no evidence); PCEE-WS smooths
the per-bin accuracies before thresholding, by isotonic regression (``"isotonic"``, non-decreasing in
confidence) or a count-weighted neighbour average (``"neighbour"``, the default), which protects bins with few
validation examples.

The fitted table does not depend on δ: :meth:`PCEE.with_target` gives the same fitted rule at another target
without refitting, which is how the controllability report sweeps δ.
"""

from __future__ import annotations

import copy
import math

import torch

from ..calibration import SMOOTHINGS, check_binning, confidence_and_correct, bin_index, reliability_bins, smooth_bins
from ..errors import bad_value
from .base import RULES
from .fitting import CalibratedRule

TARGET_GRID = [round(0.5 + 0.01 * i, 2) for i in range(50)]  # 0.50 .. 0.99


def check_target(name: str, target: float) -> float:
    target = float(target)
    if math.isnan(target) or not 0.0 < target <= 1.0:
        raise bad_value(f"{name}.target", target, "the target accuracy is a fraction in (0, 1], e.g. 0.9 for 90%")
    return target


@RULES.register("pcee")
class PCEE(CalibratedRule):
    """PCEE (Mofakhami et al., 2024, arXiv 2412.19325): exit when the fitted bin accuracy >= ``target``.

    Fitted attributes (exits 1..L-1, 0-based rows): ``edges_`` (L-1, B+1), ``count_`` (L-1, B),
    ``accuracy_`` (L-1, B) raw bin accuracies, ``table_`` (L-1, B) the (smoothed) accuracies thresholded at
    inference; NaN marks an empty bin.
    """

    name = "pcee"
    fitted_attributes = ("edges_", "count_", "accuracy_", "table_")

    def __init__(self, target: float = 0.9, num_bins: int = 10, binning: str = "width",
                 smoothing: str | None = None, window: int = 1):
        """target accuracy in (0, 1]; num_bins >= 1; binning 'width' or 'mass'; smoothing None, 'isotonic' or
        'neighbour'; window: neighbouring bins each side for 'neighbour'"""
        self.target = check_target(self.name, target)
        self.num_bins, self.binning = check_binning(self.name, num_bins, binning)
        if smoothing not in (None, *SMOOTHINGS):
            raise bad_value(f"{self.name}.smoothing", smoothing,
                            f"use one of {', '.join(SMOOTHINGS)}, or None for the raw bin accuracies")
        if isinstance(window, bool) or int(window) != window or window < 0:
            raise bad_value(f"{self.name}.window", window, "use a whole number of neighbouring bins >= 0")
        self.smoothing = smoothing
        self.window = int(window)

    def fit(self, cache) -> "PCEE":
        """Bin every exit but the last on ``cache`` (a split-tagged validation LogitCache); returns self."""
        self._begin_fit(cache)
        edges, counts, accuracies, tables = [], [], [], []
        for layer in range(cache.logits.shape[0] - 1):
            confidence, correct = confidence_and_correct(cache.logits[layer], cache.labels)  # (N,), (N,)
            bins = reliability_bins(confidence, correct, self.num_bins, self.binning)
            edges.append(bins.edges)
            counts.append(bins.count.double())
            accuracies.append(bins.accuracy)
            tables.append(smooth_bins(bins.accuracy, bins.count, self.smoothing, self.window))
        self.edges_ = torch.stack(edges)  # (L-1, B+1)
        self.count_ = torch.stack(counts)  # (L-1, B)
        self.accuracy_ = torch.stack(accuracies)  # (L-1, B)
        self.table_ = torch.stack(tables)  # (L-1, B)
        return self._finish_fit(cache)

    def bind(self, num_layers, num_classes):
        self.check_fitted()
        self._check_depth(num_layers, self.table_.shape[0] + 1)
        return self

    def should_exit(self, logits, layer, state):
        confidence = logits.double().softmax(dim=-1).amax(dim=-1)  # (n,) float64 in engine and simulator alike
        bins = bin_index(confidence, self.edges_[layer])  # (n,)
        accuracy = self.table_[layer].to(confidence.device)[bins]  # (n,), NaN for empty bins
        return accuracy >= self.target  # NaN compares False: an empty bin continues

    def exit_table(self) -> torch.Tensor:
        """(L-1, B) bool: which bins of which exits let a row exit at the current target."""
        self.check_fitted()
        return self.table_ >= self.target

    def with_target(self, target: float) -> "PCEE":
        """The same fitted rule at another target accuracy (no refit)."""
        other = copy.copy(self)
        other.target = check_target(self.name, target)
        return other

    @property
    def params(self):
        return {"target": self.target, "num_bins": self.num_bins, "binning": self.binning,
                "smoothing": self.smoothing, "window": self.window}

    @classmethod
    def grid(cls, num_layers, num_classes):
        return [{**cls().params, "target": t} for t in TARGET_GRID]


@RULES.register("pcee-ws")
class PCEEWS(PCEE):
    """PCEE-WS (Mofakhami et al., 2024, arXiv 2412.19325): PCEE with the per-bin accuracies smoothed before
    thresholding (``smoothing`` "neighbour", the default, or "isotonic")."""

    name = "pcee-ws"

    def __init__(self, target: float = 0.9, num_bins: int = 10, binning: str = "width",
                 smoothing: str = "neighbour", window: int = 1):
        """target accuracy in (0, 1]; num_bins >= 1; binning 'width' or 'mass'; smoothing 'neighbour' or
        'isotonic'; window: neighbouring bins each side for 'neighbour'"""
        if smoothing is None:
            raise bad_value("pcee-ws.smoothing", None, "PCEE-WS is PCEE with smoothing: use 'neighbour' or "
                            "'isotonic', or the rule 'pcee' for the raw bin accuracies")
        super().__init__(target, num_bins, binning, smoothing, window)
