"""A bound for stage-2 exit policies: per-layer logistic probes, trained supervised on held-out phrases to
predict whether an exit agrees with the last exit (or is right), used as exit scores (exit at the first layer
whose score reaches a threshold, threshold swept over the scores' quantiles).

A stage-2 ConsistentEE policy sees the same inputs (exit feature and confidence) and is trained without labels
of this kind, so a probe's area and "saved within 0.5 point" indicate what any policy on these frozen exits can
reach. Reads the frozen model's logits and exit features written by ``sst2_consistentee_policies.py`` (run it
with ``--policy-data heldout`` first):

    python benchmarks/sst2_consistentee_probe.py --run-dir runs/bench-cee-policies
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from layerexit.consistentee.rollout import hits, memorized_layer, reward
from layerexit.evaluation.metrics import area_under_curve, operating_point
from layerexit.io import write_json_atomic


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, 3): max-prob, its square distance from 1/2 and a scaled log-odds (2 classes)."""
    top = logits.softmax(-1).amax(-1)
    return torch.stack([top, (top - 0.5) ** 2, torch.log(top / (1 - top + 1e-6)) / 5], -1)


def curve(score: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Exit at the first layer whose score >= t, for t at 101 quantiles of the scores (+ one above all)."""
    num_layers, n = score.shape
    points = []
    for t in torch.quantile(score[:-1].flatten(), torch.linspace(0, 1, 101)).tolist() + [float("inf")]:
        exits = score >= t
        exits[-1] = True
        layer = exits.long().argmax(0)
        accuracy = (logits[layer, torch.arange(n)].argmax(-1) == labels).double().mean().item()
        points.append({"accuracy": accuracy, "saved_layers": 1 - (layer.double().mean().item() + 1) / num_layers,
                       "params": {"threshold": t}})
    return points


def probe_scores(train: dict, test: dict, target: str, use_feature: bool) -> torch.Tensor:
    z, h, y = train["logits"], train["features"], train["labels"]
    scores = []
    for layer in range(z.shape[0]):
        def inputs(logits, features):
            x = confidence(logits[layer])
            return torch.cat([x, features[:, layer]], 1) if use_feature else x
        x = inputs(z, h)
        mean, std = x.mean(0), x.std(0) + 1e-6
        goal = (z[layer].argmax(-1) == (z[-1].argmax(-1) if target == "agree" else y)).float()
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits((x - mean) / std @ w + b, goal) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            scores.append(torch.sigmoid((inputs(test["logits"], test["features"]) - mean) / std @ w + b))
    return torch.stack(scores)


def reward_gaps(split: dict, alphas=(0.25, 0.5, 1.0), kinds=("paper", "accuracy", "agreement")) -> dict:
    """How much more reward the best max-prob threshold rule earns than the best always-exit-at-one-layer policy,
    per reward kind and alpha (hardness on): a small gap means the reward barely pays for reading confidence."""
    z, y = split["logits"], split["labels"]
    num_layers, n, _ = z.shape
    memorized = memorized_layer(z.argmax(-1) == y)
    ce = torch.stack([F.cross_entropy(z[l], y, reduction="none") for l in range(num_layers)], 1)  # (N, L)
    top = z.softmax(-1).amax(-1).T  # (N, L)
    out = {}
    for kind in kinds:
        for alpha in alphas:
            rewards = torch.stack([reward(ce[:, l], torch.full((n,), l + 1), memorized, num_layers, alpha, True, kind,
                                          hits(z[l].argmax(-1), y, z[-1].argmax(-1), kind))
                                   for l in range(num_layers)], 1)  # (N, L)
            constant = rewards.mean(0).max().item()
            best = -float("inf")
            for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999):
                exits = top > t
                exits[:, -1] = True
                best = max(best, rewards[torch.arange(n), exits.long().argmax(1)].mean().item())
            out[f"{kind}@alpha={alpha}"] = {"best_constant_layer": constant, "best_maxprob_threshold": best,
                                           "gap": best - constant}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/bench-cee-policies")
    parser.add_argument("--train-pass", default="pass_train8000-16000.pt")
    parser.add_argument("--stage1-pass", default="pass_train0-8000.pt", help="stage 1's own training phrases (for "
                        "the reward gaps)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--output", default="benchmarks/results/sst2_consistentee_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    train = torch.load(Path(args.run_dir) / args.train_pass, weights_only=True)
    test = torch.load(Path(args.run_dir) / "pass_test.pt", weights_only=True)
    full = (test["logits"][-1].argmax(-1) == test["labels"]).double().mean().item()
    results = {"max-prob": curve(test["logits"].softmax(-1).amax(-1), test["logits"], test["labels"])}
    for target in ("agree", "correct"):
        for use_feature in (False, True):
            name = f"probe {target}, {'feature + confidence' if use_feature else 'confidence'}"
            results[name] = curve(probe_scores(train, test, target, use_feature), test["logits"], test["labels"])
    summary = {}
    for name, points in results.items():
        op = operating_point(points, full, args.tolerance)
        summary[name] = {"area": area_under_curve(points), "saved_within_tolerance": op["saved_layers"] if op else 0.0}
        print(f"{name:40s} area {summary[name]['area']:.4f}  saved within tolerance "
              f"{summary[name]['saved_within_tolerance']:.3f}")
    gaps = reward_gaps(torch.load(Path(args.run_dir) / args.stage1_pass, weights_only=True))
    for name, gap in gaps.items():
        print(f"reward {name:24s} best constant layer {gap['best_constant_layer']:+.3f}, best max-prob threshold "
              f"{gap['best_maxprob_threshold']:+.3f}, gap {gap['gap']:.3f}")
    write_json_atomic(Path(args.output), {"benchmark": "sst2_consistentee_probe", "args": vars(args),
                                          "reward_gaps_on_stage1_training_phrases": gaps,
                                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                          "full_accuracy": full, "summary": summary, "curves": results})


if __name__ == "__main__":
    main()
