"""Data parallel helpers for passes the training loop does not run itself (ConsistentEE's memorized-layer
pass, its feature cache and its policy-only stage): fixed disjoint shards of the rows, gathering per-row
results, and averaging gradients over processes.

Process ``r`` of ``W`` owns rows ``r, r + W, r + 2W, ...``; with one process it owns all rows in order, so
single-process results are exactly those of code that never heard of sharding.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


def shard_rows(num_rows: int, accelerator: Accelerator | None) -> list[int]:
    """The rows this process owns."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(range(num_rows))
    return list(range(accelerator.process_index, num_rows, accelerator.num_processes))


def gather_rows(values: torch.Tensor, num_rows: int, accelerator: Accelerator | None) -> torch.Tensor:
    """Per-row results of every process's shard (n_r, ...) -> all rows in data order (num_rows, ...)."""
    if accelerator is None or accelerator.num_processes == 1:
        return values
    parts = gather_object([values.cpu()])
    out = parts[0].new_empty((num_rows, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::accelerator.num_processes] = part
    return out


def average_gradients(params, rows: int, accelerator: Accelerator | None) -> None:
    """Make every process's gradients the row-weighted mean over all processes (a process with an empty
    batch contributes nothing): the gradient one process would get from the union of the batches."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * rows for p in params]
                     + [torch.tensor([float(rows)], device=params[0].device)])
    torch.distributed.all_reduce(flat)  # sum over processes
    total, offset = flat[-1], 0
    for p in params:
        grad = (flat[offset : offset + p.numel()] / total).view_as(p)
        p.grad = grad.to(p.dtype)
        offset += p.numel()


class EncodedShard(torch.utils.data.Dataset):
    """Rows ``rows`` of an :class:`~layerexit.data.Encoded` set, with its interface (``features``, ``labels``,
    ``collate``); ``index`` keeps the position in the whole set."""

    def __init__(self, encoded, rows: list[int]):
        self.rows = list(rows)
        self.features = {k: [v[i] for i in self.rows] for k, v in encoded.features.items()}
        self.labels = [encoded.labels[i] for i in self.rows]
        self.collate = encoded.collate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.features.items()}
        item["labels"] = self.labels[i]
        item["index"] = self.rows[i]
        return item
