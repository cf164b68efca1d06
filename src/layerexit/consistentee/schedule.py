"""ConsistentEE's training schedule (Zeng et al., AAAI 2024, arXiv 2312.11882; see docs/methods.md).

1. Stage 1, joint: backbone and all exits with PABEE's weighted average loss.
2. The memorized layer of every training instance, computed once with the stage-1 model (eval mode).
3. Stage 2, policies only, on the frozen model: REINFORCE with K copies per instance. The frozen model's
   exit features are computed once and cached; per copy, dropout with the exits' rate is applied to them,
   standing in for the backbone dropout that gives the reference code its diversity across copies.
4. Stage 3, everything: cross-entropy of the exit each copy chose plus the policy loss. One backbone pass
   per batch; the K copies share it and differ by dropout on the exit features and by their actions.

Beyond the paper (each an option; the paper's form is ``policy_inputs=()``, ``alpha_range=None``, and the
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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..data import Encoded, TextClassificationData, check_labels, model_inputs
from ..errors import bad_value
from ..evaluation.cache import collect_logits, data_digest
from ..evaluation.simulate import simulate
from ..heads import POLICY_INPUTS, policy_extras
from ..io import write_json_atomic
from ..model import MultiExitModel
from ..rules.policy import PolicyRule
from ..training.objectives import Stage
from ..training.trainer import TrainConfig, seed_everything, train
from ..training.run import train_classifier
from .rollout import ACTIONS, REWARDS, memorized_layer, rollout_loss

#: the default policy inputs beside the exit feature (see ConsistentEEConfig.policy_inputs)
DEFAULT_POLICY_INPUTS = ("maxprob", "margin", "entropy", "layer")


@dataclass
class ConsistentEEConfig:
    """ConsistentEE's own hyper-parameters (defaults: the reference code's, scaled to a CPU budget)."""

    alpha: float = 1.0
    hardness: bool = True
    #: "paper" (-CE - layer cost) or "ce" (-CE alone, the released reference code)
    reward: str = "paper"
    #: the policies' inputs beside the exit feature (layerexit.heads.POLICY_INPUTS); () = the paper's form
    policy_inputs: tuple[str, ...] = DEFAULT_POLICY_INPUTS
    #: (low, high): alpha drawn per instance and given to the policy (a dial at inference); None = fixed alpha
    alpha_range: tuple[float, float] | None = None
    #: stage 3: weight of the weighted average loss over all exits added to the chosen exits' loss
    all_exits_weight: float = 0.0
    #: stages 2 and 3: weight of the policies' Bernoulli entropy subtracted from the policy loss
    policy_entropy: float = 0.0
    copies: int = 8
    action: str = "bernoulli"
    epsilon: float = 0.1
    rounds: int = 1
    policy_hidden: int = 32
    stage2_epochs: int = 2
    stage2_batch_size: int = 32
    stage2_learning_rate: float = 3e-4
    stage3_epochs: int = 1
    stage3_batch_size: int = 32
    stage3_learning_rate: float = 3e-5

    def validate(self) -> None:
        if self.reward not in REWARDS:
            raise bad_value("reward", self.reward, f"choose one of {', '.join(REWARDS)}")
        unknown = [name for name in self.policy_inputs if name not in POLICY_INPUTS]
        if unknown or len(set(self.policy_inputs)) != len(self.policy_inputs):
            raise bad_value("policy_inputs", list(self.policy_inputs), f"choose distinct names from "
                            f"{', '.join(POLICY_INPUTS)} (none: the paper's policy on the exit feature alone)")
        if self.alpha_range is not None:
            low, high = (float(v) for v in self.alpha_range)
            if not 0 <= low < high:
                raise bad_value("alpha_range", list(self.alpha_range), "give low < high, both >= 0, e.g. 0.1,3")
            if not low <= self.alpha <= high:
                raise bad_value("alpha", self.alpha, f"the default dial must lie in alpha_range [{low}, {high}]")
        for name in ("all_exits_weight", "policy_entropy"):
            if not getattr(self, name) >= 0:
                raise bad_value(name, getattr(self, name), "use a weight >= 0 (0 turns it off)")
        if self.action not in ACTIONS:
            raise bad_value("action", self.action, f"choose one of {', '.join(ACTIONS)}")
        if not self.alpha >= 0:
            raise bad_value("alpha", self.alpha, "use alpha >= 0 (0 turns the layer cost off)")
        if int(self.copies) < 2:
            raise bad_value("copies", self.copies, "use K >= 2: the baseline is the mean reward of the K copies, "
                            "so one copy has zero advantage and learns nothing")
        if not 0 <= self.epsilon <= 1:
            raise bad_value("epsilon", self.epsilon, "use a probability in [0, 1]")
        for name in ("rounds", "stage2_epochs", "stage3_epochs", "stage2_batch_size", "stage3_batch_size"):
            if int(getattr(self, name)) < (0 if name == "stage3_epochs" else 1):
                raise bad_value(name, getattr(self, name), "use a whole number >= 1")


def sample_alpha(config: ConsistentEEConfig, batch: int, device=None, generator=None) -> float | torch.Tensor:
    """The layer cost of each instance: ``config.alpha``, or (B,) uniform draws from ``config.alpha_range``."""
    if config.alpha_range is None:
        return config.alpha
    low, high = (float(v) for v in config.alpha_range)
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
    return rollout_loss(logits, probs, labels, memorized, alpha, config.hardness, config.action,
                        config.epsilon, generator, config.reward, config.policy_entropy)


def compute_memorized(model: MultiExitModel, train_set: Encoded, batch_size: int = 128) -> torch.Tensor:
    """(N,) memorized layer of every training instance under ``model`` (eval mode)."""
    cache = collect_logits(model, train_set, batch_size)
    correct = cache.logits.argmax(dim=-1) == cache.labels  # (L, N)
    return memorized_layer(correct)


@torch.no_grad()
def stage1_pass(model: MultiExitModel, train_set: Encoded, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen model (eval mode) over the training set: (N,) memorized layers and (N, L, H) exit
    features, the two things stages 2 and 3 need from stage 1."""
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


def _shared_stage1(model, train_set, cache_dir, stage1: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``stage1_pass``, kept in ``cache_dir`` for runs that share the stage-1 model and the training data."""
    if cache_dir is None:
        return stage1_pass(model, train_set)
    path = Path(cache_dir) / "stage1_pass.pt"
    key = {"stage1": str(Path(stage1).resolve()), "data_id": data_digest(train_set)}
    if path.is_file():
        saved = torch.load(path)
        if saved["key"] == key:
            return saved["memorized"], saved["features"]
    memorized, features = stage1_pass(model, train_set)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "memorized": memorized, "features": features}, tmp)
    tmp.replace(path)  # atomic
    return memorized, features


@torch.no_grad()
def cached_features(model: MultiExitModel, train_set: Encoded, batch_size: int = 128) -> torch.Tensor:
    """(N, L, H) exit features of every training instance under the frozen model (eval mode)."""
    model.eval()
    out = torch.empty(len(train_set), model.config.num_layers, model.config.hidden_size)
    for start in range(0, len(train_set), batch_size):
        idx = list(range(start, min(start + batch_size, len(train_set))))
        batch = model_inputs(train_set.collate([train_set[i] for i in idx]))
        _, features = model(**batch, return_features=True)  # (L, b, H)
        out[idx] = features.transpose(0, 1).float()
    return out


def run_stage2(model: MultiExitModel, features: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor,
               config: ConsistentEEConfig, seed: int) -> list[dict]:
    """Policy-only REINFORCE on cached features of the frozen model; returns one log record per epoch."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.policies.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.policies.parameters(), lr=config.stage2_learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()  # dropout on, as in the reference's stage 2
    history = []
    for epoch in range(config.stage2_epochs):
        order = torch.randperm(len(labels), generator=generator)
        records = []
        for start in tqdm(range(0, len(order), config.stage2_batch_size), desc=f"stage2 epoch {epoch + 1}",
                          leave=False):
            idx = order[start : start + config.stage2_batch_size]
            loss, _, stats = rollout_on_features(model, features[idx].transpose(0, 1), labels[idx], memorized[idx],
                                                 config, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            records.append(stats)
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
    """PABEE's weighted average of the exits' losses, sum_l l * CE_l / sum_l l, for logits (L, B, C)."""
    num_layers, batch, num_classes = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, num_classes), labels.repeat(num_layers), reduction="none")
    weights = torch.arange(1, num_layers + 1, device=logits.device, dtype=ce.dtype)  # (L,)
    return (ce.view(num_layers, batch).mean(dim=1) * weights).sum() / weights.sum()


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
    (e.g. shared by an alpha sweep); ``cache_dir`` keeps the stage-1 model's memorized layers and exit features
    there, so runs sharing that stage 1 and training data compute them once."""
    config = config or ConsistentEEConfig()
    config.validate()
    train_config = train_config or TrainConfig()
    output_dir = Path(output_dir)
    history_path = output_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    logged = {(h["round"], h["stage"], h["epoch"]) for h in history if "round" in h}

    def log(records: list[dict], round_index: int) -> None:
        for record in records:
            record["round"] = round_index
            if (round_index, record["stage"], record["epoch"]) not in logged:
                history.append(record)
        write_json_atomic(history_path, history)

    # stage 1 (joint, weighted) -----------------------------------------------------------------------
    stage1 = Path(stage1_dir) if stage1_dir else output_dir / "stage1"
    picked = stage1 / ("best" if eval_data is not None else "final")
    if picked.is_dir() and (stage1 / "final").is_dir():
        model, tokenizer = MultiExitModel.from_pretrained(picked), AutoTokenizer.from_pretrained(picked)
    else:
        model, tokenizer, progress = train_classifier(backbone, train_data, eval_data, stage1, "weighted",
                                                      exit_feature=exit_feature, max_length=max_length,
                                                      config=train_config)
        log([{**h, "stage": "stage1"} for h in progress.history], 0)
    if eval_data is not None:
        check_labels(eval_data, model.config.num_labels, model.config.label_names)
    train_set = Encoded(train_data, tokenizer, model.config.max_length)
    eval_set = Encoded(eval_data, tokenizer, model.config.max_length) if eval_data is not None else None
    seed_everything(train_config.seed)
    if model.policies is None:
        model.add_policies(config.policy_hidden, config.policy_inputs, config.alpha_range, config.alpha)

    # memorized layers --------------------------------------------------------------------------------
    memorized_path = output_dir / "memorized.pt"
    first_features = None  # round 1's exit features, from the same pass as the memorized layers
    if memorized_path.is_file() and torch.load(memorized_path)["num_examples"] == len(train_set):
        memorized = torch.load(memorized_path)["memorized"]
    else:
        memorized, first_features = _shared_stage1(model, train_set, cache_dir, stage1)
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"memorized": memorized, "num_examples": len(train_set)}, memorized_path)
    labels = torch.tensor(train_set.labels)

    # alternating stages 2 and 3 -----------------------------------------------------------------------
    for round_index in range(1, config.rounds + 1):
        round_dir = output_dir / f"round{round_index}"
        if (round_dir / "stage2" / "layerexit_config.json").is_file():
            model = MultiExitModel.from_pretrained(round_dir / "stage2")
        else:
            if round_index == 1 and first_features is None:
                first_features = _shared_stage1(model, train_set, cache_dir, stage1)[1]
            features = first_features if round_index == 1 else cached_features(model, train_set)
            records = run_stage2(model, features, labels, memorized, config, train_config.seed + round_index)
            records[-1].update(policy_summary(model, eval_set))
            model.save_pretrained(round_dir / "stage2", tokenizer=tokenizer)
            log(records, round_index)
        if config.stage3_epochs == 0:
            continue
        stage3_dir = round_dir / "stage3"
        if (stage3_dir / "final" / "layerexit_config.json").is_file():
            model = MultiExitModel.from_pretrained(stage3_dir / "final")
            continue
        stage3_config = TrainConfig(**{**asdict(train_config), "epochs": config.stage3_epochs,
                                       "batch_size": config.stage3_batch_size,
                                       "learning_rate": config.stage3_learning_rate})
        objective = _FixedStages([stage3(memorized, config, model.config.num_layers)])
        progress = train(model, tokenizer, train_set, None, objective, stage3_config, stage3_dir)
        records = [dict(h) for h in progress.history]
        records[-1].update(policy_summary(model, eval_set))
        log(records, round_index)

    model.save_pretrained(output_dir / "final", tokenizer=tokenizer)
    (output_dir / "final" / "consistentee.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return model, tokenizer


class _FixedStages:
    def __init__(self, stages: list[Stage]):
        self._stages = stages

    def stages(self, num_layers: int) -> list[Stage]:
        return self._stages
