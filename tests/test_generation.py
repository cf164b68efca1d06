"""Decoder early exit: the layer-range primitive, KV-cache strategies, speculative decoding, bad input."""

from __future__ import annotations

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.generation import EarlyExitLM, generate, generate_speculative, make_token_rule
from layerexit.generation.rules import TokenRule
from layerexit.rules import ExitRule, MaxProb
from tiny_decoder import DECODER_ARCHS, make_lm, prompt

NEW = 16


class ScriptedRule(ExitRule):
    """Test rule: the token at generated position t exits at plan[t % len(plan)] (1-based), whatever it sees."""

    name = "scripted"
    reads_logits = False

    def __init__(self, plan):
        self.plan = plan

    def should_exit(self, logits, layer, state):
        return torch.tensor([layer + 1 == self.plan[int(state["position"][0]) % len(self.plan)]])


def Scripted(plan) -> TokenRule:
    return TokenRule(ScriptedRule(plan), min_layer=1)


def hf_greedy(lm, ids, new=NEW):
    out = lm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def lms():
    return {arch: make_lm(arch, scale=8.0) for arch in DECODER_ARCHS}


@pytest.mark.parametrize("arch", DECODER_ARCHS)
@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_never_exit_equals_hf_generate(lms, arch, kv):
    model = EarlyExitLM(lms[arch])
    ids = prompt()
    out = generate(model, ids, make_token_rule("never"), NEW, kv=kv)
    assert out.tokens == hf_greedy(lms[arch], ids)
    assert out.exit_layers == [model.num_layers] * NEW


@pytest.mark.parametrize("arch", DECODER_ARCHS)
@pytest.mark.parametrize("draft", [1, 2, 3])
def test_speculative_equals_full_greedy(lms, arch, draft):
    model = EarlyExitLM(lms[arch])
    ids = prompt(seed=1)
    out = generate_speculative(model, ids, draft_layers=draft, num_draft=3, max_new_tokens=NEW)
    assert out.tokens == hf_greedy(lms[arch], ids)
    assert out.stats["drafted"] >= out.stats["accepted"] >= 0
    assert out.stats["cycles"] >= 1


def _full_sequence(ids, out):
    return torch.cat([ids, torch.tensor([out.tokens[:-1]])], dim=1)  # inputs that produced every new token


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recompute_matches_teacher_forced_full_model(lms, arch):
    """Deferred recomputation caches exactly the full model's K/V, so token t equals the exit-e_t head on a
    plain full forward over the generated sequence."""
    model = EarlyExitLM(lms[arch])
    ids = prompt(seed=2)
    out = generate(model, ids, Scripted([2, 1, 4, 3, 1, 1, 2]), NEW, kv="recompute")
    assert sorted(set(out.exit_layers)) == [1, 2, 3, 4]
    assert out.layer_tokens > sum(out.exit_layers[1:])  # pending tokens were recomputed
    seq = _full_sequence(ids, out)
    with torch.no_grad():
        hidden = model.all_hidden(seq)  # (L, 1, T, H)
    P = ids.shape[1]
    expected = [int(model.exit_logits(e, hidden[e - 1, 0, P - 1 + i]).argmax()) for i, e in enumerate(out.exit_layers)]
    assert out.tokens == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_propagate_matches_frozen_state_reference(lms, arch):
    """State propagation = every deeper layer sees an exited token as its exit hidden state (CALM)."""
    model = EarlyExitLM(lms[arch])
    ids = prompt(seed=3)
    out = generate(model, ids, Scripted([1, 3, 2, 4]), NEW, kv="propagate")
    seq = _full_sequence(ids, out)
    P, T = ids.shape[1], seq.shape[1]
    exit_of = torch.full((T,), model.num_layers)
    exit_of[P:] = torch.tensor(out.exit_layers[1:])  # position P-1+i is fed to produce token i
    adapter = model.adapter
    positions = torch.arange(T)
    with torch.no_grad():
        h = adapter.embed(seq, positions)
        kwargs = adapter.layer_kwargs(h, positions)
        states = []
        frozen = h.clone()
        for index in range(model.num_layers):
            h = adapter.run_layers(h, index, index + 1, positions, None, kwargs)
            done = exit_of <= index + 1  # exited at or before this layer: freeze from here on
            frozen[0, exit_of == index + 1] = h[0, exit_of == index + 1]
            h = torch.where(done[None, :, None], frozen, h)
            states.append(h)
    expected = [int(model.exit_logits(e, states[e - 1][0, P - 1 + i]).argmax()) for i, e in enumerate(out.exit_layers)]
    assert out.tokens == expected


def test_strategies_differ_only_through_kv(lms):
    """With exits at the last layer only, both strategies equal the full model; with early exits they run."""
    model = EarlyExitLM(lms["llama"])
    ids = prompt(seed=4)
    full = generate(model, ids, None, NEW).tokens
    for kv in ("propagate", "recompute"):
        out = generate(model, ids, make_token_rule("saturation", threshold=-1.0, min_layer=2), NEW, kv=kv)
        assert set(out.exit_layers[1:]) == {2}
        assert out.avg_layers < model.num_layers
        assert len(out.tokens) == NEW
    last_only = make_token_rule("maxprob", min_layer=model.num_layers)  # no candidate layer before the last
    assert generate(model, ids, last_only, NEW, kv="recompute").tokens == full


def test_streaming_and_eos(lms):
    model = EarlyExitLM(lms["gpt2"])
    ids = prompt(seed=5)
    full = generate(model, ids, None, NEW).tokens
    eos = full[3]
    seen = []
    out = generate(model, ids, None, NEW, eos_token_id=eos, on_token=seen.append)
    assert seen == out.tokens == full[: full.index(eos) + 1]
    spec = generate_speculative(model, ids, 2, 4, NEW, eos_token_id=eos)
    assert spec.tokens == out.tokens


def test_bad_requests(lms):
    model = EarlyExitLM(lms["llama"])
    with pytest.raises(LayerExitError, match=r"prompt=.*context is 64 positions.*shorten"):
        generate(model, prompt(60), None, 10)
    with pytest.raises(LayerExitError, match=r"draft_layers=4 is invalid.*between 1 and 3"):
        generate_speculative(model, prompt(), draft_layers=4)
    with pytest.raises(LayerExitError, match=r"draft_layers=0"):
        generate_speculative(model, prompt(), draft_layers=0)
    with pytest.raises(LayerExitError, match=r"min_layer=9 is invalid.*between 1 and 4"):
        generate(model, prompt(), make_token_rule("maxprob", min_layer=9), 4)
    with pytest.raises(LayerExitError, match=r"kv='copy' is invalid.*propagate, recompute"):
        generate(model, prompt(), None, 4, kv="copy")
    with pytest.raises(LayerExitError, match=r"input_ids=\(2, 7\).*one prompt at a time"):
        generate(model, torch.cat([prompt(), prompt()]), None, 4)
    with pytest.raises(LayerExitError, match=r"rule='policy'.*no trained policy"):
        generate(model, prompt(), make_token_rule("policy", min_layer=1), 4)
    with pytest.raises(LayerExitError, match=r"rule='calm' is invalid.*choose one of"):
        make_token_rule("calm")


def test_unsupported_architecture_and_attention():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=37))
    with pytest.raises(LayerExitError, match=r"model_type='gpt_neox' is invalid.*supports gpt2, llama"):
        EarlyExitLM(neox)
    lm = make_lm("llama")
    lm.config._attn_implementation = "flex_attention"
    with pytest.raises(LayerExitError, match=r"attn_implementation='flex_attention'.*'sdpa' or 'eager'"):
        EarlyExitLM(lm)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eager_attention_equals_hf(arch):
    lm = make_lm(arch, attn="eager", scale=8.0)
    ids = prompt(seed=6)
    model = EarlyExitLM(lm)
    assert generate(model, ids, None, NEW).tokens == hf_greedy(lm, ids)
    assert generate_speculative(model, ids, 1, 3, NEW).tokens == hf_greedy(lm, ids)
    out = generate(model, ids, Scripted([1, 2]), NEW, kv="recompute")
    assert len(out.tokens) == NEW


def test_calm_decaying_threshold():
    rule = make_token_rule("maxprob", threshold=0.8, decay=True).bind(4, 100).with_horizon(10)
    assert rule.threshold_at(0) == pytest.approx(0.8)
    assert rule.threshold_at(10) == pytest.approx(0.9 * 0.8 + 0.1 * 0.8 * torch.exp(torch.tensor(-4.0)).item())
    assert rule.threshold_at(5) < rule.threshold_at(1)
    plain = make_token_rule("maxprob", threshold=0.8).bind(4, 100).with_horizon(10)
    assert plain.threshold_at(9) == 0.8


def test_exit_layers_restrict_candidates(lms):
    model = EarlyExitLM(lms["llama"])
    rule = make_token_rule("saturation", threshold=-1.0, min_layer=2, exit_layers=[3])
    out = generate(model, prompt(), rule, 6)
    assert out.exit_layers[1:] == [3] * 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_speculative_bonus_token_when_every_draft_is_accepted(arch):
    """Layers after the draft depth write nothing to the residual stream, so every draft is right: each cycle
    keeps all its drafts plus the full model's next token (the bonus), and the output is still exact."""
    lm = make_lm(arch, scale=8.0)
    with torch.no_grad():
        for layer in EarlyExitLM(lm).adapter.layers[2:]:
            for name, p in layer.named_parameters():
                if name.split(".")[-2] in ("o_proj", "down_proj", "c_proj"):
                    p.zero_()  # attention and MLP outputs: the layer is the identity
    model = EarlyExitLM(lm)
    ids = prompt(seed=8)
    out = generate_speculative(model, ids, draft_layers=2, num_draft=3, max_new_tokens=NEW)
    assert out.tokens == hf_greedy(lm, ids)
    assert out.stats["acceptance"] == 1.0
    assert out.stats["bonus"] == out.stats["cycles"] - 1  # the last cycle stops at max_new_tokens
    assert out.stats["cycles"] == 4  # 1 prefill token + 3 cycles of 3 drafts + bonus + 3 final drafts = 16
    plain = generate_speculative(model, ids, draft_layers=2, num_draft=3, max_new_tokens=NEW, bonus=False)
    assert plain.tokens == out.tokens and plain.stats["bonus"] == 0 and plain.stats["cycles"] == 5
    gated = generate_speculative(model, ids, draft_layers=2, num_draft=3, max_new_tokens=NEW, draft_threshold=1.01)
    assert gated.tokens == out.tokens and gated.stats["bonus"] == 0  # no draft is confident: no bonus is paid for


def test_speculative_with_draft_vocabulary_is_still_exact(lms):
    model = EarlyExitLM(lms["llama"])
    ids = prompt(seed=7)
    vocab = torch.arange(3, 40)
    out = generate_speculative(model, ids, 2, 3, NEW, draft_vocab=vocab)
    assert out.tokens == hf_greedy(lms["llama"], ids)
    assert out.stats["draft_vocab"] == 37
    adaptive = generate_speculative(model, ids, 2, 4, NEW, draft_threshold=0.99)
    assert adaptive.tokens == out.tokens and adaptive.stats["drafted"] < 4 * adaptive.stats["cycles"]
    with pytest.raises(LayerExitError, match=r"draft_vocab=.*ids in 0\.\.96"):
        generate_speculative(model, ids, 2, 3, NEW, draft_vocab=torch.tensor([5, 200]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fused_kv_projection_equals_per_layer(lms, arch):
    adapter = EarlyExitLM(lms[arch]).adapter
    hidden = torch.randn(1, 3, 32, dtype=torch.float64)
    positions = torch.arange(5, 8)
    kwargs = adapter.layer_kwargs(hidden, positions)
    fused = adapter.kv_projector()(1, hidden, kwargs)
    assert len(fused) == adapter.num_layers - 1
    for index, (key, value) in enumerate(fused, start=1):
        ref_key, ref_value = adapter.project_kv(index, hidden, kwargs)
        torch.testing.assert_close(key, ref_key)
        torch.testing.assert_close(value, ref_value)


def test_simulation_over_a_cache_of_candidate_exits_takes_the_first_that_exits():
    """A cache holding only some exits (as for a vocabulary-sized output): the one simulator asks the token
    rule at those layers only, and refuses a cache that lacks a layer where the rule may exit."""
    from layerexit.evaluation.simulate import simulate

    top = torch.tensor([[0.9, 0.2, 0.3], [0.95, 0.8, 0.1], [0.5, 0.5, 0.5]], dtype=torch.float64)  # (C=3, N=3)
    V = 10  # token 0 holds the top probability, the rest is spread evenly
    logits = torch.cat([top[..., None].log(), ((1 - top[..., None]) / (V - 1)).log().expand(-1, -1, V - 1)], -1)
    signals = {"position": torch.arange(1, 4).expand(3, -1)}
    for threshold, expected in ((0.75, [2, 4, 6]), (0.92, [4, 6, 6])):
        rule = make_token_rule("maxprob", threshold=threshold, exit_layers=[2, 4])
        sim = simulate(rule, logits, signals=signals, layers=[2, 4, 6])
        assert sim.exit_layer.tolist() == expected
        assert sim.predictions.tolist() == [0, 0, 0]
    with pytest.raises(LayerExitError, match=r"may exit after layers \[3\]"):
        simulate(make_token_rule("maxprob", exit_layers=[2, 3]), logits, signals=signals, layers=[2, 4, 6])
    with pytest.raises(LayerExitError, match=r"may exit after layers \[1, 3, 5\]"):
        simulate(MaxProb(0.75), logits, layers=[2, 4, 6])  # a rule asked at every layer needs every layer
    assert simulate(MaxProb(0.75), logits).exit_layer.tolist() == [1, 2, 3]  # the same cache read as layers 1..3


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_every_decoder_adapter_names_lora_targets_that_exist(arch):
    """LoRA targets are declared by the adapter; each names modules every layer of that family has."""
    model = EarlyExitLM(make_lm(arch))
    targets = model.adapter.lora_targets
    assert targets
    for layer in model.adapter.layers:
        names = {name.rsplit(".", 1)[-1] for name, _ in layer.named_modules()}
        assert set(targets) <= names, (arch, targets)
