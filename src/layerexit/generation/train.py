"""Training exits for tokens on a frozen backbone, and the ConsistentEE per-token policy.

Exit adapters (:class:`~layerexit.generation.heads.LowRankAdapter`, before the shared final norm + LM head)
learn with either the weighted cross-entropy on the next token (weights ``l / Σ l`` as PABEE) or distillation
from the last layer (KL(p_L || p_l) at a temperature), which targets agreement with the full model, the thing
early exit must preserve. The backbone is frozen and run without gradients, so only the vocabulary head of
the trained exits costs memory; restrict ``layers`` to the exits you will use (each costs a full LM head).
With ``lora_rank > 0`` peft's LoRA is injected into the attention projections and trained too, and the last
exit joins the loss so the full model is held in place: under ``weighted`` by its own next-token loss, under
``distill`` by distillation, every exit's teacher then being the *original* model (LoRA bypassed). Letting the
adapted model's own last layer teach instead collapses: every exit then agrees with a last layer that has
degenerated with them (docs/benchmarks.md, generation section).

The policy follows ConsistentEE's decoder version (Zeng et al., AAAI 2024): per-layer
``sigmoid(Linear(hidden -> 1))``, K copies of every token with the first never exiting, decaying ε-greedy
actions, reward ``−CE(exit) − α·e/L`` with baseline the mean over the copies, log-probability of the path
divided by the exit layer e. Here it is trained on cached features of a frozen backbone with frozen exits
(the reference code trains it jointly with LoRA), and CE is taken against the full model's greedy token by
default (``target="full"``), since agreement with the full model is what the exits are judged on.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import catalog
from ..consistentee.rollout import choose_actions, path_log_prob, reward
from ..consistentee.rollout import exit_layers as rollout_exits
from ..errors import bad_value
from .teacher_forced import exit_layers, token_batches

OBJECTIVES = catalog.GENERATION_OBJECTIVES  # exit-training objectives: "distill", "weighted"


@dataclass
class ExitTrainConfig:
    objective: str = "distill"
    layers: list[int] | None = None  # 1-based exits to train (None: all but the last)
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    temperature: float = 1.0
    lora_rank: int = 0
    lora_lr: float = 1e-4
    seed: int = 0


def add_lora(model, rank: int, alpha: int | None = None) -> None:
    """Inject LoRA (peft) into the attention projections in place, keeping module paths (the adapter still finds
    every layer's ``k_proj``/``v_proj``)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise bad_value("lora_rank", rank, "LoRA needs peft: pip install peft==0.21.2, or use lora_rank=0") from None
    adapter = model.adapter
    if not adapter.lora_targets:
        raise bad_value("lora_rank", rank, f"the {type(adapter).__name__} names no LoRA target modules; use lora_rank=0")
    config = LoraConfig(r=int(rank), lora_alpha=int(alpha or 2 * rank), target_modules=list(adapter.lora_targets),
                        lora_dropout=0.0, fan_in_fan_out=adapter.lora_fan_in_fan_out)
    inject_adapter_in_model(config, model.lm)
    model.config.training["lora_rank"] = int(rank)


@contextmanager
def lora_disabled(model):
    """Run the original backbone: every peft LoRA layer bypassed inside the block, restored as it was after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.lm.modules() if isinstance(m, BaseTunerLayer)]
    trainable = {p: p.requires_grad for p in model.lm.parameters()}  # peft's toggle also flips these
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def train_exits(model, blocks: torch.Tensor, config: ExitTrainConfig = ExitTrainConfig(),
                log: Callable[[str], None] | None = None) -> dict:
    """Train the exit adapters (and LoRA) on (N, T) token blocks; returns the loss history."""
    if config.objective not in OBJECTIVES:
        raise bad_value("objective", config.objective, f"choose one of {', '.join(OBJECTIVES)}")
    if model.exit_adapters is None and config.lora_rank == 0:
        raise bad_value("adapter_rank", 0, "with the shared head alone there is nothing to train on a frozen "
                        "backbone; build EarlyExitLM(lm, adapter_rank=16) or give lora_rank > 0")
    layers = exit_layers(model, config.layers)[:-1]
    L = model.num_layers
    torch.manual_seed(config.seed)
    if config.lora_rank:
        add_lora(model, config.lora_rank)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("lm.") or "lora_" in name)
    groups = []
    if model.exit_adapters is not None:
        groups.append({"params": list(model.exit_adapters.parameters()), "lr": config.lr})
    lora = [p for n, p in model.lm.named_parameters() if "lora_" in n]
    if lora:
        groups.append({"params": lora, "lr": config.lora_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    history, start = [], time.perf_counter()
    model.train()
    model.lm.eval()  # no dropout in the backbone
    for step in range(int(config.steps)):
        idx = torch.randint(0, blocks.shape[0], (min(config.batch_size, blocks.shape[0]),), generator=gen)
        batch = blocks[idx]  # (B, T)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T-1) each
        with torch.set_grad_enabled(bool(lora)):
            hidden = model.all_hidden(inputs)  # (L, B, T-1, H)
        with torch.no_grad():
            if lora and config.objective == "distill":
                with lora_disabled(model):  # the original model teaches; a drifting self-teacher collapses
                    last = model.all_hidden(inputs)[-1]  # (B, T-1, H)
            else:
                last = hidden[-1].detach()
            teacher = torch.log_softmax(model.exit_logits(L, last).float() / config.temperature, -1)
        optimizer.zero_grad(set_to_none=True)
        total, per_layer = 0.0, {}
        train_layers = [l for l in layers if l < L] + ([L] if lora else [])
        weights = {l: l / sum(train_layers) for l in train_layers}  # PABEE's l / Σ l
        for i, layer in enumerate(train_layers):
            h = hidden[layer - 1] if lora else hidden[layer - 1].detach()
            logits = model.exit_logits(layer, h).float()  # (B, T-1, V)
            if config.objective == "weighted":
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            else:
                student = torch.log_softmax(logits / config.temperature, -1)
                loss = nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") \
                    * config.temperature ** 2 / inputs.shape[1]
            scaled = loss * (weights[layer] if config.objective == "weighted" else 1.0 / len(train_layers))
            scaled.backward(retain_graph=bool(lora) and i < len(train_layers) - 1)
            per_layer[layer] = loss.item()
            total += scaled.item()
        optimizer.step()
        history.append({"step": step + 1, "loss": total, "per_layer": per_layer})
        if log and (step + 1) % max(1, config.steps // 10) == 0:
            log(f"step {step + 1}/{config.steps} loss {total:.4f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.training.update({"exits": asdict(config), "seconds": time.perf_counter() - start})
    return {"history": history, "layers": layers}


# --- per-layer features the policy trains on ---------------------------------------------------------------
@dataclass
class TokenFeatures:
    """Teacher-forced per-exit features of N tokens at C candidate exits (the last one is layer L).

    layers: C exit layers (1-based); normed: (C, N, H) final-normed hidden states (the policy's input);
    ce: (C, N) each exit's cross-entropy against ``info["target"]``.
    """

    layers: list[int]
    normed: torch.Tensor
    ce: torch.Tensor
    info: dict = field(default_factory=dict)


@torch.no_grad()
def collect_features(model, blocks: torch.Tensor, layers: list[int] | None = None, target: str = "full",
                     batch_size: int = 4) -> TokenFeatures:
    """Run the frozen model over (N, T) blocks once (:func:`~layerexit.generation.teacher_forced.token_batches`)
    and keep what the policy trains on per token: the next token is the full model's greedy one
    (``target="full"``) or the text's (``"data"``)."""
    if target not in ("full", "data"):
        raise bad_value("target", target, "choose 'full' (the full model's greedy token) or 'data' (the text)")
    inputs, data = blocks[:, :-1], blocks[:, 1:].flatten()  # (B, T-1), (n,)
    normed, ce, seen = [], [], 0
    for batch in token_batches(model, inputs, layers=layers, batch_size=batch_size):
        n = batch.full.shape[0]
        goal = batch.full if target == "full" else data[seen:seen + n]
        seen += n
        normed.append(model.adapter.final_norm(batch.hidden))  # (C, n, H)
        ce.append(torch.stack([nn.functional.cross_entropy(logits.float(), goal, reduction="none")
                               for logits in batch.logits]))  # (C, n)
    return TokenFeatures(exit_layers(model, layers), torch.cat(normed, dim=1), torch.cat(ce, dim=1),
                         {"target": target, "tokens": seen})


@dataclass
class PolicyTrainConfig:
    alpha: float = 1.0  # cost weight in -CE - alpha * e / L
    copies: int = 4  # K; copy 0 never exits
    epsilon: float = 0.3  # initial exploration rate, decayed linearly to 0
    epochs: int = 3
    batch_size: int = 512
    lr: float = 3e-3
    seed: int = 0


def policy_loss(probs: torch.Tensor, ce: torch.Tensor, layers: list[int], L: int, alpha: float, copies: int,
                epsilon: float, gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """REINFORCE loss of one batch. probs, ce: (C, n) at candidate exits (last = layer L, always exits).

    ConsistentEE's rollout pieces (:mod:`layerexit.consistentee.rollout`) over the candidates: copy 0 never
    exits, the others act ε-greedily; reward ``−CE − α·e/L`` (no hardness term) with e the candidate's layer,
    the copies' mean as baseline, and the path's log-probability divided by e (the decoder version)."""
    C, n = probs.shape
    depth = torch.tensor(layers, dtype=probs.dtype, device=probs.device)  # (C,)
    p = probs.T  # (n, C): the rollout functions take the exits last
    full_depth = torch.zeros(n, C, dtype=torch.bool, device=probs.device)
    full_depth[:, -1] = True  # the first copy never exits: the reward of going all the way
    actions = torch.stack([full_depth] + [choose_actions(p.detach(), "eps_greedy", epsilon, gen)
                                          for _ in range(copies - 1)])  # (K, n, C)
    chosen = rollout_exits(actions)  # (K, n) 1-based candidate index
    layer = depth[chosen - 1]  # (K, n)
    rewards = reward(ce.T.gather(1, (chosen - 1).T).T, layer, None, L, alpha, hardness=False)  # (K, n)
    advantage = rewards - rewards.mean(0, keepdim=True)
    loss = -(advantage.detach() * path_log_prob(p, chosen) / layer).mean()
    return loss, {"reward": float(rewards.mean()), "avg_exit": float(layer[1:].mean()) if copies > 1 else L}


def train_policy(model, features: TokenFeatures, config: PolicyTrainConfig = PolicyTrainConfig(),
                 log: Callable[[str], None] | None = None) -> dict:
    """Train the ConsistentEE per-token policy on cached features (backbone and exits frozen)."""
    if config.copies < 2:
        raise bad_value("copies", config.copies, "ConsistentEE needs K >= 2 copies (the first never exits)")
    if model.policy is None:
        from .heads import TokenPolicy

        model.policy = TokenPolicy(model.adapter.hidden_size, model.num_layers).to(features.normed.dtype)
        model.config.policy = True
    L = model.num_layers
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    linears = [model.policy.linears[l - 1] for l in features.layers]
    params = [p for lin in linears for p in lin.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    n = features.ce.shape[1]
    total_steps = max(1, config.epochs * math.ceil(n / config.batch_size))
    step, history = 0, []
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            x = features.normed[:, idx]  # (C, b, H)
            probs = torch.stack([torch.sigmoid(lin(x[i]).squeeze(-1)) for i, lin in enumerate(linears)])  # (C, b)
            eps = config.epsilon * (1 - step / total_steps)
            loss, stats = policy_loss(probs, features.ce[:, idx], features.layers, L, config.alpha, config.copies,
                                      eps, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history.append({"step": step, "loss": loss.item(), **stats})
        if log:
            log(f"policy epoch {epoch + 1}/{config.epochs}: reward {history[-1]['reward']:.3f} "
                f"avg exit {history[-1]['avg_exit']:.1f}")
    for p in params:
        p.requires_grad_(False)
    model.config.training["policy"] = {**asdict(config), "layers": features.layers, "target": features.info["target"]}
    return {"history": history}


@torch.no_grad()
def fit_shortcuts(model, blocks: torch.Tensor, layers: list[int] | None = None, ridge: float = 1e-3,
                  batch_size: int = 4) -> dict:
    """Fit each chosen exit's :class:`~layerexit.generation.heads.LinearExit` in closed form: ridge
    regression from layer l's hidden state to the last layer's (Din et al., 2023). One frozen forward pass over
    (N, T) blocks; no gradient, no vocabulary head, so it costs a fraction of :func:`train_exits`."""
    from .heads import LinearExit

    if model.exit_adapters is None or not isinstance(model.exit_adapters[0], LinearExit):
        raise bad_value("adapter_kind", model.config.adapter_kind, "fit_shortcuts needs EarlyExitLM(lm, "
                        "adapter_kind='linear')")
    L, H = model.num_layers, model.adapter.hidden_size
    layers = exit_layers(model, layers)[:-1]
    gram = {l: torch.zeros(H + 1, H + 1, dtype=torch.float64) for l in layers}  # [h, 1]ᵀ[h, 1]
    cross = {l: torch.zeros(H + 1, H, dtype=torch.float64) for l in layers}  # [h, 1]ᵀ h_L
    start = time.perf_counter()
    for first in range(0, blocks.shape[0], batch_size):
        hidden = model.all_hidden(blocks[first:first + batch_size]).flatten(1, 2).double()  # (L, n, H)
        target = hidden[-1]
        ones = torch.ones(target.shape[0], 1, dtype=torch.float64)
        for l in layers:
            x = torch.cat([hidden[l - 1], ones], dim=1)  # (n, H + 1)
            gram[l] += x.T @ x
            cross[l] += x.T @ target
    for l in layers:
        scale = float(gram[l].diagonal()[:H].mean())
        reg = ridge * scale * torch.eye(H + 1, dtype=torch.float64)
        reg[H, H] = 0.0  # no penalty on the bias
        solution = torch.linalg.solve(gram[l] + reg, cross[l])  # (H + 1, H)
        linear = model.exit_adapters[l - 1].linear
        linear.weight.copy_(solution[:H].T.to(linear.weight.dtype))
        linear.bias.copy_(solution[H].to(linear.bias.dtype))
    model.config.training["shortcuts"] = {"layers": layers, "ridge": ridge, "tokens": int(blocks.numel()),
                                          "seconds": time.perf_counter() - start}
    return model.config.training["shortcuts"]
