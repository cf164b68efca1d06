"""The training loop: accelerate for devices and multi-process data parallel training, progress bars,
evaluation each epoch (sharded over the processes), best checkpoint kept, seeded (dropout per process),
resumable.

Run the same code on several processes, GPUs or machines (see the README's "Distributed training"):
``torchrun --nproc_per_node 2 -m layerexit.cli.main train ...`` or
``accelerate launch --multi_gpu --num_processes 2 -m layerexit.cli.main train ...``; on a machine without
GPUs both run data parallel over gloo on the CPU. ``--batch-size`` is per process (global batch = processes
x batch size), as in accelerate.

Output folder::

    best/             the best model so far (MultiExitModel.save_pretrained + tokenizer); not written without
                      an evaluation set
    final/            the model after the last epoch (hard links to best/'s files when the last epoch was best)
    state/step-N/     resume points, newest ``save_total_limit`` kept: weights (safetensors), optimizer moments
                      (safetensors + JSON), scheduler (JSON), RNG states of every process, progress.json. Once
                      the run is finished only a light one stays: no weights (final/ holds them) and, unless
                      ``keep_optimizer_state``, no optimizer moments; nothing in it is ever unpickled.
    run_config.json   the effective configuration and its fingerprint: a rerun resumes only a matching run
    history.json      per-epoch losses and per-exit accuracies
    .lock             held while a training writes the folder
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..data import Encoded
from ..errors import LayerExitError, bad_value
from ..evaluation.cache import collect_logits
from ..evaluation.simulate import per_layer_accuracy
from ..io import atomic_directory, write_json_atomic
from ..model import MultiExitModel
from . import runfolder
from .config import TrainConfig
from .distributed import EncodedShard, gather_rows, shard_rows
from .objectives import Objective, Stage, weighted_exit_loss
from .state import load_structure, rng_state, save_structure, set_rng_state

STATE_WEIGHTS = "model.safetensors"
TRAINING_CONFIG = "training_config.json"  # the run's effective configuration, copied into best/ and final/


@dataclass
class Progress:
    """Where a run is; saved with every resume point."""

    stage: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    history: list = field(default_factory=list)
    #: this epoch's per-step losses and stage statistics so far (a resumed epoch logs the same means)
    epoch_losses: list = field(default_factory=list)
    epoch_stats: dict = field(default_factory=dict)
    #: set when the run finished: the resume point holds no weights (they are in final/)
    finished_epochs: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(**kwargs) -> Accelerator:
    """An Accelerator that also shards over CPU processes.

    accelerate picks gloo on the CPU only when told the run is a CPU one; ``torchrun`` or
    ``accelerate launch --multi_gpu`` on a machine without GPUs would otherwise start N unsharded copies.
    """
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu_processes, **kwargs)


def run_settings(model: MultiExitModel, train_set: Encoded, eval_set: Encoded | None, stages: list[Stage],
                 config: TrainConfig, num_processes: int = 1, mixed_precision: str = "no") -> dict:
    """Everything that defines a run (hashed into its fingerprint) plus the options a resume may change."""
    model_config = {k: v for k, v in asdict(model.config).items() if k != "layerexit_version"}
    return {
        **asdict(config),
        "model": model_config,
        "stages": [{"name": s.name, "layer_weights": list(s.layer_weights), "train_backbone": s.train_backbone,
                    "train_policies": s.train_policies, "own_loss": s.loss is not None,
                    **({"settings": s.settings} if s.settings else {})} for s in stages],
        "train_data": runfolder.dataset_digest(train_set),
        "eval_data": runfolder.dataset_digest(eval_set),
        "num_processes": int(num_processes),
        "global_batch_size": int(config.batch_size) * int(num_processes),
        "mixed_precision": str(mixed_precision),
    }


@dataclass
class _Run:
    """What every part of one training call needs."""

    accelerator: Accelerator
    model: MultiExitModel
    tokenizer: object
    config: TrainConfig
    output_dir: Path
    run_config: dict | None = None
    resume_from: Path | None = None  # the resume point loaded at start, until the optimizer has read it
    optimizer: object = None  # the last stage's, for the finished run's resume point
    scheduler: object = None

    @property
    def state_root(self) -> Path:
        return self.output_dir / "state"

    def save_model(self, name: str) -> None:
        """Write best/ or final/ with the run's effective configuration beside the weights (main process)."""
        self.model.save_pretrained(self.output_dir / name, tokenizer=self.tokenizer)
        if self.run_config is not None:
            write_json_atomic(self.output_dir / name / TRAINING_CONFIG, self.run_config)


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
    """Train ``model`` stage by stage; returns the final progress (with the per-epoch history).

    ``resume``: continue the run in ``output_dir`` if it has the same fingerprint (options and data; more
    ``epochs`` allowed) and refuse a different one; ``False`` discards a previous run there and starts over.
    """
    config.validate()
    output_dir = Path(output_dir)
    accelerator = accelerator or make_accelerator()
    stages = objective.stages(model.config.num_layers)
    settings = run_settings(model, train_set, eval_set, stages, config, accelerator.num_processes,
                            accelerator.mixed_precision)
    run = _Run(accelerator, model, tokenizer, config, output_dir)
    with locked_run(output_dir, accelerator):
        resumable = prepare_run_folder(output_dir, settings, resume, accelerator)
        # dropout: each process its own stream (seed + rank, accelerate's set_seed(device_specific=True)), so
        # the halves of a global batch get independent masks as in one process; one process keeps ``seed``.
        # The data order has its own generator (seed only), identical on every process.
        seed_everything(config.seed + accelerator.process_index)
        progress = _load_progress(run) if resumable else Progress()
        finished = _plan(progress, stages, config, accelerator)
        if accelerator.is_main_process:
            run.run_config = runfolder.write_run_config(output_dir, settings)
        if finished:
            accelerator.print(f"nothing to train: {output_dir} holds this run finished after {config.epochs} "
                              f"epochs (step {progress.global_step}); pass more --epochs to extend it")
            return progress
        for stage_index, stage in enumerate(stages):
            if stage_index < progress.stage:
                continue
            _run_stage(run, train_set, eval_set, stage, stage_index, progress,
                       is_last_stage=stage_index == len(stages) - 1)
        _finish(run, progress)
    return progress


@contextlib.contextmanager
def locked_run(output_dir: Path, accelerator: Accelerator):
    """The main process holds the folder's lock; every process fails together if it cannot."""
    with contextlib.ExitStack() as stack:
        error = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(runfolder.locked(output_dir))
            except LayerExitError as err:
                error = str(err)
        _raise_everywhere(error, accelerator)
        yield


def _raise_everywhere(error: str | None, accelerator: Accelerator) -> None:
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise LayerExitError(error)


def prepare_run_folder(output_dir: Path, settings: dict, resume: bool, accelerator: Accelerator) -> bool:
    """Discard (``resume=False``) or check the run already in ``output_dir``; True when there is one to resume."""
    error, resumable = None, False
    if accelerator.is_main_process:
        try:
            if not resume:
                removed = runfolder.discard_run(output_dir)
                if removed:
                    print(f"starting over in {output_dir}: removed the previous run's {', '.join(removed)}")
            else:
                resumable = runfolder.check_resumable(output_dir, settings) is not None and bool(
                    _resume_points(output_dir / "state"))
                for stale in (output_dir / "state").glob(".step-*"):  # half-written by a killed run
                    shutil.rmtree(stale, ignore_errors=True)
        except LayerExitError as err:
            error = str(err)
    _raise_everywhere(error, accelerator)
    if accelerator.num_processes > 1:
        resumable = broadcast_object_list([resumable])[0]
    accelerator.wait_for_everyone()
    return resumable


def _plan(progress: Progress, stages: list[Stage], config: TrainConfig, accelerator: Accelerator) -> bool:
    """Position a resumed run; True when there is nothing left to train."""
    if progress.finished_epochs:
        if config.epochs <= progress.finished_epochs:
            return True
        accelerator.print(f"extending the finished run from {progress.finished_epochs} to {config.epochs} epochs "
                          f"(the learning-rate schedule is stretched over {config.epochs} epochs)")
        progress.stage, progress.epoch, progress.step_in_epoch = len(stages) - 1, progress.finished_epochs, 0
        progress.finished_epochs = 0
    elif progress.epoch > config.epochs:
        raise bad_value("epochs", config.epochs, f"the run to resume has already trained {progress.epoch} epochs "
                        "of this stage; pass at least that many, or --no-resume to start over")
    if progress.global_step:
        accelerator.print(f"resuming from step {progress.global_step} (stage {progress.stage + 1}/{len(stages)}, "
                          f"epoch {progress.epoch + 1}, step {progress.step_in_epoch} in the epoch)")
    return False


def _set_trainable(model: MultiExitModel, stage: Stage) -> list[torch.nn.Parameter]:
    """Mark what this stage trains. Parameters no loss reaches stay frozen: distributed data parallel
    training (DDP) requires every trainable parameter to get a gradient at every step."""
    for p in model.backbone.parameters():
        p.requires_grad_(stage.train_backbone)
    pooler = getattr(model.backbone, "pooler", None)
    if model.config.exit_feature != "pooler" and isinstance(pooler, torch.nn.Module):
        for p in pooler.parameters():  # the backbone's pooler feeds no exit with cls or mean features
            p.requires_grad_(False)
    for weight, head in zip(stage.layer_weights, model.exits):
        for p in head.parameters():
            p.requires_grad_(weight > 0)
    if model.policies is not None:
        for p in model.policies.parameters():
            p.requires_grad_(stage.train_policies)
    return [p for p in model.parameters() if p.requires_grad]


def _run_stage(run: _Run, train_set, eval_set, stage, stage_index, progress, is_last_stage):
    model, config, accelerator = run.model, run.config, run.accelerator
    params = _set_trainable(model, stage)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)  # single-process steps: accelerate's
    total = steps_per_epoch * config.epochs  # scheduler steps once per process per step
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if run.resume_from is not None and (progress.epoch or progress.step_in_epoch):
        _load_optimizer(run.resume_from, optimizer, scheduler, accelerator)
        run.resume_from = None
    weights = torch.tensor(stage.layer_weights, device=accelerator.device)

    for epoch in range(progress.epoch, config.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(
            config.seed * 1000 + stage_index * 100 + epoch)).tolist()
        # the loader's own generator keeps it from drawing on the global RNG that dropout uses; prepare()
        # gives every process its own batches of this order
        loader = accelerator.prepare(DataLoader(Subset(train_set, order), batch_size=config.batch_size,
                                                collate_fn=train_set.collate, generator=torch.Generator()))
        skip = progress.step_in_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        prepared.train()
        bar = tqdm(batches, total=len(loader), initial=skip, desc=f"{stage.name} epoch {epoch + 1}/{config.epochs}",
                   disable=not accelerator.is_local_main_process)
        if not skip:
            progress.epoch_losses, progress.epoch_stats = [], {}
        running, stats = progress.epoch_losses, progress.epoch_stats
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
                _save_state(run, optimizer, scheduler, progress)
        record = {"stage": stage.name, "epoch": epoch + 1, "train_loss": float(np.mean(running)) if running else None}
        record.update({key: float(np.mean(values)) for key, values in stats.items()})
        if eval_set is not None:
            logits = evaluate_logits(accelerator.unwrap_model(prepared), eval_set, config.eval_batch_size, accelerator)
            accs = per_layer_accuracy(logits, torch.tensor(eval_set.labels, dtype=torch.long))
            metric = float(np.mean(accs)) if config.select_metric == "mean_exit_accuracy" else accs[-1]
            record.update(per_layer_accuracy=accs, metric=metric)
            accelerator.print(f"[{stage.name} epoch {epoch + 1}] per-exit accuracy "
                              + " ".join(f"{a:.3f}" for a in accs) + f"  ({config.select_metric}={metric:.4f})")
            # earlier stages leave exits untrained, so the best model is chosen within the last stage
            if is_last_stage and metric >= progress.best_metric:
                progress.best_metric, progress.best_step = metric, progress.global_step
                if accelerator.is_main_process:
                    run.save_model("best")
        progress.history.append(record)
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        progress.epoch_losses, progress.epoch_stats = [], {}
        if progress.epoch == config.epochs:  # stage done: the resume point moves to the next stage's start
            progress.stage, progress.epoch = stage_index + 1, 0
        run.optimizer, run.scheduler = optimizer, scheduler
        _save_state(run, optimizer, scheduler, progress)


def evaluate_logits(model: MultiExitModel, eval_set, batch_size: int, accelerator: Accelerator | None = None):
    """Every exit's logits (L, N, C) over ``eval_set``, in its row order, on every process.

    With several processes each evaluates its own shard (rows ``rank, rank + W, ...``) and the shards are
    gathered, so every process holds the same logits (and picks the same best epoch) for 1/W of the work.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return collect_logits(model, eval_set, batch_size, progress=False).logits
    rows = shard_rows(len(eval_set), accelerator)
    if rows:
        logits = collect_logits(model, EncodedShard(eval_set, rows), batch_size, progress=False).logits
    else:  # fewer rows than processes
        logits = torch.empty(model.config.num_layers, 0, model.config.num_labels)
    return gather_rows(logits.transpose(0, 1), len(eval_set), accelerator).transpose(0, 1)


def _finish(run: _Run, progress: Progress) -> None:
    """Write final/ and history.json, and shrink the resume point to what extending the run needs."""
    accelerator, output_dir = run.accelerator, run.output_dir
    if accelerator.is_main_process:
        best = output_dir / "best"
        if progress.best_step == progress.global_step and (best / STATE_WEIGHTS).is_file():
            _link_tree(best, output_dir / "final")  # the last epoch was the best: one copy on disk
        else:
            run.save_model("final")
        write_json_atomic(output_dir / "history.json", progress.history)
    progress.finished_epochs = run.config.epochs
    _save_state(run, run.optimizer, run.scheduler, progress,
                with_weights=False, with_optimizer=run.config.keep_optimizer_state)


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` made of hard links (a plain copy where links are impossible)."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, copy_function=link, dirs_exist_ok=True)


# --- resume points -----------------------------------------------------------------------------------------
def _resume_points(state_root: Path) -> list[Path]:
    """Complete resume points, oldest first."""
    if not state_root.is_dir():
        return []
    points = [p for p in state_root.glob("step-*") if (p / "progress.json").is_file()]
    return sorted(points, key=lambda p: int(p.name.split("-")[1]))


def _save_state(run: _Run, optimizer, scheduler, progress: Progress, with_weights: bool = True,
                with_optimizer: bool = True) -> None:
    """Write a new resume point atomically (an interruption never leaves a half-written one) and drop the
    oldest beyond ``save_total_limit``. Every process's RNG state is kept, so each resumes its own dropout."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if accelerator.is_main_process:
        name = f"step-{progress.global_step:08d}"
        with atomic_directory(run.state_root / name) as tmp:
            if with_weights:
                tensors = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
                save_file(_dedupe(tensors), str(tmp / STATE_WEIGHTS))
            if with_optimizer and optimizer is not None:
                save_structure(optimizer.state_dict(), tmp, "optimizer")
            if scheduler is not None:
                save_structure(scheduler.state_dict(), tmp, "scheduler")
            for rank, state in enumerate(rngs):
                save_structure(state, tmp, f"rng{rank}")
            (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=2))
        keep = 1 if not with_weights else run.config.save_total_limit
        for old in _resume_points(run.state_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_progress(run: _Run) -> Progress:
    """Restore weights, this process's RNG states (dropout) and progress from the newest resume point.

    Only safetensors and JSON are read: nothing in the run folder is unpickled.
    """
    points = _resume_points(run.state_root)
    if not points:
        return Progress()
    point = points[-1]
    progress = Progress(**json.loads((point / "progress.json").read_text()))
    weights = point / STATE_WEIGHTS
    if not weights.is_file():  # a finished run's resume point: the weights are final/'s
        weights = run.output_dir / "final" / STATE_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (OSError, ValueError) as err:
        raise LayerExitError(f"resume point {str(weights)!r} is unreadable ({err}); pass --no-resume to start "
                             "over") from None
    run.model.load_state_dict(tensors)
    rank = run.accelerator.process_index
    own = point / f"rng{rank}.json"
    set_rng_state(load_structure(point, own.stem if own.is_file() else "rng0"))
    run.resume_from = point
    return progress


def _load_optimizer(point: Path, optimizer, scheduler, accelerator: Accelerator) -> None:
    if (point / "optimizer.json").is_file():
        optimizer.load_state_dict(load_structure(point, "optimizer"))
    else:
        accelerator.print("the resume point kept no optimizer state (keep_optimizer_state=False): AdamW's "
                          "moments start afresh")
    if (point / "scheduler.json").is_file():
        scheduler.load_state_dict(load_structure(point, "scheduler"))
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    for group, base, factor in zip(optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base * factor(inner.last_epoch)  # the schedule's value here (stretched if extended)


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; shared ones are cloned (load_state_dict re-shares)."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out
