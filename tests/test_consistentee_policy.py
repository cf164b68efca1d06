"""ConsistentEE beyond the paper's form: policy inputs (the exit's confidence and depth), the alpha-conditioned
policy whose alpha is a dial at inference, the reference code's -CE reward, and the stage-3 remedies for
starving exits. The engine and the simulator must feed the policy the same inputs (row-for-row equal exits)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerexit.consistentee import ConsistentEEConfig, reward, rollout_loss, train_consistentee
from layerexit.consistentee.rollout import hits
from layerexit.consistentee.schedule import sample_alpha, weighted_exit_loss
from layerexit.data import load_data
from layerexit.errors import LayerExitError
from layerexit.evaluation.cache import policy_probabilities
from layerexit.evaluation.evaluate import sweep
from layerexit.evaluation.cache import LogitCache
from layerexit.evaluation.simulate import simulate
from layerexit.heads import POLICY_INPUTS, policy_extras
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from layerexit.rules.policy import policy_key
from layerexit.training import TrainConfig
from tiny import make_batch, make_model
from tiny_text import write_backbone, write_csv

ALPHAS = [-0.5, 0.2, 1.0, 2.5]  # below 0: the cautious end of a dial trained from a negative alpha


def test_policy_extras_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]))  # (2, C=3)
    extra = policy_extras(logits, 1, 4, list(POLICY_INPUTS), alpha=torch.tensor([0.5, 2.0]))
    assert extra.shape == (2, 5)
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    torch.testing.assert_close(extra[0], torch.tensor([0.7, 0.5, entropy, 0.5, 0.5]))
    torch.testing.assert_close(extra[1], torch.tensor([1 / 3, 0.0, 1.0, 0.5, 2.0]))
    assert policy_extras(logits, 0, 4, []) is None  # the paper's form: the feature alone
    # a float alpha broadcasts over any leading shape, e.g. (K, B) copies in training
    assert policy_extras(torch.randn(3, 2, 4), 0, 2, ["maxprob"], 1.5).shape == (3, 2, 2)


def conditioned_model(inputs=tuple(POLICY_INPUTS), alpha_range=(0.1, 3.0)):
    model = make_model("bert", "mean").add_policies(8, inputs, alpha_range, alpha=1.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for policy in model.policies:  # spread the random policies' probabilities over (0, 1)
            for p in policy.net.parameters():
                p.mul_(6.0)
            if policy.alpha_gain is not None:  # alpha's direct path moves decisions without swamping them
                policy.alpha_gain.fill_(2.0)
    return model.eval()


@pytest.mark.parametrize("inputs,alpha_range", [(tuple(POLICY_INPUTS), (-1.0, 3.0)), (("maxprob",), None),
                                                ((), (0.0, 2.0))], ids=["all-conditioned", "maxprob-fixed", "alpha"])
def test_engine_feeds_the_policy_what_the_simulator_does(inputs, alpha_range):
    model = conditioned_model(inputs, alpha_range)
    batch = make_batch("bert", batch=24, seed=3)
    inputs_ = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        reference, features = model(*inputs_, return_features=True)  # (L, N, C), (L, N, H)
    alphas = ALPHAS if alpha_range else [None]
    signals = {policy_key(a): policy_probabilities(model, features, reference, a) for a in alphas}
    signals["policy"] = policy_probabilities(model, features, reference, None)
    spread = set()
    for alpha in alphas:
        for threshold in (0.2, 0.5, 0.8):
            rule = make_rule("consistentee", threshold=threshold, alpha=alpha)
            sim = simulate(rule, reference, signals=signals)
            out = model.early_exit(*inputs_, rule=make_rule("consistentee", threshold=threshold, alpha=alpha))
            assert torch.equal(out.exit_layer, sim.exit_layer), (alpha, threshold)
            assert torch.equal(out.predictions, sim.predictions), (alpha, threshold)
            spread |= set(out.exit_layer.tolist())
    assert len(spread) > 1  # the check is not vacuous: rows exit at different layers
    if alpha_range:  # the dial changes the decisions
        a, b = (simulate(make_rule("consistentee", alpha=x), reference, signals=signals).exit_layer for x in
                (ALPHAS[0], ALPHAS[-1]))
        assert not torch.equal(a, b)


def test_alpha_is_no_dial_for_a_fixed_alpha_policy():
    model = conditioned_model(("maxprob",), None)
    batch = make_batch("bert", batch=4)
    with pytest.raises(LayerExitError, match=r"alpha=2.0 is invalid.*fixed alpha"):
        model.early_exit(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         rule=make_rule("consistentee", alpha=2.0))
    with pytest.raises(LayerExitError, match="policy.alpha"):
        make_rule("consistentee", alpha=float("nan"))
    # a simulated dial setting the cache was not collected at says what is missing
    cache = LogitCache(torch.randn(4, 5, 3), torch.zeros(5, dtype=torch.long), torch.rand(4, 5))
    with pytest.raises(LayerExitError, match="policy@alpha=2"):
        simulate(make_rule("consistentee", alpha=2.0), cache.logits, signals=cache.signals)


def test_policy_inputs_and_alpha_range_survive_save_and_load(tmp_path):
    model = conditioned_model()
    model.save_pretrained(tmp_path / "m")
    loaded = MultiExitModel.from_pretrained(tmp_path / "m").double()
    assert loaded.config.policy_inputs == list(POLICY_INPUTS) and loaded.config.policy_alpha_range == [0.1, 3.0]
    assert loaded.alpha_conditioned and loaded.policies[0].extra == len(POLICY_INPUTS) + 1
    feature, logits = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(loaded.policy_probability(1, feature, logits, 0.7),
                               model.policy_probability(1, feature, logits, 0.7))
    with pytest.raises(LayerExitError, match="policy_inputs"):
        make_model("bert", "mean").add_policies(8, ["confidence"])


def test_checkpoints_from_before_the_alpha_gain_load_as_they_were_trained(tmp_path):
    """An alpha-conditioned policy adds gain * alpha to its logit; folders saved before that path existed lack
    the gains and load with gain 0, i.e. the MLP-only policy they were trained as."""
    model = conditioned_model()
    feature, logits = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    extra = policy_extras(logits, 1, model.config.num_layers, model.config.policy_inputs, 0.7)
    # the direct path: logit = MLP([feature, extra]) + gain * alpha
    direct = torch.sigmoid(model.policies[1].net(torch.cat([feature, extra], -1)).squeeze(-1) + 2.0 * 0.7)
    torch.testing.assert_close(model.policy_probability(1, feature, logits, 0.7), direct)
    model.save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert sum(k.endswith(".alpha_gain") for k in tensors) == model.config.num_layers
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha_gain")}, tmp_path / "m" / "model.safetensors")
    old = MultiExitModel.from_pretrained(tmp_path / "m").double()
    assert all(p.alpha_gain.item() == 0.0 for p in old.policies)
    mlp_only = torch.sigmoid(model.policies[1].net(torch.cat([feature, extra], -1)).squeeze(-1))
    torch.testing.assert_close(old.policy_probability(1, feature, logits, 0.7), mlp_only)


def test_a_dial_may_start_below_zero():
    config = ConsistentEEConfig(alpha=0.5, alpha_range=(-0.5, 2.0))
    config.validate()
    assert config.alpha_bounds == (-0.5, 2.0)
    draws = sample_alpha(config, 4000, generator=torch.Generator().manual_seed(0))
    assert -0.5 <= float(draws.min()) < -0.4 and 1.9 < float(draws.max()) <= 2.0
    assert make_rule("consistentee", alpha=-0.5).params == {"threshold": 0.5, "alpha": -0.5}
    with pytest.raises(LayerExitError, match="alpha=-1"):  # one fixed alpha: a cost, never a payment
        ConsistentEEConfig(alpha=-1).validate()
    with pytest.raises(LayerExitError, match="alpha=-1"):  # the default dial setting lies in the range
        ConsistentEEConfig(alpha=-1, alpha_range=(-0.5, 2.0)).validate()


def test_ce_reward_and_validation():
    ce = torch.tensor([0.3, 0.9])
    assert torch.equal(reward(ce, torch.tensor([1, 3]), torch.tensor([1, 1]), 3, 2.0, kind="ce"), -ce)
    per_instance = reward(ce, torch.tensor([3, 3]), torch.tensor([3, 3]), 3, torch.tensor([0.5, 2.0]),
                          hardness=False)
    torch.testing.assert_close(per_instance, -ce - torch.tensor([0.5, 2.0]))
    with pytest.raises(LayerExitError, match="reward"):
        ConsistentEEConfig(reward="f1").validate()
    hit = torch.tensor([1.0, 0.0])  # the accuracy-type rewards: 0/1 gain, the same layer cost
    torch.testing.assert_close(reward(ce, torch.tensor([3, 3]), torch.tensor([3, 3]), 3, 1.0, hardness=False,
                                      kind="accuracy", hit=hit), hit - 1.0)
    with pytest.raises(ValueError, match="hits"):
        reward(ce, torch.tensor([3, 3]), torch.tensor([3, 3]), 3, 1.0, kind="agreement")
    # the probability reward: the right label's probability at the chosen exit (in [0, 1]), the same layer cost
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    ce_rows = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    got = reward(ce_rows, torch.tensor([1, 2]), torch.tensor([2, 2]), 2, 1.0, hardness=False, kind="probability")
    torch.testing.assert_close(got, logits.softmax(-1)[:, 0] - torch.tensor([0.5, 1.0]))
    # blend: the mean of the 0/1 gain and that probability (row 0 right, row 1 wrong), the same cost
    hit = hits(logits.argmax(-1), labels, logits.argmax(-1), "blend")
    assert hit.tolist() == [1.0, 0.0]
    got = reward(ce_rows, torch.tensor([1, 2]), torch.tensor([2, 2]), 2, 1.0, hardness=False, kind="blend", hit=hit)
    torch.testing.assert_close(got, 0.5 * (hit.float() + logits.softmax(-1)[:, 0]) - torch.tensor([0.5, 1.0]))
    with pytest.raises(LayerExitError, match="policy_inputs"):
        ConsistentEEConfig(policy_inputs=("maxprob", "maxprob")).validate()
    with pytest.raises(LayerExitError, match="alpha_range"):
        ConsistentEEConfig(alpha_range=(2.0, 1.0)).validate()
    with pytest.raises(LayerExitError, match="alpha=5"):
        ConsistentEEConfig(alpha=5, alpha_range=(0.1, 3.0)).validate()
    with pytest.raises(LayerExitError, match="all_exits_weight"):
        ConsistentEEConfig(all_exits_weight=-0.1).validate()
    drawn = sample_alpha(ConsistentEEConfig(alpha_range=(0.5, 1.5)), 1000, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (1000,) and 0.5 <= drawn.min() and drawn.max() <= 1.5 and drawn.std() > 0.2
    assert sample_alpha(ConsistentEEConfig(alpha=0.7), 4) == 0.7


def test_entropy_bonus_pushes_policies_towards_exploring():
    logits = torch.randn(1, 2, 3, 2).expand(4, 2, 3, 2)  # (K, B, L, C) identical copies
    raw = torch.tensor([[3.0, -3.0, 0.0], [2.0, 1.0, 0.0]], requires_grad=True)
    probs = torch.sigmoid(raw).unsqueeze(0).expand(4, 2, 3)
    loss, _, _ = rollout_loss(logits, probs, torch.tensor([0, 1]), torch.tensor([2, 3]), 1.0, action="greedy",
                              entropy_weight=0.5)
    loss.backward()  # greedy identical copies: zero advantage, so the gradient is the entropy bonus alone
    step = -raw.grad[:, :-1]  # gradient descent moves logits of pi towards 0 (pi towards 0.5)
    assert (torch.sign(step) == -torch.sign(raw.detach()[:, :-1])).all()
    assert torch.count_nonzero(raw.grad[:, -1]) == 0  # the last layer exits by force: no entropy there


def test_weighted_exit_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # (L=2, B=1, C=2)
    labels = torch.tensor([0])
    ce1, ce2 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(1))
    assert weighted_exit_loss(logits, labels).item() == pytest.approx((1 * ce1 + 2 * ce2) / 3, rel=1e-6)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceepol")
    return {"backbone": str(write_backbone(root / "backbone", layers=3)),
            "train": load_data(str(write_csv(root / "train.csv", 96, seed=1))),
            "eval": load_data(str(write_csv(root / "eval.csv", 48, seed=2)))}


def test_alpha_conditioned_schedule_gives_one_model_with_a_dial(task, tmp_path):
    config = ConsistentEEConfig(copies=4, stage2_epochs=1, stage3_epochs=1, stage2_batch_size=16,
                                stage3_batch_size=16, alpha_range=(0.1, 3.0), all_exits_weight=0.3,
                                policy_entropy=0.01)
    model, tokenizer = train_consistentee(task["backbone"], task["train"], task["eval"], tmp_path / "run", config,
                                          TrainConfig(epochs=1, batch_size=16, learning_rate=2e-3, seed=3),
                                          max_length=16)
    saved = json.loads((tmp_path / "run" / "final" / "consistentee.json").read_text())
    assert saved["alpha_range"] == [0.1, 3.0] and saved["policy_inputs"] == ",".join(POLICY_INPUTS)
    assert model.alpha_conditioned and model.config.policy_inputs == list(POLICY_INPUTS)

    from layerexit.data import Encoded
    from layerexit.evaluation.cache import collect_logits

    cache = collect_logits(model, Encoded(task["eval"], tokenizer, 16), progress=False)
    assert len(cache.policy_by_alpha) == 21 and min(cache.policy_by_alpha) == 0.1
    curves = sweep(cache, ["consistentee"])
    assert [p["params"]["alpha"] for p in curves["consistentee"]] == sorted(cache.policy_by_alpha)
    assert all(p["params"]["threshold"] == 0.5 for p in curves["consistentee"])
    assert "consistentee-threshold" in curves
    # the cache round-trips its dial
    cache.save(tmp_path / "logits.pt")
    assert set(LogitCache.load(tmp_path / "logits.pt").signals) == set(cache.signals)


def test_cli_trains_an_alpha_conditioned_model_and_evaluates_its_dial(tmp_path, capsys):
    from layerexit.cli.main import main

    write_backbone(tmp_path / "backbone", layers=3)
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "train.csv", 96, seed=1, label_words=True)
    write_csv(data / "validation.csv", 32, seed=2, label_words=True)
    write_csv(data / "test.csv", 48, seed=3, label_words=True)
    common = ["--model", str(tmp_path / "backbone"), "--data", str(data), "--max-length", "16"]
    out = tmp_path / "cee"
    assert main(["train", "--method", "consistentee", *common, "--epochs", "1", "--batch-size", "16",
                 "--learning-rate", "2e-3", "--copies", "4", "--stage2-epochs", "1", "--stage3-epochs", "1",
                 "--alpha-range", "-0.5,3", "--alpha", "1", "--policy-inputs", "maxprob,layer",
                 "--all-exits-weight", "0.2", "--reward", "paper", "--output", str(out)]) == 0
    saved = MultiExitModel.from_pretrained(out / "final").config
    assert saved.policy_alpha_range == [-0.5, 3.0] and saved.policy_inputs == ["maxprob", "layer"]
    assert main(["evaluate", *common[:4], "--model", str(out / "final"), "--output", str(tmp_path / "eval"),
                 "--rules", "consistentee,maxprob", "--measure-rules", "consistentee", "--batch-sizes", "4",
                 "--measure-examples", "8", "--rounds", "1", "--alpha", "2.5"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {"consistentee", "consistentee-threshold", "maxprob"} <= set(results["curves"])
    assert len(results["curves"]["consistentee"]) == 21  # the dial, from one model
    assert results["measured"][0]["params"].get("alpha") is None  # the rule reads the dial set by --alpha
    assert results["measured"][0]["matches_simulation"] == 1.0  # engine == simulator at alpha 2.5
    capsys.readouterr()
    assert main(["train", "--method", "consistentee", *common, "--alpha-range", "3", "--output",
                 str(tmp_path / "x")]) != 0
    assert "--alpha-range=" in capsys.readouterr().err


def test_one_stage1_pass_gives_memorized_layers_and_features_and_is_shared(task, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from layerexit.consistentee import schedule
    from layerexit.data import Encoded

    model = MultiExitModel.from_backbone(task["backbone"], 2)
    train_set = Encoded(task["train"], AutoTokenizer.from_pretrained(task["backbone"]), 16)
    memorized, features = schedule.stage1_pass(model, train_set, batch_size=40)
    assert torch.equal(memorized, schedule.compute_memorized(model, train_set))
    torch.testing.assert_close(features, schedule.cached_features(model, train_set), rtol=1e-5, atol=1e-6)

    config = ConsistentEEConfig(copies=4, stage2_epochs=1, stage3_epochs=0, stage2_batch_size=16)
    train_config = TrainConfig(epochs=1, batch_size=16, learning_rate=2e-3, seed=3)
    train_consistentee(task["backbone"], task["train"], None, tmp_path / "a", config, train_config, max_length=16,
                       cache_dir=tmp_path / "shared")
    assert (tmp_path / "shared" / "stage1_pass.pt").is_file()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the shared stage-1 pass was computed again")

    monkeypatch.setattr(schedule, "stage1_pass", no_second_pass)
    train_consistentee(task["backbone"], task["train"], None, tmp_path / "b",
                       ConsistentEEConfig(**{**vars(config), "alpha": 2.0}), train_config, max_length=16,
                       stage1_dir=tmp_path / "a" / "stage1", cache_dir=tmp_path / "shared")


def test_exit_distribution_by_hand():
    from layerexit.consistentee.rollout import exit_distribution

    probs = torch.tensor([[0.5, 0.2, 0.9, 0.3]])
    expected = torch.tensor([[0.5, 0.5 * 0.2, 0.5 * 0.8 * 0.9, 0.5 * 0.8 * 0.1]])  # the last layer exits by force
    torch.testing.assert_close(exit_distribution(probs), expected)
    torch.testing.assert_close(exit_distribution(torch.rand(3, 5, 6)).sum(-1), torch.ones(3, 5))


@pytest.mark.parametrize("alpha", [0.7, torch.tensor([0.2, 1.5, 3.0])], ids=["fixed", "per-instance"])
def test_expected_reward_equals_the_mean_of_sampled_rollouts(alpha):
    from layerexit.consistentee.rollout import expected_rollout_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 3).expand(20000, 3, 4, 3)  # many copies of the same 3 instances
    probs = torch.rand(1, 3, 4).expand(20000, 3, 4)
    labels, memorized = torch.tensor([0, 2, 1]), torch.tensor([1, 3, 4])
    loss, ce, stats = expected_rollout_loss(logits[:1], probs[:1], labels, memorized, alpha)
    _, sampled_ce, sampled = rollout_loss(logits, probs, labels, memorized, alpha,
                                          generator=torch.Generator().manual_seed(1))
    assert -loss.item() == pytest.approx(stats.reward)
    assert stats.reward == pytest.approx(sampled.reward, abs=0.02)  # the Monte-Carlo mean of the same reward
    assert stats.exit_layer == pytest.approx(sampled.exit_layer, abs=0.02)
    assert ce.item() == pytest.approx(sampled_ce.item(), abs=0.02)


def test_expected_gradient_still_learns_where_sampling_stops():
    from layerexit.consistentee.rollout import expected_rollout_loss

    # exit 1 is wrong and confident, exit 2 right: continuing pays, but a policy that (almost) always exits at
    # layer 1 never samples layer 2, so REINFORCE sees no advantage; the expected reward still has the gradient
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]]).expand(1, 1, 2, 2).expand(8, 1, 2, 2)  # (K, B, L, C)
    raw = torch.tensor([[12.0, 0.0]], requires_grad=True)  # pi_1 = sigmoid(12), nearly 1
    labels, memorized = torch.tensor([1]), torch.tensor([2])
    loss, _, _ = rollout_loss(logits, torch.sigmoid(raw).expand(8, 1, 2), labels, memorized, alpha=0.5,
                              generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert raw.grad[0, 0] == 0
    raw.grad = None
    loss, _, _ = expected_rollout_loss(logits, torch.sigmoid(raw).expand(8, 1, 2), labels, memorized, alpha=0.5)
    loss.backward()
    assert raw.grad[0, 0] > 0  # gradient descent lowers pi_1: continue to the right exit
