"""The layer-skipping engine against the reference path and the unmodified backbone.

Invariants: never exiting equals the unmodified model;
always exiting at k equals head k; batched results equal batch-1 results row by row; layers past a row's exit
are never called. Models are float64 so that no comparison depends on float noise.
"""

from __future__ import annotations

import pytest
import torch

from layerexit.rules import make_rule
from tiny import ARCHS, CASE_IDS, CASES, LAYERS, NUM_LABELS, make_batch, make_model, row


def _inputs(batch: dict) -> tuple:
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


# --- never exit equals the unmodified model ------------------------------------------------------------
@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
def test_run_layers_equals_unmodified_backbone(models, arch, feature):
    model = models(arch, feature)
    batch = make_batch(arch)
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padded rows"
    with torch.no_grad():
        state = model.run_layers(model.start(*_inputs(batch)), 0, LAYERS)
        kwargs = {k: v for k, v in batch.items() if v is not None}
        reference = model.backbone(**kwargs).last_hidden_state  # (B, T, H)
    assert state.hidden.shape == reference.shape
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(state.hidden[real], reference[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_run_layers_in_pieces_equals_one_run(models, arch):
    model = models(arch, "cls")
    batch = make_batch(arch)
    with torch.no_grad():
        whole = model.run_layers(model.start(*_inputs(batch)), 0, LAYERS).hidden
        first = model.run_layers(model.start(*_inputs(batch)), 0, 1)
        rest = model.run_layers(first, 1, LAYERS).hidden
        none = model.run_layers(first, 1, 1).hidden
    torch.testing.assert_close(rest, whole, rtol=0, atol=0)
    assert none is first.hidden  # an empty range runs nothing
    assert not torch.allclose(first.hidden, whole)  # and layers really change the states


@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
def test_full_rule_equals_last_exit_of_reference(models, arch, feature):
    model = models(arch, feature)
    batch = make_batch(arch)
    with torch.no_grad():
        reference = model(*_inputs(batch))  # (L, B, C)
    out = model.early_exit(*_inputs(batch), rule=make_rule("full"))
    assert reference.shape == (LAYERS, batch["input_ids"].shape[0], NUM_LABELS)
    assert torch.equal(out.exit_layer, torch.full_like(out.exit_layer, LAYERS))
    torch.testing.assert_close(out.logits, reference[-1], rtol=0, atol=1e-12)
    assert torch.equal(out.predictions, reference[-1].argmax(-1))


@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
def test_reference_path_matches_backbone_and_heads(models, arch, feature):
    """The reference path is the heads applied to the unmodified backbone's last layer."""
    model = models(arch, feature)
    batch = make_batch(arch)
    kwargs = {k: v for k, v in batch.items() if v is not None}
    with torch.no_grad():
        hidden = model.backbone(**kwargs).last_hidden_state  # (B, T, H)
        if feature == "cls":
            feat = hidden[:, 0]
        elif feature == "mean":
            mask = batch["attention_mask"].to(hidden.dtype)
            feat = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            feat = model.adapter.pool(hidden)
        expected = model.exits[-1](feat)
        got = model(*_inputs(batch))[-1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --- always exit at k equals head k --------------------------------------------------------------------
@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k", range(1, LAYERS + 1))
def test_static_rule_equals_exit_k(models, arch, feature, k):
    model = models(arch, feature)
    batch = make_batch(arch)
    with torch.no_grad():
        reference = model(*_inputs(batch))  # (L, B, C)
    out = model.early_exit(*_inputs(batch), rule=make_rule("static", layer=k))
    assert torch.equal(out.exit_layer, torch.full_like(out.exit_layer, k))
    torch.testing.assert_close(out.logits, reference[k - 1], rtol=0, atol=1e-12)


def test_exits_differ_between_layers(models):
    """Guards the tests above: with different heads per layer, 'exit k' is not trivially 'exit L'."""
    model = models("bert", "cls")
    batch = make_batch("bert")
    with torch.no_grad():
        reference = model(*_inputs(batch))
    for k in range(LAYERS - 1):
        assert not torch.allclose(reference[k], reference[-1])


# --- batched equals batch-1 ----------------------------------------------------------------------------
BATCH_RULES = [("patience", {"patience": 1}), ("maxprob", {"threshold": 0.7}), ("entropy", {"threshold": 0.6}),
               ("oracle-gold", {})]


@pytest.mark.parametrize("arch,feature", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,params", BATCH_RULES, ids=[n for n, _ in BATCH_RULES])
def test_batched_equals_batch_one(models, arch, feature, name, params):
    model = models(arch, feature)
    batch = make_batch(arch, batch=8, seed=3)
    targets = torch.arange(8) % NUM_LABELS
    rule = make_rule(name, **params)
    out = model.early_exit(*_inputs(batch), rule=rule, targets=targets)
    for i in range(8):
        one = row(batch, i)
        single = model.early_exit(*_inputs(one), rule=rule, targets=targets[i : i + 1])
        assert int(single.exit_layer[0]) == int(out.exit_layer[i]), f"row {i}"
        assert int(single.predictions[0]) == int(out.predictions[i]), f"row {i}"
        torch.testing.assert_close(single.logits[0], out.logits[i], rtol=0, atol=1e-10)


def test_batched_run_has_mixed_exits_and_ragged_rows(models):
    """The batch-1 comparison above is only meaningful if rows leave the batch at different layers."""
    batch = make_batch("bert", batch=8, seed=3)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2
    mixed = 0
    for name, params in BATCH_RULES:
        out = models("bert", "cls").early_exit(*_inputs(batch), rule=make_rule(name, **params),
                                              targets=torch.arange(8) % NUM_LABELS)
        mixed += len(set(out.exit_layer.tolist())) > 1
    assert mixed >= 2


# --- layers past an input's exit are never executed ----------------------------------------------------
class LayerCalls:
    """Counts the rows each layer call processes, in call order (ALBERT shares one module: order tells
    which layer index a call is, since the engine runs layers 0, 1, ... one call each)."""

    def __init__(self, model):
        self.rows: list[int] = []
        modules = {id(m): m for m in (model.adapter.layer_module(i) for i in range(model.config.num_layers))}
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules.values()]

    def _hook(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.rows.append(int(hidden.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_past_exit_are_never_called(models, arch):
    model = models(arch, "cls")
    batch = make_batch(arch, batch=8, seed=3)
    with LayerCalls(model) as calls:
        out = model.early_exit(*_inputs(batch), rule=make_rule("patience", patience=1))
    exits = out.exit_layer
    assert len(set(exits.tolist())) > 1, "pick a rule that exits rows at different layers"
    assert sum(calls.rows) == int(exits.sum())  # rows processed by layers == sum of exit layers
    assert len(calls.rows) == int(exits.max())  # no layer runs once every row has exited
    for index, n in enumerate(calls.rows):
        assert n == int((exits > index).sum()), f"layer {index} ran {n} rows"


@pytest.mark.parametrize("arch", ARCHS)
def test_static_one_runs_only_layer_zero(models, arch):
    model = models(arch, "mean")
    batch = make_batch(arch)
    with LayerCalls(model) as calls:
        out = model.early_exit(*_inputs(batch), rule=make_rule("static", layer=1))
    assert calls.rows == [batch["input_ids"].shape[0]]
    assert torch.equal(out.exit_layer, torch.ones_like(out.exit_layer))
    with LayerCalls(model) as calls:
        model.early_exit(*_inputs(batch), rule=make_rule("full"))
    assert calls.rows == [batch["input_ids"].shape[0]] * LAYERS


def test_hooks_count_every_layer_of_the_reference_path(models):
    """ALBERT runs one shared module L times; the counter must see all L calls."""
    model = models("albert", "cls")
    assert model.adapter.layer_module(0) is model.adapter.layer_module(LAYERS - 1)
    batch = make_batch("albert")
    with LayerCalls(model) as calls, torch.no_grad():
        model(*_inputs(batch))
    assert calls.rows == [batch["input_ids"].shape[0]] * LAYERS


def test_exited_rows_drop_dead_padding_columns(models):
    """Once the long rows exit, the short rows run without the padding columns nobody needs."""
    model = models("bert", "cls")
    batch = make_batch("bert", batch=4, seed=1)
    lengths = batch["attention_mask"].sum(1)
    state = model.start(*_inputs(batch))
    short = lengths < lengths.max()
    smaller = state.select(short)
    assert smaller.hidden.shape[1] == int(lengths[short].max()) < state.hidden.shape[1]
    assert smaller.hidden.shape[0] == int(short.sum())


def test_early_exit_restores_training_mode():
    model = make_model("bert", "cls", double=False)
    model.train()
    batch = make_batch("bert")
    first = model.early_exit(*_inputs(batch), rule=make_rule("full"))
    second = model.early_exit(*_inputs(batch), rule=make_rule("full"))
    assert model.training and model.exits[0].training
    torch.testing.assert_close(first.logits, second.logits)  # dropout was off inside the engine
