"""Bad input at the public entry points (early_exit, forward) gets layerexit's error naming the parameter and the
fix, before any layer runs; and the engine works under torch.autocast."""

from __future__ import annotations

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.rules import RULES, make_rule
from tiny import VOCAB, make_batch, make_model

MAXPROB = make_rule("maxprob", threshold=0.6)


@pytest.fixture(scope="module")
def model():
    return make_model("bert", "mean", double=False)


def _batch():
    batch = make_batch("bert", batch=4, max_len=8)
    return batch["input_ids"], batch["attention_mask"]


def _case(name):
    """(kwargs for early_exit, expected message pattern: parameter, then the fix)."""
    ids, mask = _batch()
    if name == "rule None":
        return dict(input_ids=ids, attention_mask=mask, rule=None), r"^rule=None is invalid: pass an exit rule"
    if name == "rule as a name":
        return dict(input_ids=ids, attention_mask=mask, rule="maxprob"), r"^rule='maxprob' is invalid: .*make_rule"
    if name == "mask shape":
        return dict(input_ids=ids, attention_mask=mask[:, :5], rule=MAXPROB), \
            r"^attention_mask=.*\(4, 5\).* must have the shape of input_ids \(4, 8\)"
    if name == "token types shape":
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=mask[:2], rule=MAXPROB), \
            r"^token_type_ids=.*must have the shape of input_ids"
    if name == "1-D ids":
        return dict(input_ids=ids[0], attention_mask=mask[0], rule=MAXPROB), \
            r"^input_ids=.*shape \(8,\).*2-D \(batch, length\).*unsqueeze\(0\)"
    if name == "float ids":
        return dict(input_ids=ids.float(), attention_mask=mask, rule=MAXPROB), \
            r"^input_ids=.*float32.*must be integers: pass input_ids.long\(\)"
    if name == "list ids":
        return dict(input_ids=ids.tolist(), attention_mask=mask, rule=MAXPROB), \
            r"^input_ids='list' is invalid: pass a torch tensor.*return_tensors='pt'"
    if name == "ids above vocabulary":
        return dict(input_ids=ids.masked_fill(ids == ids[0, 0], VOCAB + 5), attention_mask=mask, rule=MAXPROB), \
            rf"^input_ids='ids from \d+ to {VOCAB + 5}' is invalid: ids must lie in \[0, {VOCAB}\).*own tokenizer"
    if name == "negative ids":
        return dict(input_ids=ids - 50, attention_mask=mask, rule=MAXPROB), r"^input_ids='ids from -\d+.*\[0, 100\)"
    if name == "too long":
        long_ids = torch.randint(5, VOCAB, (2, 70))
        return dict(input_ids=long_ids, attention_mask=torch.ones_like(long_ids), rule=MAXPROB), \
            r"^input_ids=.*70 tokens exceed the model's 64 positions: tokenize with truncation=True, max_length=64"
    if name == "empty batch":
        return dict(input_ids=ids[:0], attention_mask=mask[:0], rule=MAXPROB), \
            r"^input_ids=.*\(0, 8\).*the batch is empty: pass at least one row"
    if name == "no ids":
        return dict(rule=MAXPROB), r"^input_ids=None is invalid: pass token ids"
    if name == "all-padding row":
        mask = mask.clone()
        mask[2] = 0
        return dict(input_ids=ids, attention_mask=mask, rule=MAXPROB), \
            r"^attention_mask='rows \[2\] all padding.*at least one real token.*padding_side='right'"
    if name == "left padding":
        return dict(input_ids=ids, attention_mask=mask.flip(1), rule=MAXPROB), \
            r"^attention_mask='rows \[.*\] all padding \(or left-padded\)'"
    if name == "oracle targets wrong length":
        return dict(input_ids=ids, attention_mask=mask, rule=make_rule("oracle-gold"), targets=torch.tensor([0, 1])), \
            r"^targets=.*\(2,\).*one label per row: a 1-D tensor of 4 entries"
    if name == "oracle targets missing":
        return dict(input_ids=ids, attention_mask=mask, rule=make_rule("oracle-gold")), \
            r"^targets=None is invalid: rule 'oracle-gold' is an oracle: pass targets="
    if name == "oracle targets out of range":
        return dict(input_ids=ids, attention_mask=mask, rule=make_rule("oracle-gold"), targets=torch.tensor([0, 1, 2, 7])), \
            r"^targets='labels from 0 to 7' is invalid: labels must lie in \[0, 3\)"
    raise KeyError(name)


CASES = ["rule None", "rule as a name", "mask shape", "token types shape", "1-D ids", "float ids", "list ids",
         "ids above vocabulary", "negative ids", "too long", "empty batch", "no ids", "all-padding row",
         "left padding", "oracle targets wrong length", "oracle targets missing", "oracle targets out of range"]


@pytest.mark.parametrize("name", CASES)
def test_early_exit_refuses_bad_input_with_a_clear_error(model, name):
    kwargs, pattern = _case(name)
    with pytest.raises(LayerExitError, match=pattern):
        model.early_exit(**kwargs)


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("rule", "oracle"))])
def test_forward_refuses_the_same_bad_input(model, name):
    kwargs, pattern = _case(name)
    kwargs.pop("rule")
    with pytest.raises(LayerExitError, match=pattern), torch.no_grad():
        model(**kwargs)


def test_roberta_positions_start_after_the_padding_index():
    roberta = make_model("roberta", "cls", double=False)
    assert roberta.max_positions() == 64 - 2  # max_position_embeddings 64, pad id 1
    ids = torch.full((1, 63), 7)
    with pytest.raises(LayerExitError, match=r"63 tokens exceed the model's 62 positions"):
        roberta.early_exit(ids, torch.ones_like(ids), rule=MAXPROB)


def test_missing_mask_means_all_tokens_are_real(model):
    ids, _ = _batch()
    ids = ids[:1, :3]
    out = model.early_exit(ids, rule=MAXPROB)
    assert torch.equal(out.logits, model.early_exit(ids, torch.ones_like(ids), rule=MAXPROB).logits)


def test_a_valid_batch_passes_unchanged(model):
    ids, mask = _batch()
    out = model.early_exit(ids, mask, rule=make_rule("oracle-gold"), targets=torch.tensor([0, 1, 2, 0]))
    assert out.logits.shape == (4, 3) and out.exit_layer.shape == (4,)


# --- torch.autocast -----------------------------------------------------------------------------------------

RULE_CASES = {"maxprob": {"threshold": 0.6}, "entropy": {"threshold": 0.6}, "patience": {"patience": 1},
              "static": {"layer": 2}, "full": {}}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_early_exit_runs_under_cpu_bf16_autocast(model, name):
    assert name in RULES.names()
    ids, mask = _batch()
    rule = make_rule(name, **RULE_CASES[name])
    reference = model.early_exit(ids, mask, rule=rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.early_exit(ids, mask, rule=rule)
    assert out.logits.dtype == torch.float32 and out.logits.shape == reference.logits.shape
    assert torch.isfinite(out.logits).all()
    # bf16 rounding may move a borderline row by a layer; the answers stay close to the fp32 ones
    assert (out.exit_layer - reference.exit_layer).abs().max() <= 1
    assert torch.allclose(out.logits.softmax(-1), reference.logits.softmax(-1), atol=0.1) or name != "full"


def test_forward_runs_under_cpu_bf16_autocast(model):
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model(ids, mask)
    assert logits.shape == (4, 4, 3) and torch.isfinite(logits).all()
