"""A tiny servable checkpoint (word-level tokenizer, 3-layer BERT, 2 labels) and a calibration folder, offline,
plus `layerexit serve` in a subprocess (the library's ServerProcess) or in a thread."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tiny_text import sentences, write_backbone

from layerexit.evaluation.cache import LogitCache
from layerexit.model import MultiExitModel
from layerexit.rules import PCEE, PCEEWS
from layerexit.rules.fitting import save_rules
from layerexit.serving.process import ServerProcess, free_port  # noqa: F401  (tests import free_port here)

LABELS = ["negative", "positive"]


def write_checkpoint(folder: Path, max_length: int = 16) -> Path:
    """Save a tiny multi-exit model with its tokenizer; exit heads scaled so rows exit at different layers."""
    backbone = write_backbone(folder.parent / f"{folder.name}-backbone", layers=3)
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(str(backbone), 2, exit_feature="mean", label_names=LABELS,
                                         max_length=max_length)
    with torch.no_grad():  # max-prob at exits 1-3 spreads over about 0.6-0.95 for the test texts
        for head, scale in zip(model.exits, (1.0, 10.0, 10.0)):
            head.linear.weight.mul_(scale)
            head.linear.bias.zero_()
    model.eval().save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(backbone))
    return folder


def write_calibration(model_dir: Path, folder: Path, n: int = 200) -> Path:
    """rules.json (PCEE, PCEE-WS) and fit_logits.pt fitted on a synthetic 'validation' split."""
    model = MultiExitModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = sentences(n, seed=7)
    batch = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # (L, N, C)
    cache = LogitCache(logits.float(), torch.tensor([y for _, y in rows]), split="validation")
    folder.mkdir(parents=True, exist_ok=True)
    cache.save(folder / "fit_logits.pt")
    save_rules(folder / "rules.json", {"pcee": PCEE(0.8).fit(cache), "pcee-ws": PCEEWS(0.8).fit(cache)})
    return folder


def Server(*args: str, timeout: float = 120.0) -> ServerProcess:
    """`layerexit serve ...` (offline, one thread) in a subprocess on a free 127.0.0.1 port, started."""
    env = {"PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    return ServerProcess("--threads", "1", *args, env=env, timeout=timeout)


class ThreadServer:
    """The app under uvicorn in a thread of this process, on a free 127.0.0.1 port (fast to start)."""

    def __init__(self, service):
        import threading

        from layerexit.serving.app import make_server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = service
        self.server = make_server(service, port=self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
