"""The serving engine and its schedulers give the offline engine's answers, row for row (tiny float64 models)."""

from __future__ import annotations

import threading

import pytest
import torch

from tiny import make_batch, make_model

from layerexit.rules import make_rule
from layerexit.serving import Engine, QueueFull, ShuttingDown, make_scheduler

CASES = [("bert", "pooler"), ("roberta", "mean"), ("distilbert", "cls"), ("mpnet", "mean")]
RULES = [("maxprob", {"threshold": 0.8}), ("patience", {"patience": 1}), ("entropy", {"threshold": 0.7}),
         ("consistentee", {"threshold": 0.5})]
SETUPS = [("none", "largest"), ("batch", "largest"), ("layer", "largest"), ("layer", "deepest")]


def rows_of(engine, batch, rule):
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        types = batch["token_type_ids"][i, :n] if batch["token_type_ids"] is not None else None
        out.append(engine.new_row(batch["input_ids"][i, :n], types, rule))
    return out


def serve_all(scheduler, requests):
    scheduler.start()
    try:
        for rows in requests:
            scheduler.submit(rows)
        return [[r.future.result(timeout=30) for r in rows] for rows in requests]
    finally:
        scheduler.stop()


def offline(model, batch, rule):
    return model.early_exit(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rule=rule)


@pytest.mark.parametrize("arch,feature", CASES)
@pytest.mark.parametrize("scheduler,policy", SETUPS)
def test_schedulers_match_offline_early_exit(models, arch, feature, scheduler, policy):
    model = models(arch, feature)
    engine = Engine(model)
    batch = make_batch(arch, batch=10, max_len=9, seed=3)
    for name, params in RULES:
        rule = make_rule(name, **params)
        expected = offline(model, batch, rule)
        rows = rows_of(engine, batch, rule)
        # requests of 1, 3 and 6 rows, submitted together so that batch and layer mix them
        requests = [rows[:1], rows[1:4], rows[4:]]
        got = [p for answers in serve_all(make_scheduler(scheduler, engine, max_batch=4, max_wait_ms=20,
                                                         policy=policy), requests) for p in answers]
        assert [p.exit_layer for p in got] == expected.exit_layer.tolist(), (name, scheduler)
        torch.testing.assert_close(torch.tensor([p.logits for p in got], dtype=torch.float64),
                                   expected.logits, rtol=1e-9, atol=1e-9)
        assert len(set(expected.exit_layer.tolist())) > 1 or name == "consistentee", "rows should exit apart"


def test_rows_with_different_rules_share_layer_steps(models):
    model = models("bert", "cls")
    engine = Engine(model)
    batch = make_batch("bert", batch=8, seed=5)
    strict, loose = make_rule("maxprob", threshold=0.95), make_rule("maxprob", threshold=0.6)
    rows = rows_of(engine, batch, strict)[:4] + rows_of(engine, batch, loose)[4:]
    steps_before = engine.stats.steps
    got = serve_all(make_scheduler("layer", engine, max_batch=64), [rows])[0]
    want = offline(model, batch, strict).exit_layer[:4].tolist() + offline(model, batch, loose).exit_layer[4:].tolist()
    assert [p.exit_layer for p in got] == want
    assert engine.stats.steps - steps_before <= model.config.num_layers  # one step per layer: rules shared steps


@pytest.mark.parametrize("scheduler", ["batch", "layer"])
def test_policy_with_confidence_inputs_and_alpha_dial_matches_offline(scheduler):
    """The default ConsistentEE policy reads its exit's logits, and an alpha-conditioned one the rule's alpha:
    rows at two dial settings, served together, exit where the offline engine exits them."""
    model = make_model("bert", "cls", double=False)
    model.add_policies(8, ("maxprob", "margin", "entropy", "layer"), (0.0, 2.0), 0.5)
    with torch.no_grad():
        for policy in model.policies:  # spread exit probabilities over (0, 1), and make alpha matter
            policy.net[-1].weight.mul_(16)
            policy.net[0].weight[:, -1].mul_(40)
    model.double().eval()
    engine = Engine(model)
    batch = make_batch("bert", batch=10, max_len=9, seed=3)
    cautious, eager = make_rule("consistentee", alpha=0.0), make_rule("consistentee", alpha=2.0)
    want = (offline(model, batch, cautious).exit_layer[:5].tolist()
            + offline(model, batch, eager).exit_layer[5:].tolist())
    assert offline(model, batch, cautious).exit_layer.tolist() != offline(model, batch, eager).exit_layer.tolist()
    rows = rows_of(engine, batch, cautious)[:5] + rows_of(engine, batch, eager)[5:]
    got = serve_all(make_scheduler(scheduler, engine, max_batch=16, max_wait_ms=20), [rows[:3], rows[3:]])
    assert [p.exit_layer for answers in got for p in answers] == want


def test_layer_policies_pick_as_documented(models):
    engine = Engine(models("bert", "cls"))
    scheduler = make_scheduler("layer", engine, policy="largest")
    rows = rows_of(engine, make_batch("bert", batch=6), make_rule("full"))
    scheduler._pool[0], scheduler._pool[2] = rows[:2], rows[2:]
    assert scheduler.pick() == 2  # the larger group
    scheduler._pool[0], scheduler._pool[2] = rows[:4], rows[4:]
    assert scheduler.pick() == 0
    scheduler._skipped[2] = engine.num_layers  # passed over too long: served next
    assert scheduler.pick() == 2
    deepest = make_scheduler("layer", engine, policy="deepest")
    deepest._pool[0], deepest._pool[1] = rows[:5], rows[5:]
    assert deepest.pick() == 1


class Exploding:
    """A rule that raises on its second call: an exception inside one request's step."""

    name = "exploding"
    needs = ()

    def bind(self, num_layers, num_classes):
        return self

    def init_state(self, n, targets=None, device=None):
        return {}

    def should_exit(self, logits, layer, state):
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", ["none", "batch", "layer"])
def test_an_exception_fails_only_its_rows_and_the_scheduler_goes_on(models, name):
    model = models("bert", "cls")
    engine = Engine(model)
    batch = make_batch("bert", batch=4, seed=1)
    good = make_rule("maxprob", threshold=0.8)
    bad_rows = rows_of(engine, batch, Exploding())[:2]
    scheduler = make_scheduler(name, engine, max_batch=2, max_wait_ms=1).start()
    try:
        scheduler.submit(bad_rows)
        for row in bad_rows:
            with pytest.raises(RuntimeError, match="boom"):
                row.future.result(timeout=30)
        later = rows_of(engine, batch, good)
        scheduler.submit(later)
        got = [r.future.result(timeout=30).exit_layer for r in later]
    finally:
        scheduler.stop()
    assert got == offline(model, batch, good).exit_layer.tolist()
    assert scheduler.errors >= 1 and scheduler.in_flight == 0


def test_queue_bound_and_drain_on_stop(models):
    engine = Engine(models("bert", "cls"))
    rule = make_rule("maxprob", threshold=0.9)
    rows = rows_of(engine, make_batch("bert", batch=6), rule)
    scheduler = make_scheduler("batch", engine, max_batch=64, max_wait_ms=10_000, max_queue=5)
    scheduler.start()
    scheduler.submit(rows[:3])
    scheduler.submit(rows[3:5])
    with pytest.raises(QueueFull, match="limit 5"):
        scheduler.submit(rows[5:])
    assert scheduler.queue_depth == 5
    stopper = threading.Thread(target=scheduler.stop)  # drains: the 10 s batch wait is cut short
    stopper.start()
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert all(r.future.result(timeout=0).exit_layer >= 1 for r in rows[:5])
    with pytest.raises(ShuttingDown):
        scheduler.submit(rows[5:])


def test_engine_encode_truncates_or_refuses(tmp_path):
    from tiny_text import write_backbone
    from transformers import AutoTokenizer

    from layerexit.model import MultiExitModel
    from layerexit.serving import InputTooLong

    folder = write_backbone(tmp_path / "bb", layers=2)
    model = MultiExitModel.from_backbone(str(folder), 2, max_length=6).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(folder))
    long = "the movie was very good and the plot was fun"
    (ids, _), = engine.encode([long])
    assert ids.shape[0] == 6 and ids[-1].item() == engine.tokenizer.sep_token_id
    with pytest.raises(InputTooLong, match="maximum of 6"):
        engine.encode(["good", long], truncate=False)
    (ids, types), = engine.encode(["good film"], ["bad plot"])
    assert types is not None and types.tolist().count(1) == 3
