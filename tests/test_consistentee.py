"""ConsistentEE: rollout maths on hand-made inputs, the stages' effects, reproducibility, and resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerexit.consistentee import ConsistentEEConfig, memorized_layer, path_log_prob, reward, rollout_loss
from layerexit.consistentee.rollout import choose_actions, exit_layers
from layerexit.consistentee.schedule import cached_features, run_stage2, train_consistentee
from layerexit.data import Encoded, load_data
from layerexit.errors import LayerExitError
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from layerexit.training import TrainConfig
from tiny_text import write_backbone, write_csv


def test_path_log_prob_by_hand():
    probs = torch.tensor([[0.2, 0.5, 0.9, 0.3]])  # (1, L=4)
    # exit at layer 3: continue at 1 and 2, exit at 3
    expected = math.log(0.8) + math.log(0.5) + math.log(0.9)
    assert path_log_prob(probs, torch.tensor([3])).item() == pytest.approx(expected, rel=1e-5)
    # exit at layer 1: just log pi_1
    assert path_log_prob(probs, torch.tensor([1])).item() == pytest.approx(math.log(0.2), rel=1e-5)
    # the last layer exits by force: only the continue terms count
    expected_last = math.log(0.8) + math.log(0.5) + math.log(0.1)
    assert path_log_prob(probs, torch.tensor([4])).item() == pytest.approx(expected_last, rel=1e-5)


def test_actions_and_exit_layers():
    probs = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.6, 0.1], [0.1, 0.1, 0.1]])  # (B=3, L=3)
    greedy = choose_actions(probs, "greedy")
    assert greedy[:, -1].all()  # the last layer always exits
    assert exit_layers(greedy).tolist() == [1, 2, 3]
    sampled = choose_actions(torch.ones(2, 3), "bernoulli")
    assert exit_layers(sampled).tolist() == [1, 1]
    with pytest.raises(LayerExitError, match="action"):
        choose_actions(probs, "softmax")


def test_memorized_layer_of_hand_made_tables():
    correct = torch.tensor([
        [1, 0, 1, 1, 0],  # layer 1
        [1, 1, 0, 1, 0],  # layer 2
        [1, 1, 1, 0, 1],  # layer 3
        [1, 1, 1, 1, 1],  # layer 4
    ], dtype=torch.bool)  # (L=4, N=5)
    # x0 right everywhere -> 1; x1 right from 2 on -> 2; x2 wrong at 2 -> 3; x3 wrong at 3 -> 4;
    # x4 right at 3 and 4 -> 3
    assert memorized_layer(correct).tolist() == [1, 2, 3, 4, 3]
    last_wrong = torch.tensor([[1], [1], [0]], dtype=torch.bool)
    assert memorized_layer(last_wrong).tolist() == [3]  # last exit wrong: m = L
    # never earlier than the gold oracle's exit (first correct layer)
    first_right = correct.long().argmax(0) + 1
    assert (memorized_layer(correct) >= first_right).all()


def test_reward_shape():
    ce = torch.tensor([0.3, 0.3, 0.3])
    m = torch.tensor([2, 2, 2])
    r = reward(ce, torch.tensor([1, 2, 3]), m, 4, alpha=1.0)
    assert r[0] > r[1] > r[2]  # deeper exits pay more
    one = ce[:1]
    r_small, r_big = reward(one, torch.tensor([2]), m[:1], 4, 0.5), reward(one, torch.tensor([2]), m[:1], 4, 2.0)
    assert r_small[0] > r_big[0]  # a larger alpha costs more
    hardest = reward(ce, torch.tensor([1, 2, 4]), torch.tensor([4, 4, 4]), 4, alpha=3.0)
    assert torch.allclose(hardest, -ce)  # m = L: rewarded for accuracy only
    assert torch.allclose(reward(ce, torch.tensor([1, 4, 2]), m, 4, alpha=0.0), -ce)
    no_hardness = reward(one, torch.tensor([2]), torch.tensor([4]), 4, alpha=1.0, hardness=False)
    assert no_hardness.item() == pytest.approx(-0.3 - 0.5)
    assert reward(one, torch.tensor([2]), torch.tensor([1]), 4, 1.0).item() == pytest.approx(-0.3 - 0.5 * 0.75)


def test_zero_advantage_gives_zero_policy_gradient():
    # identical copies with greedy actions: every copy gets the same reward, so the advantage is zero
    logits = torch.randn(1, 3, 4, 2).expand(4, 3, 4, 2)  # (K, B, L, C)
    raw = torch.randn(3, 4, requires_grad=True)
    probs = torch.sigmoid(raw).unsqueeze(0).expand(4, 3, 4)  # (K, B, L)
    loss, _, _ = rollout_loss(logits, probs, torch.tensor([0, 1, 0]), torch.tensor([2, 3, 4]), alpha=1.0,
                              action="greedy")
    loss.backward()
    assert torch.count_nonzero(raw.grad) == 0
    # with sampled actions copies differ, the advantage is not zero, and the policy learns
    raw.grad = None
    probs = torch.sigmoid(raw).unsqueeze(0).expand(4, 3, 4)
    loss, _, _ = rollout_loss(logits, probs, torch.tensor([0, 1, 0]), torch.tensor([2, 3, 4]), alpha=1.0,
                              action="bernoulli", generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.count_nonzero(raw.grad) > 0


def test_config_validation():
    with pytest.raises(LayerExitError, match="copies"):
        ConsistentEEConfig(copies=1).validate()
    with pytest.raises(LayerExitError, match="alpha"):
        ConsistentEEConfig(alpha=-1).validate()
    with pytest.raises(LayerExitError, match="action"):
        ConsistentEEConfig(action="argmax").validate()
    with pytest.raises(LayerExitError, match="estimator"):
        ConsistentEEConfig(estimator="sampled").validate()
    with pytest.raises(LayerExitError, match="stage1_objective"):
        ConsistentEEConfig(stage1_objective="uniform").validate()
    with pytest.raises(LayerExitError, match="policy.threshold"):
        make_rule("consistentee", threshold=1.0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("cee")
    return {"backbone": str(write_backbone(root / "backbone", layers=3)),
            "train": load_data(str(write_csv(root / "train.csv", 96, seed=1))),
            "eval": load_data(str(write_csv(root / "eval.csv", 32, seed=2)))}


def test_stage2_changes_only_policy_weights(task):
    from transformers import AutoTokenizer

    model = MultiExitModel.from_backbone(task["backbone"], 2).add_policies(8)
    train_set = Encoded(task["train"], AutoTokenizer.from_pretrained(task["backbone"]), 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = cached_features(model, train_set)
    history = run_stage2(model, features, torch.tensor(train_set.labels), torch.full((len(train_set),), 2),
                         ConsistentEEConfig(copies=4, stage2_epochs=1, stage2_batch_size=16), seed=0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("policies.") for k in changed)
    assert len(history) == 1 and sum(history[0]["exit_histogram"]) == pytest.approx(4 * len(train_set))


def _run(task, out, **overrides):
    config = ConsistentEEConfig(copies=4, stage2_epochs=1, stage3_epochs=1, stage2_batch_size=16,
                                stage3_batch_size=16, **overrides)
    train_config = TrainConfig(epochs=1, batch_size=16, learning_rate=2e-3, seed=3)
    return train_consistentee(task["backbone"], task["train"], task["eval"], out, config, train_config,
                              max_length=16)


def test_stage1_objective_distilled_trains_stage1_with_self_distillation(task, tmp_path):
    _run(task, tmp_path / "d", stage1_objective="distilled")
    stage1 = json.loads((tmp_path / "d" / "stage1" / "run_config.json").read_text())["settings"]["stages"]
    assert stage1[0]["settings"] == {"distill_weight": 1.0, "distill_temperature": 1.0}
    history = json.loads((tmp_path / "d" / "history.json").read_text())
    assert history[0]["stage"] == "stage1" and history[0]["distill_kl"] > 0


def test_full_schedule_is_reproducible_logged_and_resumable(task, tmp_path):
    model_a, _ = _run(task, tmp_path / "a")
    model_b, _ = _run(task, tmp_path / "b")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # same seed, same model
    assert any(k.startswith("policies.") for k in state_a)

    history = json.loads((tmp_path / "a" / "history.json").read_text())
    stages = [h["stage"] for h in history]
    assert stages == ["stage1", "stage2", "consistentee"]
    for record in history[1:]:
        assert {"reward", "exit_layer", "accuracy_at_exit"} <= set(record)
    assert len(history[1]["exit_histogram"]) == 3 and "eval_policy_accuracy" in history[-1]
    memorized = torch.load(tmp_path / "a" / "memorized.pt")["memorized"]
    assert memorized.shape == (96,) and memorized.min() >= 1 and memorized.max() <= 3

    # resuming a finished run redoes nothing and gives the same model
    reloaded = MultiExitModel.from_pretrained(tmp_path / "a" / "final")
    assert all(torch.equal(reloaded.state_dict()[k], state_a[k]) for k in state_a)
    model_c, _ = _run(task, tmp_path / "a")
    assert all(torch.equal(model_c.state_dict()[k], state_a[k]) for k in state_a)
    assert json.loads((tmp_path / "a" / "history.json").read_text()) == history

    # the trained policy runs in the engine like any other rule
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a" / "final")
    batch = tokenizer(["good movie", "the plot was very dull and the acting poor"], padding=True,
                      return_tensors="pt")
    out = reloaded.early_exit(**batch, rule=make_rule("consistentee", threshold=0.5))
    assert out.exit_layer.shape == (2,) and ((out.exit_layer >= 1) & (out.exit_layer <= 3)).all()
