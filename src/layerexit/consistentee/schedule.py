"""ConsistentEE's training schedule (Zeng et al., AAAI 2024, arXiv 2312.11882; see docs/methods.md).

1. Stage 1, joint: backbone and all exits with PABEE's weighted average loss (``stage1_objective="distilled"``
   adds self-distillation from the last exit).
2. The memorized layer of every training instance, computed once with the stage-1 model (eval mode).
3. Stage 2, policies only, on the frozen model: REINFORCE with K copies per instance. The frozen model's
   exit features are computed once and cached; per copy, dropout with the exits' rate is applied to them,
   standing in for the backbone dropout that gives the reference code its diversity across copies.
4. Stage 3, everything: cross-entropy of the exit each copy chose plus the policy loss. One backbone pass
   per batch; the K copies share it and differ by dropout on the exit features and by their actions.

Beyond the paper (each an option; the paper's form is ``policy_inputs=""`` and no ``alpha_range``, and the
released reference code's reward is ``reward="ce"``):

- ``policy_inputs``: the policy also sees its exit's max probability, margin, entropy and depth, so it can at
  least do what max-prob does (the paper's policy sees the exit feature alone).
- ``alpha_range``: alpha is drawn per instance, uniformly from the range, in stages 2 and 3 and given to the
  policy as an input; at inference alpha is a dial (``make_rule("consistentee", alpha=...)``), so one model
  traces the whole accuracy-versus-cost curve.
- Exits that stage 3 would starve (it trains only the exit each copy chose): ``all_exits_weight`` adds that
  multiple of the weighted average loss over all exits (stage 1's objective) in stage 3; ``policy_entropy``
  rewards the policies' Bernoulli entropy so they keep exploring; ``rounds`` repeats stages 2 and 3.

Stages 2 and 3 alternate for ``rounds`` rounds. Every stage writes its result into the run folder and is
skipped when the run is started again, so an interrupted run resumes (stages 1 and 3 also resume inside
an epoch, through the training loop).

Run folder::

    stage1/            the training loop's folders (best/, final/, state/)
    memorized.pt       memorized layer of every training instance (1-based), with the data's size
    round1/stage2/     model after stage 2 of round 1 (+ history.json)
    round1/stage3/     the training loop's folders for stage 3 of round 1
    final/             the ConsistentEE model, policies included
    history.json       reward, exit-layer histogram and accuracy of every stage epoch
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..data import Encoded, TextClassificationData, check_labels, model_inputs
from ..errors import bad_value
from ..evaluation.cache import collect_logits, data_digest
from ..heads import policy_extras
from ..evaluation.simulate import simulate
from ..io import write_json_atomic
from ..preflight import is_checkpoint
from ..model import MultiExitModel
from ..rules.policy import PolicyRule
from ..training.objectives import Stage, Weighted
from ..training.objectives import weighted_exit_loss as objective_loss
from ..training import runfolder
from ..training.distributed import EncodedShard, average_gradients, gather_rows, shard_rows
from ..training.run import train_classifier
from ..training.state import load_tensors
from ..training.trainer import (TrainConfig, locked_run, make_accelerator, prepare_run_folder, seed_everything,
                                train)
from .config import ConsistentEEConfig
from .rollout import expected_rollout_loss, memorized_layer, rollout_loss


def sample_alpha(config: ConsistentEEConfig, batch: int, device=None, generator=None) -> float | torch.Tensor:
    """The layer cost of each instance: ``config.alpha``, or (B,) uniform draws from ``config.alpha_range``."""
    bounds = config.alpha_bounds
    if bounds is None:
        return config.alpha
    low, high = bounds
    return low + (high - low) * torch.rand(batch, generator=generator).to(device)


def rollout_on_features(model: MultiExitModel, features: torch.Tensor, labels: torch.Tensor,
                        memorized: torch.Tensor, config: ConsistentEEConfig, generator=None):
    """K copies of a batch's exit features (L, B, H) -> (policy loss, CE at chosen exits, stats)."""
    num_layers, batch, hidden = features.shape
    copies = features.transpose(0, 1).unsqueeze(0).expand(config.copies, batch, num_layers, hidden)  # (K, B, L, H)
    logits = torch.stack([model.exits[l](copies[:, :, l]) for l in range(num_layers)], dim=2)  # (K, B, L, C)
    noisy = F.dropout(copies, model.config.dropout, training=model.training)
    alpha = sample_alpha(config, batch, features.device, generator)  # float or (B,)
    policy_alpha = alpha if model.alpha_conditioned else None
    probs = torch.stack([model.policies[l](noisy[:, :, l], policy_extras(
        logits[:, :, l], l, num_layers, model.config.policy_inputs, policy_alpha)) for l in range(num_layers)],
        dim=2)  # (K, B, L)
    if config.estimator == "expected":
        return expected_rollout_loss(logits, probs, labels, memorized, alpha, config.hardness, config.reward,
                                     config.policy_entropy)
    return rollout_loss(logits, probs, labels, memorized, alpha, config.hardness, config.action,
                        config.epsilon, generator, config.reward, config.policy_entropy)


def compute_memorized(model: MultiExitModel, train_set: Encoded, batch_size: int = 128,
                      accelerator=None) -> torch.Tensor:
    """(N,) memorized layer of every training instance under ``model`` (eval mode); with several processes
    each computes its shard and all get every row."""
    rows = shard_rows(len(train_set), accelerator)
    shard = train_set if len(rows) == len(train_set) else EncodedShard(train_set, rows)
    cache = collect_logits(model, shard, batch_size)
    correct = cache.logits.argmax(dim=-1) == cache.labels  # (L, n)
    return gather_rows(memorized_layer(correct), len(train_set), accelerator)


@torch.no_grad()
def cached_features(model: MultiExitModel, train_set: Encoded, batch_size: int = 128,
                    rows: list[int] | None = None) -> torch.Tensor:
    """(n, L, H) exit features of training instances ``rows`` (default: all) under the frozen model (eval)."""
    model.eval()
    rows = list(range(len(train_set))) if rows is None else list(rows)
    out = torch.empty(len(rows), model.config.num_layers, model.config.hidden_size)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        batch = model_inputs(train_set.collate([train_set[i] for i in idx]))
        _, features = model(**batch, return_features=True)  # (L, b, H)
        out[start : start + len(idx)] = features.transpose(0, 1).float()
    return out


def run_stage2(model: MultiExitModel, features: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor,
               config: ConsistentEEConfig, seed: int, accelerator=None) -> list[dict]:
    """Policy-only REINFORCE on cached features of the frozen model; returns one log record per epoch.

    With several processes, ``features``, ``labels`` and ``memorized`` are this process's shard; every
    process takes a batch of its shard per step and the policies' gradients are averaged over processes.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.policies.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.policies.parameters(), lr=config.stage2_learning_rate)
    rank = accelerator.process_index if accelerator is not None else 0
    generator = torch.Generator().manual_seed(seed + 7919 * rank)
    distributed = accelerator is not None and accelerator.num_processes > 1
    largest = max(gather_object([len(labels)])) if distributed else len(labels)  # steps: the largest shard's
    model.train()  # dropout on, as in the reference's stage 2
    history = []
    for epoch in range(config.stage2_epochs):
        order = torch.randperm(len(labels), generator=generator)
        records = []
        for start in tqdm(range(0, int(largest), config.stage2_batch_size), desc=f"stage2 epoch {epoch + 1}",
                          leave=False, disable=rank != 0):
            idx = order[start : start + config.stage2_batch_size]
            optimizer.zero_grad()
            if len(idx):  # a process whose shard is used up joins the gradient average with no rows
                loss, _, stats = rollout_on_features(model, features[idx].transpose(0, 1), labels[idx],
                                                     memorized[idx], config, generator)
                loss.backward()
                records.append(stats)
            average_gradients(model.policies.parameters(), len(idx), accelerator)
            optimizer.step()
        history.append(_epoch_record("stage2", epoch, records))
    model.eval()
    return history


def _epoch_record(stage: str, epoch: int, records) -> dict:
    return {
        "stage": stage, "epoch": epoch + 1,
        "reward": float(np.mean([r.reward for r in records])),
        "exit_layer": float(np.mean([r.exit_layer for r in records])),
        "accuracy_at_exit": float(np.mean([r.accuracy for r in records])),
        "exit_histogram": torch.stack([r.histogram for r in records]).sum(0).tolist(),
    }


def stage3(memorized: torch.Tensor, config: ConsistentEEConfig, num_layers: int) -> Stage:
    """Stage 3 as a training-loop stage: CE at the chosen exit + policy loss, everything trainable."""

    def loss(model, batch, labels, index):
        logits_all, features = model(**batch, return_features=True)  # (L, B, C), (L, B, H)
        policy_loss, ce, stats = rollout_on_features(_unwrap(model), features, labels, memorized[index.cpu()].to(
            labels.device), config)
        loss = ce + policy_loss
        if config.all_exits_weight:  # keep every exit learning, not only those the policy picks
            loss = loss + config.all_exits_weight * weighted_exit_loss(logits_all, labels)
        return loss, {"reward": stats.reward, "exit_layer": stats.exit_layer, "accuracy_at_exit": stats.accuracy}

    return Stage("consistentee", [1.0] * num_layers, train_backbone=True, train_policies=True, loss=loss)


def weighted_exit_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PABEE's weighted average of the exits' losses, sum_l l * CE_l / sum_l l, for logits (L, B, C) (the
    training loop's ``weighted`` objective)."""
    weights = torch.tensor(Weighted().stages(logits.shape[0])[0].layer_weights, device=logits.device)  # (L,)
    return objective_loss(logits, labels, weights)[0]


@torch.no_grad()
def stage1_pass(model: MultiExitModel, train_set: Encoded, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen model (eval mode) over the training set: (N,) memorized layers and (N, L, H) exit
    features, the two things stages 2 and 3 need from stage 1 (one process)."""
    model.eval()
    correct = torch.empty(model.config.num_layers, len(train_set), dtype=torch.bool)
    out = torch.empty(len(train_set), model.config.num_layers, model.config.hidden_size)
    labels = torch.tensor(train_set.labels)
    for start in range(0, len(train_set), batch_size):
        idx = list(range(start, min(start + batch_size, len(train_set))))
        batch = model_inputs(train_set.collate([train_set[i] for i in idx]))
        logits, features = model(**batch, return_features=True)  # (L, b, C), (L, b, H)
        correct[:, idx] = logits.argmax(-1).cpu() == labels[idx]
        out[idx] = features.transpose(0, 1).float().cpu()
    return memorized_layer(correct), out


def shared_stage1(model, train_set, cache_dir, stage1: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``stage1_pass``, kept in ``cache_dir`` for runs that share the stage-1 model and the training data."""
    path = Path(cache_dir) / "stage1_pass.pt"
    key = f"{Path(stage1).resolve()}|{data_digest(train_set)}"
    if path.is_file():
        saved = load_tensors(path)
        if saved is not None and saved.get("key") == key:
            return saved["memorized"], saved["features"]
    memorized, features = stage1_pass(model, train_set)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "memorized": memorized, "features": features}, tmp)
    tmp.replace(path)  # atomic
    return memorized, features


def _shared_features(model, train_set, cache_dir, stage1) -> torch.Tensor:
    return shared_stage1(model, train_set, cache_dir, stage1)[1]


def _unwrap(model):
    return getattr(model, "module", model)


def policy_summary(model: MultiExitModel, eval_set: Encoded | None, threshold: float = 0.5) -> dict:
    """Accuracy and average exit layer of the policy rule on the evaluation set (simulated, exact)."""
    if eval_set is None:
        return {}
    cache = collect_logits(model, eval_set, progress=False)
    point = simulate(PolicyRule(threshold), cache.logits, signals=cache.signals).point(
        cache.labels, model.config.num_layers, {"threshold": threshold})
    return {"eval_policy_accuracy": point["accuracy"], "eval_policy_avg_layers": point["avg_layers"],
            "eval_full_accuracy": float((cache.logits[-1].argmax(-1) == cache.labels).double().mean())}


def train_consistentee(
    backbone: str,
    train_data: TextClassificationData,
    eval_data: TextClassificationData | None,
    output_dir: str | Path,
    config: ConsistentEEConfig | None = None,
    train_config: TrainConfig | None = None,
    exit_feature: str | None = None,
    max_length: int = 128,
    stage1_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
):
    """The whole schedule; returns (ConsistentEE model, tokenizer). ``stage1_dir`` reuses a finished stage 1
    (e.g. shared by an alpha sweep); ``cache_dir`` (one process) keeps the stage-1 model's memorized layers and
    exit features there, so runs sharing that stage 1 and training data compute them once.

    The output folder is locked while it runs and resumes only a run with the same options and data. With
    several processes (``torchrun``, ``accelerate launch``) the memorized-layer pass, the feature cache and
    stage 2 are sharded over them, stages 1 and 3 are data parallel, and only the main process writes.
    """
    config = config or ConsistentEEConfig()
    config.validate()
    train_config = train_config or TrainConfig()
    output_dir = Path(output_dir)
    accelerator = make_accelerator()
    settings = {**asdict(train_config), **{f"consistentee_{k}": v for k, v in asdict(config).items()},
                "backbone": backbone, "exit_feature": exit_feature, "max_length": max_length,
                "stage1_dir": str(stage1_dir) if stage1_dir else None, "num_processes": accelerator.num_processes,
                "train_data": runfolder.text_digest(train_data), "eval_data": runfolder.text_digest(eval_data)}
    with locked_run(output_dir, accelerator):
        prepare_run_folder(output_dir, settings, True, accelerator)
        if accelerator.is_main_process:
            runfolder.write_run_config(output_dir, settings)
        return _train_consistentee(backbone, train_data, eval_data, output_dir, config, train_config, exit_feature,
                                   max_length, stage1_dir, accelerator, cache_dir)


def _train_consistentee(backbone, train_data, eval_data, output_dir, config, train_config, exit_feature, max_length,
                        stage1_dir, accelerator, cache_dir=None):
    history = _History(output_dir / "history.json", accelerator)
    stage1 = Path(stage1_dir) if stage1_dir else output_dir / "stage1"
    model, tokenizer = _run_stage1(backbone, train_data, eval_data, stage1, train_config, exit_feature, max_length,
                                   history, config.stage1_objective)
    if eval_data is not None:
        check_labels(eval_data, model.config.num_labels, model.config.label_names)
    train_set = Encoded(train_data, tokenizer, model.config.max_length)
    run = _Run(output_dir, config, train_config, accelerator, tokenizer, train_set,
               Encoded(eval_data, tokenizer, model.config.max_length) if eval_data is not None else None,
               torch.tensor(train_set.labels), shard_rows(len(train_set), accelerator), history)
    seed_everything(train_config.seed)
    if model.policies is None:
        model.add_policies(config.policy_hidden, config.inputs, config.alpha_bounds, config.alpha)
    shared = cache_dir is not None and accelerator.num_processes == 1  # the stage-1 pass kept in cache_dir
    run.memorized, first_features = _memorized_layers(model, run, stage1, cache_dir if shared else None)
    for round_index in range(1, config.rounds + 1):  # alternating stages 2 and 3
        if round_index == 1 and shared and first_features is None:
            first_features = partial(_shared_features, model, train_set, cache_dir, stage1)  # only if stage 2 runs
        model = _run_stage2(model, run, round_index, first_features if round_index == 1 else None)
        if config.stage3_epochs:
            model = _run_stage3(model, run, round_index)
    if accelerator.is_main_process:
        model.save_pretrained(output_dir / "final", tokenizer=tokenizer)
        (output_dir / "final" / "consistentee.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return model, tokenizer


class _History:
    """The run's history.json: one record per stage epoch, written by the main process; a resumed run does not
    repeat the records it already holds."""

    def __init__(self, path: Path, accelerator):
        self.path, self.accelerator = path, accelerator
        self.records = json.loads(path.read_text()) if path.is_file() else []
        self.logged = {(h["round"], h["stage"], h["epoch"]) for h in self.records if "round" in h}

    def log(self, records: list[dict], round_index: int) -> None:
        for record in records:
            record["round"] = round_index
            if (round_index, record["stage"], record["epoch"]) not in self.logged:
                self.records.append(record)
        if self.accelerator.is_main_process:
            write_json_atomic(self.path, self.records)


@dataclass
class _Run:
    """What every stage after the first reads: the run's folder and options, the encoded data, this process's
    rows of the training set and the history; ``memorized`` once computed."""

    output_dir: Path
    config: ConsistentEEConfig
    train_config: TrainConfig
    accelerator: object
    tokenizer: object
    train_set: Encoded
    eval_set: Encoded | None
    labels: torch.Tensor
    rows: list[int]
    history: _History
    memorized: torch.Tensor | None = None


def _run_stage1(backbone, train_data, eval_data, stage1: Path, train_config, exit_feature, max_length,
                history: _History, objective: str = "weighted"):
    """Stage 1 (joint, ``objective``), or the finished one in ``stage1``: (model, tokenizer)."""
    picked = stage1 / ("best" if eval_data is not None else "final")
    if picked.is_dir() and (stage1 / "final").is_dir():
        return MultiExitModel.from_pretrained(picked), AutoTokenizer.from_pretrained(picked)
    model, tokenizer, progress = train_classifier(backbone, train_data, eval_data, stage1, objective,
                                                  exit_feature=exit_feature, max_length=max_length,
                                                  config=train_config)
    history.log([{**h, "stage": "stage1"} for h in progress.history], 0)
    return model, tokenizer


def _memorized_layers(model, run: _Run, stage1: Path, cache_dir) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) memorized layers (saved in memorized.pt, reused by a resumed run), and round 1's exit features when
    they come from the same pass (``cache_dir``: one process keeping the stage-1 pass there)."""
    path = run.output_dir / "memorized.pt"
    saved = load_tensors(path) if path.is_file() else None
    if saved is not None and saved["num_examples"] == len(run.train_set):
        return saved["memorized"], None
    features = None
    if cache_dir is not None:
        memorized, features = shared_stage1(model, run.train_set, cache_dir, stage1)
    else:
        memorized = compute_memorized(model, run.train_set, accelerator=run.accelerator)
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"memorized": memorized, "num_examples": len(run.train_set)}, path)
    run.accelerator.wait_for_everyone()
    return memorized, features


def _run_stage2(model, run: _Run, round_index: int, first_features=None):
    """Stage 2 of a round (policies on the frozen model's cached features), or its saved result.
    ``first_features``: round 1's features already computed (a tensor, or a function that computes them)."""
    folder = run.output_dir / f"round{round_index}" / "stage2"
    if is_checkpoint(folder):
        return MultiExitModel.from_pretrained(folder)
    if callable(first_features):
        first_features = first_features()
    features = first_features if first_features is not None else cached_features(model, run.train_set, rows=run.rows)
    records = run_stage2(model, features, run.labels[run.rows], run.memorized[run.rows], run.config,
                         run.train_config.seed + round_index, run.accelerator)
    records[-1].update(policy_summary(model, run.eval_set))
    if run.accelerator.is_main_process:
        model.save_pretrained(folder, tokenizer=run.tokenizer)
    run.history.log(records, round_index)
    run.accelerator.wait_for_everyone()
    return model


def _run_stage3(model, run: _Run, round_index: int):
    """Stage 3 of a round (everything, through the training loop), or its saved result."""
    folder = run.output_dir / f"round{round_index}" / "stage3"
    if is_checkpoint(folder / "final"):
        return MultiExitModel.from_pretrained(folder / "final")
    config = run.config
    stage3_config = TrainConfig(**{**asdict(run.train_config), "epochs": config.stage3_epochs,
                                   "batch_size": config.stage3_batch_size,
                                   "learning_rate": config.stage3_learning_rate})
    objective = _FixedStages([stage3(run.memorized, config, model.config.num_layers)])
    progress = train(model, run.tokenizer, run.train_set, None, objective, stage3_config, folder)
    records = [dict(h) for h in progress.history]
    records[-1].update(policy_summary(model, run.eval_set))
    run.history.log(records, round_index)
    return model


class _FixedStages:
    def __init__(self, stages: list[Stage]):
        self._stages = stages

    def stages(self, num_layers: int) -> list[Stage]:
        return self._stages
