"""One process of a real multi-process training, started by tests/test_distributed.py with torch.distributed's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT on loopback). It trains the tiny task, logs which
rows this process saw (training batches, evaluation shards, the evaluation's gathered logits, a digest of the
dropout RNG at every step), and can SIGKILL itself at a given step (rank 0) to test resuming after a kill.

    python distributed_worker.py joint|consistentee BACKBONE TRAIN_CSV OUTPUT LOG KILL_AT_STEP [EVAL_CSV]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from layerexit.cli.train import leave_process_group
from layerexit.consistentee import schedule
from layerexit.data import Encoded, load_data
from layerexit.model import MultiExitModel
from layerexit.training import Stage, TrainConfig, train, weighted_exit_loss
from layerexit.training import trainer as trainer_module

MODE, BACKBONE, TRAIN_CSV, OUTPUT, LOG, KILL_AT = sys.argv[1:7]
EVAL_CSV = sys.argv[7] if len(sys.argv) > 7 else None
RANK = int(os.environ.get("RANK", "0"))
KILL_AT = int(KILL_AT)
CONFIG = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, seed=3, save_steps=2)
calls = {"n": 0}


def log(kind: str, rows, **extra) -> None:
    with open(f"{LOG}.rank{RANK}", "a") as handle:
        handle.write(json.dumps({"kind": kind, "rows": [int(r) for r in rows], **extra}) + "\n")


def rng_digest() -> str:
    """The state of the global torch RNG dropout draws from (reading it draws nothing)."""
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def log_evaluation() -> None:
    """Log the rows each process evaluates and the logits the evaluation hands back (gathered)."""
    collect, evaluate = trainer_module.collect_logits, trainer_module.evaluate_logits

    def collect_logged(model, encoded, *args, **kwargs):
        log("eval_rows", getattr(encoded, "rows", range(len(encoded))))
        return collect(model, encoded, *args, **kwargs)

    def evaluate_logged(*args, **kwargs):
        logits = evaluate(*args, **kwargs)
        log("eval_logits", [], logits=logits.tolist())
        return logits

    trainer_module.collect_logits, trainer_module.evaluate_logits = collect_logged, evaluate_logged


def step_done() -> None:
    calls["n"] += 1
    if RANK == 0 and calls["n"] == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no exception


class LoggedJoint:
    """The weighted objective, logging the rows of every batch this process trains on."""

    def stages(self, num_layers):
        weights = [float(i + 1) for i in range(num_layers)]

        def loss(model, batch, labels, index):
            log("batch", index.tolist(), rng=rng_digest())
            step_done()
            value, _ = weighted_exit_loss(model(**batch), labels, torch.tensor(weights))
            return value, {}

        return [Stage("joint", weights, loss=loss)]


def joint() -> None:
    tokenizer = AutoTokenizer.from_pretrained(BACKBONE)
    train_set = Encoded(load_data(TRAIN_CSV), tokenizer, 16)
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(BACKBONE, 2, exit_feature="mean")  # the pooler feeds no exit
    eval_set = Encoded(load_data(EVAL_CSV), tokenizer, 16) if EVAL_CSV else None
    log_evaluation()
    train(model, tokenizer, train_set, eval_set, LoggedJoint(), CONFIG, OUTPUT)


def consistentee() -> None:
    original_features, original_stage3 = schedule.cached_features, schedule.stage3

    def features(model, train_set, batch_size=128, rows=None):
        log("features", rows)
        return original_features(model, train_set, batch_size, rows)

    def stage3(memorized, config, num_layers):
        stage = original_stage3(memorized, config, num_layers)
        inner = stage.loss

        def loss(model, batch, labels, index):
            log("stage3", index.tolist())
            step_done()
            return inner(model, batch, labels, index)

        stage.loss = loss
        return stage

    schedule.cached_features, schedule.stage3 = features, stage3
    cee = schedule.ConsistentEEConfig(copies=2, stage2_epochs=1, stage2_batch_size=8, stage3_epochs=1,
                                      stage3_batch_size=8, policy_hidden=8)
    stage1 = TrainConfig(**{**CONFIG.__dict__, "epochs": 1})
    schedule.train_consistentee(BACKBONE, load_data(TRAIN_CSV), None, OUTPUT, cee, stage1, exit_feature="mean",
                                max_length=16)


if __name__ == "__main__":
    joint() if MODE == "joint" else consistentee()
    leave_process_group()  # as `layerexit train` does: no abort while tearing down after the work is saved
    if RANK == 0:
        print("worker done", Path(OUTPUT).name)
