"""Training: objectives, stages, seeding, best checkpoint, and resuming after an interruption."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from layerexit.data import Encoded, load_data
from layerexit.errors import LayerExitError
from layerexit.model import MultiExitModel
from layerexit.training import TrainConfig, make_objective, train, weighted_exit_loss
from layerexit.training import trainer as trainer_module
from layerexit.training.run import train_classifier
from tiny_text import write_backbone, write_csv


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    backbone = write_backbone(root / "backbone")
    return {
        "backbone": str(backbone),
        "train": write_csv(root / "train.csv", 160, seed=1),
        "eval": write_csv(root / "eval.csv", 48, seed=2),
    }


def _sets(task, backbone=None):
    tokenizer = AutoTokenizer.from_pretrained(task["backbone"])
    train_set = Encoded(load_data(str(task["train"])), tokenizer, 16)
    eval_set = Encoded(load_data(str(task["eval"])), tokenizer, 16)
    return tokenizer, train_set, eval_set


def _fresh_model(task, seed=0):
    torch.manual_seed(seed)
    return MultiExitModel.from_backbone(task["backbone"], 2, exit_feature="mean")


def test_weighted_loss_matches_hand_computation():
    logits = torch.randn(3, 4, 2)  # (L, B, C)
    labels = torch.tensor([0, 1, 1, 0])
    weights = torch.tensor([1.0, 2.0, 3.0])
    loss, per_exit = weighted_exit_loss(logits, labels, weights)
    expected = [torch.nn.functional.cross_entropy(logits[l], labels) for l in range(3)]
    assert torch.allclose(per_exit, torch.stack(expected))
    assert torch.isclose(loss, (1 * expected[0] + 2 * expected[1] + 3 * expected[2]) / 6)


def test_objective_stages():
    assert make_objective("weighted").stages(3)[0].layer_weights == [1.0, 2.0, 3.0]
    assert make_objective("uniform").stages(3)[0].layer_weights == [1.0, 1.0, 1.0]
    first, second = make_objective("two-stage").stages(3)
    assert first.layer_weights == [0.0, 0.0, 1.0] and first.train_backbone
    assert second.layer_weights == [1.0, 1.0, 0.0] and not second.train_backbone
    with pytest.raises(LayerExitError, match="layer_weights"):
        make_objective("custom", [1.0, 2.0]).stages(3)
    with pytest.raises(LayerExitError, match="objective"):
        make_objective("no-such-objective")


def test_distillation_loss_mixes_labels_and_the_last_exit():
    from layerexit.training.objectives import distillation_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, requires_grad=True)  # (L, B, C)
    labels = torch.tensor([0, 1, 2, 3, 1])
    weights = torch.tensor([1.0, 2.0, 3.0])
    # weight 0: the weighted objective exactly
    assert torch.isclose(distillation_loss(logits, labels, weights, 0.0, 2.0)[0],
                         weighted_exit_loss(logits, labels, weights)[0])
    # by hand: exits 1, 2 mix CE with T^2 * KL(p_3^T || p_l^T); exit 3 keeps its CE
    w, t = 0.3, 2.0
    ce = [torch.nn.functional.cross_entropy(logits[l], labels) for l in range(3)]
    teacher = torch.softmax(logits[2].detach() / t, -1)
    kl = [torch.nn.functional.kl_div(torch.log_softmax(logits[l] / t, -1), teacher, reduction="batchmean") * t * t
          for l in range(2)]
    expected = (1 * ((1 - w) * ce[0] + w * kl[0]) + 2 * ((1 - w) * ce[1] + w * kl[1]) + 3 * ce[2]) / 6
    loss, stats = distillation_loss(logits, labels, weights, w, t)
    assert torch.isclose(loss, expected)
    assert stats["distill_kl"] == pytest.approx(float((kl[0] + kl[1]).detach() / 2), rel=1e-5)
    # the teacher is detached: the last exit's gradient is that of its own CE alone
    loss.backward()
    alone = logits.detach().clone().requires_grad_(True)
    (3 * torch.nn.functional.cross_entropy(alone[2], labels) / 6).backward()
    assert torch.allclose(logits.grad[2], alone.grad[2], atol=1e-6)
    assert logits.grad[0].abs().sum() > 0


def test_distilled_objective_checks_its_options_and_joins_the_fingerprint(task):
    stage, = make_objective("distilled", distill_weight=0.25, distill_temperature=3.0).stages(3)
    assert stage.layer_weights == [1.0, 2.0, 3.0] and stage.loss is not None
    assert stage.settings == {"distill_weight": 0.25, "distill_temperature": 3.0}
    with pytest.raises(LayerExitError, match="distill_weight"):
        make_objective("distilled", distill_weight=1.5)
    with pytest.raises(LayerExitError, match="distill_temperature"):
        make_objective("distilled", distill_temperature=0.0)
    tokenizer, train_set, eval_set = _sets(task)
    model, config = _fresh_model(task), TrainConfig(epochs=1)
    fingerprints = {trainer_module.runfolder.fingerprint(trainer_module.run_settings(
        model, train_set, eval_set, make_objective(name, distill_temperature=t).stages(3), config))
        for name, t in [("weighted", 2.0), ("distilled", 2.0), ("distilled", 1.0)]}
    assert len(fingerprints) == 3
    # a weighted run's settings carry no "settings" key: runs saved before it existed still resume
    assert "settings" not in trainer_module.run_settings(model, train_set, eval_set,
                                                         make_objective("weighted").stages(3), config)["stages"][0]


def test_distilled_training_runs_end_to_end_and_records_its_options(task, tmp_path):
    """The objective trains through the loop (its KL logged per epoch) and its options are in run_config.json.
    Whether distillation helps early exit is a measurement (docs/benchmarks.md), not something a random tiny
    backbone can show: there the last exit's early answers are near uniform."""
    tokenizer, train_set, eval_set = _sets(task)
    train(_fresh_model(task), tokenizer, train_set, eval_set, make_objective("distilled", distill_temperature=1.5),
          TrainConfig(epochs=3, batch_size=16, learning_rate=2e-3, seed=0), tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["stage"] for h in history] == ["joint"] * 3
    assert all(h["distill_kl"] > 0 for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["per_layer_accuracy"][-1] >= 0.8  # chance is about 0.5
    stage = json.loads((tmp_path / "run_config.json").read_text())["settings"]["stages"][0]
    assert stage["settings"] == {"distill_weight": 1.0, "distill_temperature": 1.5}


def test_training_learns_and_keeps_best(task, tmp_path):
    tokenizer, train_set, eval_set = _sets(task)
    model = _fresh_model(task)
    progress = train(model, tokenizer, train_set, eval_set, make_objective("weighted"),
                     TrainConfig(epochs=4, batch_size=16, learning_rate=2e-3, seed=0), tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["per_layer_accuracy"][-1] >= 0.8  # chance is about 0.5
    best = max(h["metric"] for h in history)
    assert progress.best_metric == pytest.approx(best)
    reloaded = MultiExitModel.from_pretrained(tmp_path / "best")
    assert reloaded.config.num_layers == 3 and (tmp_path / "final" / "model.safetensors").is_file()


def test_two_stage_freezes_backbone_in_second_stage(task, tmp_path):
    tokenizer, train_set, eval_set = _sets(task)
    model = _fresh_model(task)
    seen = {}
    original = trainer_module._run_stage

    def spy(run, *args, **kwargs):
        model, stage = run.model, args[2]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        original(run, *args, **kwargs)
        seen[stage.name] = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    trainer_module._run_stage = spy
    try:
        train(model, tokenizer, train_set, eval_set, make_objective("two-stage"),
              TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3), tmp_path)
    finally:
        trainer_module._run_stage = original
    assert any(k.startswith("backbone.") for k in seen["backbone"])
    assert not any(k.startswith("exits.0.") for k in seen["backbone"])  # exit 1 has weight 0 in stage 1
    assert not any(k.startswith("backbone.") for k in seen["exits"])
    assert any(k.startswith("exits.0.") for k in seen["exits"])
    assert not any(k.startswith("exits.2.") for k in seen["exits"])


def test_same_seed_same_weights(task, tmp_path):
    tokenizer, train_set, eval_set = _sets(task)
    states = []
    for run in range(2):
        model = _fresh_model(task, seed=5)
        train(model, tokenizer, train_set, None, make_objective("weighted"),
              TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, seed=7), tmp_path / f"run{run}")
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resume_after_interruption_matches_uninterrupted_run(task, tmp_path):
    tokenizer, train_set, eval_set = _sets(task)
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, seed=3, save_steps=2)

    reference = _fresh_model(task, seed=1)
    train(reference, tokenizer, train_set, eval_set, make_objective("weighted"), config, tmp_path / "ref")

    interrupted = _fresh_model(task, seed=1)
    calls = {"n": 0}
    original = trainer_module.weighted_exit_loss

    def crash_in_second_epoch(*args):
        calls["n"] += 1
        if calls["n"] == 13:  # 10 steps an epoch: step 3 of epoch 2, after the resume point at its step 2
            raise KeyboardInterrupt
        return original(*args)

    trainer_module.weighted_exit_loss = crash_in_second_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            train(interrupted, tokenizer, train_set, eval_set, make_objective("weighted"), config, tmp_path / "run")
    finally:
        trainer_module.weighted_exit_loss = original
    points = sorted((tmp_path / "run" / "state").glob("step-*"))
    assert [p.name for p in points] == ["step-00000012"]  # save_total_limit=1: only the newest is kept
    progress = json.loads((points[0] / "progress.json").read_text())
    assert progress["epoch"] == 1 and progress["step_in_epoch"] == 2  # finished work was kept

    resumed = _fresh_model(task, seed=99)  # different start: everything must come from the resume point
    train(resumed, tokenizer, train_set, eval_set, make_objective("weighted"), config, tmp_path / "run")
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)  # bit-identical
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == json.loads(
        (tmp_path / "ref" / "history.json").read_text())


def test_bad_training_config():
    with pytest.raises(LayerExitError, match="learning_rate"):
        TrainConfig(learning_rate=0).validate()
    with pytest.raises(LayerExitError, match="epochs"):
        TrainConfig(epochs=0).validate()


def test_train_classifier_refuses_eval_labels_that_do_not_fit(task, tmp_path):
    bad_eval = tmp_path / "eval3.csv"
    bad_eval.write_text("text,label\ngood movie,0\nbad movie,1\nthe plot,2\n")
    with pytest.raises(LayerExitError, match="labels"):
        train_classifier(task["backbone"], load_data(str(task["train"])), load_data(str(bad_eval)), tmp_path,
                         config=TrainConfig(epochs=1))
