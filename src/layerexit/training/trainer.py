"""The training loop: accelerate for devices and multi-GPU/multi-node, progress bars, evaluation each epoch,
best checkpoint kept, seeded, resumable.

Run the same code on several GPUs or machines with ``accelerate launch -m layerexit.cli.main train ...``.

Output folder::

    best/          the best model so far (MultiExitModel.save_pretrained + tokenizer)
    final/         the model after the last epoch
    state/         resume point: model, optimizer, scheduler and progress.json, replaced atomically
    history.json   per-epoch losses and per-exit accuracies
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..data import Encoded
from ..errors import bad_value
from ..evaluation.cache import collect_logits
from ..evaluation.simulate import per_layer_accuracy
from ..io import atomic_directory, write_json_atomic
from ..model import MultiExitModel
from .objectives import Objective, Stage, weighted_exit_loss

SELECT_METRICS = ("mean_exit_accuracy", "final_accuracy")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: what short runs on MiniLM-L6 found to work; see docs/methods.md)."""

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    save_steps: int = 200
    select_metric: str = "mean_exit_accuracy"
    seed: int = 42

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise bad_value(name, getattr(self, name), "use a whole number >= 1")
        if not self.learning_rate > 0:
            raise bad_value("learning_rate", self.learning_rate, "use a positive learning rate, e.g. 5e-5")
        if self.select_metric not in SELECT_METRICS:
            raise bad_value("select_metric", self.select_metric, f"choose one of {', '.join(SELECT_METRICS)}")


@dataclass
class Progress:
    """Where a run is; saved with every resume point."""

    stage: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    history: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    model: MultiExitModel,
    tokenizer,
    train_set: Encoded,
    eval_set: Encoded | None,
    objective: Objective,
    config: TrainConfig,
    output_dir: str | Path,
    resume: bool = True,
    accelerator: Accelerator | None = None,
) -> Progress:
    """Train ``model`` stage by stage; returns the final progress (with the per-epoch history)."""
    config.validate()
    output_dir = Path(output_dir)
    accelerator = accelerator or Accelerator()
    seed_everything(config.seed)
    progress = _load_progress(output_dir / "state", model) if resume else Progress()
    stages = objective.stages(model.config.num_layers)
    for stage_index, stage in enumerate(stages):
        if stage_index < progress.stage:
            continue
        _run_stage(model, tokenizer, train_set, eval_set, stage, stage_index, config, output_dir, progress,
                   accelerator, is_last_stage=stage_index == len(stages) - 1)
    if accelerator.is_main_process:
        model.save_pretrained(output_dir / "final", tokenizer=tokenizer)
        write_json_atomic(output_dir / "history.json", progress.history)
    accelerator.wait_for_everyone()
    return progress


def _set_trainable(model: MultiExitModel, stage: Stage) -> list[torch.nn.Parameter]:
    for p in model.backbone.parameters():
        p.requires_grad_(stage.train_backbone)
    for weight, head in zip(stage.layer_weights, model.exits):
        for p in head.parameters():
            p.requires_grad_(weight > 0)
    if model.policies is not None:
        for p in model.policies.parameters():
            p.requires_grad_(stage.train_policies)
    return [p for p in model.parameters() if p.requires_grad]


def _run_stage(model, tokenizer, train_set, eval_set, stage, stage_index, config, output_dir, progress, accelerator,
               is_last_stage):
    params = _set_trainable(model, stage)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state_dir = output_dir / "state"
    if progress.epoch or progress.step_in_epoch:  # resuming inside this stage: optimizer and schedule too
        optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=False))
    weights = torch.tensor(stage.layer_weights, device=accelerator.device)

    for epoch in range(progress.epoch, config.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(
            config.seed * 1000 + stage_index * 100 + epoch)).tolist()
        # the loader's own generator keeps it from drawing on the global RNG that dropout uses
        loader = accelerator.prepare(DataLoader(Subset(train_set, order), batch_size=config.batch_size,
                                                collate_fn=train_set.collate, generator=torch.Generator()))
        skip = progress.step_in_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        prepared.train()
        bar = tqdm(batches, total=len(loader), initial=skip, desc=f"{stage.name} epoch {epoch + 1}/{config.epochs}",
                   disable=not accelerator.is_local_main_process)
        running, stats = [], {}
        for batch in bar:
            labels, index = batch.pop("labels"), batch.pop("index")
            if stage.loss is None:
                loss, _ = weighted_exit_loss(prepared(**batch), labels, weights)  # logits (L, B, C)
            else:
                loss, batch_stats = stage.loss(prepared, batch, labels, index)
                for key, value in batch_stats.items():
                    stats.setdefault(key, []).append(value)
            accelerator.backward(loss)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.step_in_epoch += 1
            progress.global_step += 1
            running.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}")
            if progress.step_in_epoch % config.save_steps == 0 and progress.step_in_epoch < len(loader):
                _save_state(accelerator, model, tokenizer, optimizer, scheduler, progress, state_dir)
        record = {"stage": stage.name, "epoch": epoch + 1, "train_loss": float(np.mean(running)) if running else None}
        record.update({key: float(np.mean(values)) for key, values in stats.items()})
        if eval_set is not None:
            cache = collect_logits(accelerator.unwrap_model(prepared), eval_set, config.eval_batch_size, progress=False)
            accs = per_layer_accuracy(cache.logits, cache.labels)
            metric = float(np.mean(accs)) if config.select_metric == "mean_exit_accuracy" else accs[-1]
            record.update(per_layer_accuracy=accs, metric=metric)
            accelerator.print(f"[{stage.name} epoch {epoch + 1}] per-exit accuracy "
                              + " ".join(f"{a:.3f}" for a in accs) + f"  ({config.select_metric}={metric:.4f})")
            # earlier stages leave exits untrained, so the best model is chosen within the last stage
            if is_last_stage and metric >= progress.best_metric and accelerator.is_main_process:
                progress.best_metric = metric
                model.save_pretrained(output_dir / "best", tokenizer=tokenizer)
        progress.history.append(record)
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        if progress.epoch == config.epochs:  # stage done: the resume point moves to the next stage's start
            progress.stage, progress.epoch = stage_index + 1, 0
        _save_state(accelerator, model, tokenizer, optimizer, scheduler, progress, state_dir)


def _save_state(accelerator, model, tokenizer, optimizer, scheduler, progress, state_dir: Path) -> None:
    """Replace the resume point atomically: an interruption never leaves a half-written one."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(state_dir) as tmp:
            model.save_pretrained(tmp / "model")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                       tmp / "rng.pt")
            (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=2))
    accelerator.wait_for_everyone()


def _load_progress(state_dir: Path, model: MultiExitModel) -> Progress:
    """Restore weights, RNG states (dropout) and progress from a resume point, if there is one."""
    if not (state_dir / "progress.json").is_file():
        return Progress()
    saved = MultiExitModel.from_pretrained(state_dir / "model")
    model.load_state_dict(saved.state_dict())
    rng = torch.load(state_dir / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return Progress(**json.loads((state_dir / "progress.json").read_text()))
