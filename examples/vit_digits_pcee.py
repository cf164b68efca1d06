"""PCEE on a vision transformer trained from scratch: scikit-learn's bundled 8x8 digits, no download.

PCEE (Mofakhami et al., 2024, arXiv 2412.19325) was proposed for vision models (MSDNet, ViT). This example
trains a small multi-exit ViT (6 layers, hidden 64, 2x2 patches: 16 patch tokens + [CLS]) on the digits of
``sklearn.datasets.load_digits`` (1,797 images, 10 classes) with the PABEE weighted loss over all exits, then
fits PCEE, PCEE-WS and temperature scaling on the validation split and shows, on the test split, the accuracy
each reaches for a range of target accuracies δ next to plain max-prob at δ, plus the budget rule.

Split (fixed, seeded): a permutation by ``numpy.random.default_rng(0)``; 1,000 train, 397 validation,
400 test. Takes about a minute on 2 CPU threads.

    .venv/bin/python examples/vit_digits_pcee.py --output runs/vit-digits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import ViTConfig, ViTModel

from layerexit import MultiExitModel
from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.calibration_plots import plot_budgets, plot_controllability, plot_reliability
from layerexit.evaluation.controllability import controllability, fit_rules, at_target
from layerexit.evaluation.simulate import per_layer_accuracy, simulate


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (images (N, 1, 8, 8) in [0, 1], labels (N,))}."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    bounds = {"train": (0, 1000), "validation": (1000, 1397), "test": (1397, len(labels))}
    return {name: (images[order[a:b]], labels[order[a:b]]) for name, (a, b) in bounds.items()}


def build_model(layers: int, hidden: int, seed: int) -> MultiExitModel:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=2 * hidden, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.0)
    return MultiExitModel.from_module(ViTModel(config), num_labels=10, exit_feature="cls", name="vit-digits")


def train(model: MultiExitModel, images, labels, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """PABEE weighted average of the exits' cross-entropies, sum_l l * CE_l / sum_l l (Zhou et al., 2020)."""
    num_layers = model.config.num_layers
    weights = torch.arange(1, num_layers + 1, dtype=torch.float32)
    weights = weights / weights.sum()  # (L,)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # light augmentation: shift by a pixel
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            logits = model(pixel_values=x)  # (L, b, C)
            per_exit = torch.stack([F.cross_entropy(z, labels[idx]) for z in logits])  # (L,)
            loss = (weights * per_exit).sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}: weighted loss {total / len(labels):.3f}")
    model.eval()


@torch.no_grad()
def cache(model: MultiExitModel, images, labels, split: str) -> LogitCache:
    return LogitCache(model(pixel_values=images).float(), labels, split=split)  # (L, N, C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/vit-digits")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-bins", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    splits = digits_splits(args.seed)
    model = build_model(args.layers, args.hidden, args.seed)
    train(model, *splits["train"], epochs=args.epochs, batch_size=64, lr=args.lr, seed=args.seed)
    trained = time.perf_counter()
    fit, test = cache(model, *splits["validation"], "validation"), cache(model, *splits["test"], "test")
    print("per-exit accuracy, test:", " ".join(f"{100 * a:.1f}" for a in per_layer_accuracy(test.logits, test.labels)))

    targets = [round(0.80 + 0.01 * i, 2) for i in range(20)]
    out = controllability(fit, test, targets, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], num_bins=args.num_bins)
    report = out["controllability"]
    sweep = report["target_accuracy"]
    print(f"\ntarget -> accuracy on test (average layers); achievable targets "
          f"{100 * sweep['achievable_range'][0]:.1f}-{100 * sweep['achievable_range'][1]:.1f}%")
    print(f"{'target':>7} " + " ".join(f"{name:>15}" for name in sweep["rules"]))
    for i, target in enumerate(targets):
        cells = [f"{100 * rows[i]['accuracy']:5.1f}% ({rows[i]['avg_layers']:.2f})" for rows in sweep["rules"].values()]
        print(f"{100 * target:6.0f}% " + " ".join(f"{c:>15}" for c in cells))
    for name, s in sweep["summary"].items():
        if s["mean_abs_gap"] is not None:
            print(f"{name:>11}: mean |target - achieved| {100 * s['mean_abs_gap']:.2f} pt over {s['num_targets']} "
                  f"achievable targets; below target by more than 1 pt at {s['below_target_by_more_than_1pt']}")
    for row in report["budgets"]["layers"]["rows"]:
        if "cost" in row:
            print(f"budget {100 * row['asked']:.0f}% of the layers: {100 * row['cost']:.1f}% on test, "
                  f"accuracy {100 * row['accuracy']:.1f}%")

    # the real layer-skipping engine exits every test image where the simulation over cached logits says
    rule = at_target(fit_rules(fit)["pcee"], 0.95)
    engine = model.early_exit(pixel_values=splits["test"][0], rule=rule)
    agree = float((engine.exit_layer == simulate(rule, test.logits).exit_layer).double().mean())
    print(f"PCEE at 95%: engine exits equal simulated exits for {100 * agree:.1f}% of test images")

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    plot_controllability(report, output / "controllability.png")
    plot_budgets(report, output / "budgets.png")
    plot_reliability(report["calibration"]["eval"], output / "reliability_test.png",
                     "ViT on digits: reliability per exit on test (temperatures fitted on validation)")
    summary = {"seconds_train": trained - started, "seconds_total": time.perf_counter() - started,
               "test_per_layer_accuracy": per_layer_accuracy(test.logits, test.labels),
               "engine_matches_simulation": agree, "args": vars(args), "controllability": report}
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output}/results.json, controllability.png, budgets.png, reliability_test.png")


if __name__ == "__main__":
    main()
