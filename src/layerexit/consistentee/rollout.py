"""ConsistentEE's reinforcement-learning pieces (Zeng et al., AAAI 2024, arXiv 2312.11882), as pure functions.

Notation (the paper's; see docs/methods.md): L exits, ``pi_l`` the policy's exit probability at layer l, ``e`` the
1-based exit layer, ``m`` the 1-based memorized layer. Each instance is rolled out K times; the reward is

    R = -CE(z_e, y) - alpha * (e / L) * (1 - m / L)        (hardness=True, the paper's form)
    R = -CE(z_e, y) - alpha * (e / L)                      (hardness=False)
    R = -CE(z_e, y)                                        (kind="ce": the released reference code's reward,
                                                            every layer and hardness term commented out)
    R = 1[z_e right] - alpha * (e / L) * (1 - m / L)       (kind="accuracy"; "agreement": 1[z_e agrees with z_L])
    R = p_e(y) - alpha * (e / L) * (1 - m / L)             (kind="probability": exp(-CE), the right label's
                                                            probability, bounded like accuracy, graded like CE;
                                                            "blend": (1[z_e right] + p_e(y)) / 2 as the gain)

with the mean reward of the K copies as baseline and loss ``-mean(A.detach() * log pi(path))`` (the paper's
REINFORCE estimator, ``rollout_loss``).

Because every exit's logits are computed anyway, the expected reward under the policies is also available in
closed form: with ``P(e) = pi_e * prod_{l<e} (1 - pi_l)`` (``pi_L = 1``), ``E[R] = sum_e P(e) R(e)``.
``expected_rollout_loss`` ascends its exact gradient (estimator "expected"): no sampling noise, and a policy that
has stopped visiting a layer still learns what continuing would have earned, so it cannot lock into exiting
early merely because the later layers were never sampled.

Our ``alpha`` multiplies the *normalised* exit layer ``e / L``. The reference code's commented-out reward
uses the raw layer number, ``alpha_ref * e``; the two agree when ``alpha = alpha_ref * L`` (its values
0.01-0.09 for L = 12 are alpha = 0.12-1.08 here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import bad_value

from ..catalog import ACTIONS  # names kept in the torch-free index
from .config import REWARDS  # noqa: E402  (see reward())


def memorized_layer(correct: torch.Tensor) -> torch.Tensor:
    """(L, N) bool "exit l is right on x" -> (N,) 1-based m(x) = min{l : exits l..L are all right}; L if the
    last exit is wrong (the paper's memorized layer: the earliest layer from which the prediction stays correct)."""
    num_layers = correct.shape[0]
    stays_right = correct.flip(0).long().cumprod(dim=0).flip(0)  # (L, N): 1 where l..L are all right
    return (num_layers - stays_right.sum(dim=0) + 1).clamp(max=num_layers)


def choose_actions(probs: torch.Tensor, action: str, epsilon: float = 0.1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (..., L) exit probabilities -> (..., L) bool exit actions; the last layer always exits."""
    if action == "bernoulli":
        actions = torch.rand(probs.shape, generator=generator, device=probs.device) < probs
    elif action == "greedy":
        actions = probs > 0.5
    elif action == "eps_greedy":
        explore = torch.rand(probs.shape, generator=generator, device=probs.device) < epsilon
        coin = torch.rand(probs.shape, generator=generator, device=probs.device) < 0.5
        actions = torch.where(explore, coin, probs > 0.5)
    else:
        raise bad_value("action", action, f"choose one of {', '.join(ACTIONS)}")
    actions = actions.clone()
    actions[..., -1] = True
    return actions


def exit_layers(actions: torch.Tensor) -> torch.Tensor:
    """(..., L) bool actions -> (...,) 1-based first layer that exits."""
    return actions.long().argmax(dim=-1) + 1  # argmax returns the first maximum


def path_log_prob(probs: torch.Tensor, exit_layer: torch.Tensor) -> torch.Tensor:
    """log pi(path) = sum_{l<e} log(1 - pi_l) + log pi_e, for probs (..., L) and 1-based exit_layer (...).

    The last layer exits by force, so exiting there adds no log pi_L term.
    """
    num_layers = probs.shape[-1]
    layer = torch.arange(1, num_layers + 1, device=probs.device)  # (L,)
    e = exit_layer.unsqueeze(-1)  # (..., 1)
    log_continue = torch.log1p(-probs.clamp(max=1 - 1e-6))
    log_exit = torch.log(probs.clamp(min=1e-6))
    terms = torch.where(layer < e, log_continue, torch.zeros_like(probs))
    terms = terms + torch.where((layer == e) & (layer < num_layers), log_exit, torch.zeros_like(probs))
    return terms.sum(dim=-1)


def reward(ce: torch.Tensor, exit_layer: torch.Tensor, memorized: torch.Tensor, num_layers: int,
           alpha: float | torch.Tensor, hardness: bool = True, kind: str = "paper",
           hit: torch.Tensor | None = None) -> torch.Tensor:
    """R = -CE - alpha * (e/L) * (1 - m/L) with hardness, else -CE - alpha * (e/L); -CE alone for kind="ce".

    kind="accuracy" and "agreement" replace -CE by ``hit`` (1 where the chosen exit is right, resp. agrees with
    the last exit, else 0) and keep the same layer cost; kind="probability" by exp(-CE), the chosen exit's
    probability of the right label; kind="blend" by the mean of ``hit`` (right) and that probability. ``alpha`` is a float or a tensor broadcastable to ``ce``
    (one alpha per instance for a conditioned policy).
    """
    if kind == "ce":
        return -ce
    if kind not in REWARDS:
        raise bad_value("reward", kind, f"choose one of {', '.join(REWARDS)}")
    if kind == "paper":
        gain = -ce
    elif kind == "probability":
        gain = (-ce).exp()  # p_e(y)
    elif hit is None:
        raise ValueError(f"reward kind {kind!r} needs the 0/1 hits of the chosen exits")
    elif kind == "blend":
        gain = 0.5 * (hit.to(ce.dtype) + (-ce).exp())  # a right answer counts, a surer one a little more
    else:
        gain = hit.to(ce.dtype)
    cost = alpha * exit_layer.to(ce.dtype) / num_layers
    if hardness:
        cost = cost * (1.0 - memorized.to(ce.dtype) / num_layers)
    return gain - cost


def hits(predictions: torch.Tensor, labels: torch.Tensor, final: torch.Tensor, kind: str) -> torch.Tensor | None:
    """The 0/1 gain of the accuracy-type rewards: predictions == labels ("accuracy", and half of "blend") or
    == the last exit's prediction ("agreement"); None for the CE rewards. All arguments broadcast together."""
    if kind in ("accuracy", "blend"):
        return (predictions == labels).double()
    if kind == "agreement":
        return (predictions == final).double()
    return None


@dataclass
class RolloutStats:
    """Detached statistics of one rollout: mean reward, mean exit layer, accuracy at the chosen exits,
    and the exit-layer histogram (L,)."""

    reward: float
    exit_layer: float
    accuracy: float
    histogram: torch.Tensor


def rollout_loss(logits: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor,
                 alpha: float | torch.Tensor, hardness: bool = True, action: str = "bernoulli", epsilon: float = 0.1,
                 generator: torch.Generator | None = None, reward_kind: str = "paper",
                 entropy_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, RolloutStats]:
    """K rollouts per instance; returns (policy loss, CE at the chosen exits, stats).

    logits (K, B, L, C) and probs (K, B, L): the exits' logits and the policies' exit probabilities of K
    copies of a batch (the copies differ by dropout and by sampled actions); labels (B,); memorized (B,);
    alpha a float or (B,) per instance. ``entropy_weight`` > 0 subtracts that multiple of the policies' mean
    Bernoulli entropy (layers 1..L-1) from the loss, which keeps them from collapsing onto one exit.
    """
    num_copies, batch, num_layers, num_classes = logits.shape
    actions = choose_actions(probs.detach(), action, epsilon, generator)  # (K, B, L)
    exit_layer = exit_layers(actions)  # (K, B)
    chosen = logits.gather(2, (exit_layer - 1)[..., None, None].expand(-1, -1, 1, num_classes)).squeeze(2)
    ce = F.cross_entropy(chosen.reshape(-1, num_classes), labels.repeat(num_copies), reduction="none")
    ce = ce.view(num_copies, batch)  # (K, B)
    hit = hits(chosen.argmax(-1), labels, logits[:, :, -1].argmax(-1), reward_kind)  # (K, B) or None
    rewards = reward(ce.detach(), exit_layer, memorized.expand(num_copies, -1), num_layers, alpha, hardness,
                     reward_kind, hit)  # (K, B)
    advantage = rewards - rewards.mean(dim=0, keepdim=True)  # group-mean baseline over the K copies
    policy_loss = -(advantage.detach() * path_log_prob(probs, exit_layer)).mean()
    if entropy_weight:
        p = probs[..., :-1].clamp(1e-6, 1 - 1e-6)  # (K, B, L-1): the last layer exits by force
        bernoulli_entropy = -(p * p.log() + (1 - p) * (1 - p).log())
        policy_loss = policy_loss - entropy_weight * bernoulli_entropy.mean()
    correct = (chosen.argmax(-1) == labels).double()
    stats = RolloutStats(float(rewards.mean()), float(exit_layer.double().mean()), float(correct.mean()),
                         torch.bincount(exit_layer.flatten() - 1, minlength=num_layers).cpu())
    return policy_loss, ce.mean(), stats


def exit_distribution(probs: torch.Tensor) -> torch.Tensor:
    """probs (..., L) exit probabilities -> (..., L) P(first exit at layer l) = pi_l * prod_{k<l} (1 - pi_k); the
    last layer exits by force, so each row sums to 1."""
    forced = torch.ones_like(probs[..., -1:])
    p = torch.cat([probs[..., :-1], forced], dim=-1)
    survive = torch.cumprod(1 - p[..., :-1], dim=-1)  # (..., L-1): still running after layer l
    reach = torch.cat([forced, survive], dim=-1)  # (..., L): reaches layer l
    return reach * p


def expected_rollout_loss(logits: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor,
                          alpha: float | torch.Tensor, hardness: bool = True, reward_kind: str = "paper",
                          entropy_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, RolloutStats]:
    """The exact expected reward over the exit distribution instead of sampled rollouts; returns (policy loss,
    expected CE over the exits, stats), the shapes of :func:`rollout_loss`.

    Policy loss ``-mean(sum_e P(e) R(e))`` with the rewards detached; the CE term weights every exit's loss by
    how often the policy exits there (``P(e)`` detached), the expectation of stage 3's "CE at the chosen exit".
    """
    num_copies, batch, num_layers, num_classes = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, num_classes), labels.repeat_interleave(num_layers).repeat(num_copies),
                         reduction="none").view(num_copies, batch, num_layers)  # (K, B, L)
    layers = torch.arange(1, num_layers + 1, device=logits.device).expand(num_copies, batch, num_layers)
    alpha_t = alpha[..., None] if isinstance(alpha, torch.Tensor) and alpha.dim() else alpha
    hit = hits(logits.argmax(-1), labels[None, :, None], logits[:, :, -1:].argmax(-1), reward_kind)  # (K, B, L)
    rewards = reward(ce.detach(), layers, memorized[None, :, None].expand(num_copies, batch, num_layers), num_layers,
                     alpha_t, hardness, reward_kind, hit)  # (K, B, L): the reward of exiting at each layer
    dist = exit_distribution(probs)  # (K, B, L)
    policy_loss = -(dist * rewards).sum(dim=-1).mean()
    if entropy_weight:
        p = probs[..., :-1].clamp(1e-6, 1 - 1e-6)
        bernoulli_entropy = -(p * p.log() + (1 - p) * (1 - p).log())
        policy_loss = policy_loss - entropy_weight * bernoulli_entropy.mean()
    weights = dist.detach()
    expected_ce = (weights * ce).sum(dim=-1).mean()
    correct = (logits.argmax(-1) == labels[None, :, None]).double()  # (K, B, L)
    stats = RolloutStats(float((weights * rewards).sum(-1).mean()),
                         float((weights * layers).sum(-1).mean()), float((weights.double() * correct).sum(-1).mean()),
                         weights.double().sum(dim=(0, 1)).cpu())
    return policy_loss, expected_ce, stats
