"""`layerexit generate`, exit training, the ConsistentEE token policy and the evaluation, on a tiny Llama
saved with a word-level tokenizer (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from layerexit.cli.main import main
from layerexit.errors import LayerExitError
from layerexit.generation import EarlyExitLM, generate, make_token_rule
from layerexit.generation.corpus import load_passages, token_blocks
from layerexit.generation.evaluate import compare, rouge_l, token_match
from layerexit.generation.teacher_forced import simulate_tokens
from layerexit.generation.train import (ExitTrainConfig, PolicyTrainConfig, collect_features, policy_loss,
                                        train_exits, train_policy)
from tiny_decoder import decoder_config, make_lm

WORDS = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(60)]


def word_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", **kwargs)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    config = decoder_config("llama", layers=3)
    config.vocab_size = len(WORDS)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "lm")
    word_tokenizer().save_pretrained(root / "lm")
    corpus = root / "corpus.txt"
    import random

    rng = random.Random(0)
    corpus.write_text("\n\n".join(" ".join(f"w{(i * 7 + rng.randint(0, 3)) % 60}" for i in range(40))
                                  for _ in range(30)))
    (root / "prompts.txt").write_text("w1 w2 w3\n\nw4 w5 w6 w7\n")
    return root


def test_generate_cli_streams_each_strategy(workspace, capsys):
    lm = str(workspace / "lm")
    for extra in (["--strategy", "full"], ["--strategy", "speculative", "--draft-layers", "1"],
                  ["--strategy", "early-exit", "--rule", "saturation", "--threshold", "-1", "--kv", "recompute"]):
        assert main(["generate", "--model", lm, "--prompt", "w1 w2 w3", "--max-new-tokens", "5", *extra]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("w1 w2 w3")
        assert len(out.split()) == 3 + 5
        assert json.loads(err.strip().splitlines()[-1])["tokens"] == 5


def test_generate_cli_evaluate_writes_report(workspace, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code = main(["generate", "--model", str(workspace / "lm"), "--prompts-file", str(workspace / "prompts.txt"),
                 "--strategy", "speculative", "--draft-layers", "2", "--max-new-tokens", "6", "--evaluate",
                 "--output", str(out_dir)])
    assert code == 0
    payload = json.loads((out_dir / "results.json").read_text())
    (entry,) = payload["results"]
    assert payload["prompts"] == 2
    assert entry["token_match"] == 1.0 and entry["rouge_l"] == 1.0  # speculative output equals the full model's
    assert (out_dir / "speed_vs_agreement.png").is_file() and (out_dir / "report.md").is_file()


def test_generate_cli_speculative_draft_vocabulary_keeps_the_output(workspace, tmp_path):
    out_dir = tmp_path / "eval"
    code = main(["generate", "--model", str(workspace / "lm"), "--prompts-file", str(workspace / "prompts.txt"),
                 "--strategy", "speculative", "--draft-layers", "1", "--draft-vocab", "12", "--corpus",
                 str(workspace / "corpus.txt"), "--seq-len", "16", "--max-new-tokens", "6", "--evaluate",
                 "--output", str(out_dir)])
    assert code == 0
    (entry,) = json.loads((out_dir / "results.json").read_text())["results"]
    assert entry["draft_vocab"] == 12 and entry["token_match"] == 1.0


def test_generate_cli_trains_lora_and_decodes_merged(workspace, tmp_path, capsys):
    pytest.importorskip("peft")
    exits = tmp_path / "lora"
    code = main(["generate", "--model", str(workspace / "lm"), "--train-exits", str(exits), "--corpus",
                 str(workspace / "corpus.txt"), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--adapter-kind", "lowrank", "--adapter-rank", "0", "--lora-rank", "2", "--lora-lr", "1e-2"])
    assert code == 0 and json.loads((exits / "config.json").read_text())["training"]["lora_rank"] == 2
    args = ["generate", "--model", str(workspace / "lm"), "--exits", str(exits), "--prompt", "w1 w2",
            "--max-new-tokens", "4", "--no-stream"]
    assert main(args + ["--strategy", "full"]) == 0
    full = capsys.readouterr().out
    assert main(args + ["--strategy", "speculative", "--draft-layers", "1"]) == 0
    assert capsys.readouterr().out == full  # merged LoRA backbone: speculative still equals its greedy output


def test_generate_cli_trains_and_reloads_exits(workspace, tmp_path, capsys):
    exits = tmp_path / "exits"
    code = main(["generate", "--model", str(workspace / "lm"), "--train-exits", str(exits), "--corpus",
                 str(workspace / "corpus.txt"), "--steps", "3", "--seq-len", "16", "--batch-size", "2",
                 "--adapter-kind", "lowrank", "--adapter-rank", "4"])
    assert code == 0 and json.loads((exits / "config.json").read_text())["kind"] == "causal-lm"
    code = main(["generate", "--model", str(workspace / "lm"), "--exits", str(exits), "--prompt", "w1 w2",
                 "--max-new-tokens", "3", "--rule", "maxprob", "--threshold", "0.0", "--no-stream"])
    assert code == 0
    assert capsys.readouterr().out.startswith("w1 w2")


@pytest.mark.parametrize("argv, expected", [
    (["--prompt", "w1", "--prompts-file", "x.txt"], "give exactly one of --prompt"),
    (["--prompt", "w1", "--strategy", "speculative", "--draft-layers", "3", "--max-new-tokens", "5"], "draft_layers=3 is invalid"),
    (["--prompt", "w1", "--min-layer", "7", "--max-new-tokens", "5"], "min_layer=7 is invalid"),
    (["--prompt", " ".join(["w1"] * 60), "--max-new-tokens", "10"], "context is 64 positions"),
    (["--prompt", "w1", "--chat"], "--chat=True is invalid: this tokenizer has no chat template"),
    (["--prompt", "w1", "--evaluate"], "--output=None is invalid"),
    (["--prompt", "w1", "--draft-vocab", "8"], "--draft-vocab=8 is invalid: give a positive size, with --strategy speculative"),
])
def test_generate_cli_bad_input(workspace, capsys, argv, expected):
    assert main(["generate", "--model", str(workspace / "lm"), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("layerexit generate: error:")


def test_tokenizer_without_eos_is_refused():
    with pytest.raises(LayerExitError, match=r"tokenizer.eos_token=None is invalid.*end-of-sequence"):
        token_blocks(word_tokenizer(eos=False), ["w1 w2 w3"], 2)


def test_exit_training_distill_lowers_loss_and_round_trips(workspace, tmp_path):
    lm = make_lm("llama", scale=4.0).float()
    model = EarlyExitLM(lm, adapter_rank=8)
    assert 0 < model.exit_parameters() < 0.1 * model.backbone_parameters() or model.backbone_parameters() < 1e5
    blocks = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    result = train_exits(model, blocks, ExitTrainConfig(steps=25, lr=1e-2, batch_size=8))
    first, last = result["history"][0]["loss"], result["history"][-1]["loss"]
    assert last < first
    model.save_exits(tmp_path / "exits")
    again = EarlyExitLM.with_exits(make_lm("llama", scale=4.0).float(), tmp_path / "exits")
    h = torch.randn(5, 32)
    assert torch.equal(again.exit_logits(2, h), model.exit_logits(2, h))
    with pytest.raises(LayerExitError, match=r"exits=.*trained on llama with 4 layers"):
        EarlyExitLM.with_exits(make_lm("llama", layers=2).float(), tmp_path / "exits")
    with pytest.raises(LayerExitError, match=r"adapter_rank=0 is invalid.*nothing to train"):
        train_exits(EarlyExitLM(lm), blocks, ExitTrainConfig(steps=1))


def test_shared_head_adds_no_parameters():
    model = EarlyExitLM(make_lm("gpt2"))
    assert model.exit_parameters() == 0
    last = torch.randn(3, 32, dtype=torch.float64)
    assert torch.equal(model.exit_logits(4, last), model.lm.lm_head(model.lm.transformer.ln_f(last)))


def test_lora_training_changes_the_backbone(tmp_path):
    pytest.importorskip("peft")
    lm = make_lm("gpt2").float()
    model = EarlyExitLM(lm, adapter_rank=4)
    blocks = torch.randint(3, 97, (8, 10), generator=torch.Generator().manual_seed(1))
    train_exits(model, blocks, ExitTrainConfig(steps=3, objective="weighted", lora_rank=2, lora_lr=1e-2))
    assert any("lora_" in n for n, _ in model.lm.named_parameters())
    model.save_exits(tmp_path / "lora")
    again = EarlyExitLM.with_exits(make_lm("gpt2").float(), tmp_path / "lora")
    ids = torch.randint(3, 97, (1, 6))
    assert generate(again, ids, None, 4).tokens == generate(model, ids, None, 4).tokens


def test_lora_distillation_is_taught_by_the_original_model():
    pytest.importorskip("peft")
    from layerexit.generation.train import lora_disabled

    model = EarlyExitLM(make_lm("llama").float())
    blocks = torch.randint(3, 97, (8, 10), generator=torch.Generator().manual_seed(1))
    original = model.all_hidden(blocks[:2]).detach()
    history = train_exits(model, blocks, ExitTrainConfig(steps=3, lora_rank=2, lora_lr=5e-2, layers=[1, 2]))
    assert set(history["history"][0]["per_layer"]) == {1, 2, model.num_layers}  # the last exit is held in place
    assert not torch.allclose(model.all_hidden(blocks[:2]), original)  # LoRA moved the backbone
    with lora_disabled(model):
        torch.testing.assert_close(model.all_hidden(blocks[:2]), original)  # ... and the teacher is the original
    assert all(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_lora_keeps_outputs_and_refuses_a_later_save(kind, tmp_path):
    pytest.importorskip("peft")
    from layerexit.generation.train import add_lora

    model = EarlyExitLM(make_lm(kind).float())
    add_lora(model, 2)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking update (peft starts B at zero)
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    before = model.exit_logits(model.num_layers, model.all_hidden(ids))
    reference = generate(model, ids, None, 5).tokens
    assert model.merge_lora() > 0
    assert not any("lora_" in n for n, _ in model.lm.named_parameters())
    torch.testing.assert_close(model.exit_logits(model.num_layers, model.all_hidden(ids)), before, rtol=1e-4, atol=1e-4)
    assert generate(model, ids, None, 5).tokens == reference
    with pytest.raises(LayerExitError, match="merge_lora"):
        model.save_exits(tmp_path / "merged")


def test_policy_loss_first_copy_never_exits_and_costs_depth():
    probs = torch.full((3, 5), 0.9, requires_grad=True)
    ce = torch.zeros(3, 5)
    loss, stats = policy_loss(probs, ce, [1, 2, 4], 4, alpha=1.0, copies=3, epsilon=0.0)
    loss.backward()
    assert stats["avg_exit"] == 1.0  # greedy copies exit at the first candidate (π > 0.5)
    assert probs.grad[0].sum() < 0  # early exits earn more reward than copy 0: push π_1 up


def test_policy_training_learns_to_exit_and_drives_the_rule():
    lm = make_lm("llama", scale=4.0)
    model = EarlyExitLM(lm)
    blocks = torch.randint(3, 97, (6, 12), generator=torch.Generator().manual_seed(2))
    features = collect_features(model, blocks, layers=[1, 2, 3])
    assert features.layers == [1, 2, 3, 4] and features.ce.shape == (4, 6 * 11) and features.normed.shape[:2] == (4, 66)
    train_policy(model, features, PolicyTrainConfig(alpha=20.0, epochs=20, batch_size=32, lr=0.05))
    assert float(model.policy(0, features.normed[0]).mean()) > 0.5  # exits pay: the policy learned to exit early
    out = generate(model, torch.randint(3, 97, (1, 5)), make_token_rule("policy", exit_layers=[1, 2, 3]), 6)
    assert out.avg_layers < model.num_layers
    # the one simulator replays the trained policy over the teacher-forced blocks, as the decoder would run it
    rules = [make_token_rule("policy", exit_layers=[1, 2, 3]), make_token_rule("never")]
    (policy, never), full = simulate_tokens(model, blocks[:, :-1], rules, layers=[1, 2, 3])
    assert full.shape == (66,) and torch.equal(never.predictions, full) and never.exit_layer.eq(4).all()
    assert float(policy.exit_layer.double().mean()) < model.num_layers


def test_metrics():
    assert token_match([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert rouge_l([1, 2], [3, 4]) == 0.0


def test_compare_reports_every_strategy():
    model = EarlyExitLM(make_lm("llama", scale=8.0))
    payload = compare(model, word_tokenizer(), ["w1 w2 w3"],
                      [{"strategy": "speculative", "draft_layers": 2},
                       {"strategy": "early-exit", "rule": "static", "params": {"min_layer": 2}}], max_new_tokens=6)
    spec, static = payload["results"]
    assert spec["token_match"] == 1.0 and 0 <= spec["acceptance"] <= 1
    assert static["avg_layers"] == pytest.approx((4 + 5 * 2) / 6)
    assert static["exit_histogram"] == {"2": 5, "4": 1}


def test_corpus_split_is_fixed_and_disjoint(workspace):
    path = str(workspace / "corpus.txt")
    train, test = load_passages(path, "train"), load_passages(path, "test")
    assert len(train) + len(test) == 30 and not set(train) & set(test)
    assert load_passages(path, "test") == test
    with pytest.raises(LayerExitError, match=r"corpus='nope.txt' is invalid"):
        load_passages("nope.txt")


def test_linear_shortcuts_fit_the_last_layer_better_than_identity(workspace, tmp_path, capsys):
    from layerexit.generation.train import fit_shortcuts

    lm = make_lm("llama")
    model = EarlyExitLM(lm, adapter_kind="linear")
    blocks = torch.randint(3, 97, (12, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model.all_hidden(blocks)  # (L, B, T, H)
        before = (model.exit_adapters[1](hidden[1]) - hidden[-1]).pow(2).mean()
        fit_shortcuts(model, blocks, layers=[2])
        after = (model.exit_adapters[1](hidden[1]) - hidden[-1]).pow(2).mean()
    assert after < 0.5 * before
    assert torch.equal(model.exit_adapters[0].linear.weight, torch.eye(32, dtype=torch.float64))  # untouched
    model.save_exits(tmp_path / "lin")
    again = EarlyExitLM.with_exits(make_lm("llama"), tmp_path / "lin")
    assert torch.equal(again.exit_logits(2, hidden[1, 0]), model.exit_logits(2, hidden[1, 0]))
    with pytest.raises(LayerExitError, match=r"adapter_kind='lowrank' is invalid.*adapter_kind='linear'"):
        fit_shortcuts(EarlyExitLM(lm, adapter_rank=2), blocks)
    code = main(["generate", "--model", str(workspace / "lm"), "--train-exits", str(tmp_path / "cli"), "--corpus",
                 str(workspace / "corpus.txt"), "--steps", "2", "--seq-len", "16", "--batch-size", "2"])
    assert code == 0 and "fitted" in capsys.readouterr().err


# --- one checkpoint format for both kinds -------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def test_decoder_exits_are_saved_in_the_classifier_format_with_their_kind(tmp_path):
    """config.json (model_type "layerexit", kind "causal-lm", heads_only) + model.safetensors, read by AutoConfig;
    each kind's loader refuses the other's checkpoint and names the right one."""
    from transformers import AutoConfig

    from layerexit import MultiExitModel
    from layerexit.config import WEIGHTS_NAME, CausalLMExitConfig, LayerExitConfig, MultiExitConfig

    model = EarlyExitLM(make_lm("llama"), adapter_rank=4, policy=True)
    model.save_exits(tmp_path / "exits")
    assert sorted(p.name for p in (tmp_path / "exits").iterdir()) == ["config.json", WEIGHTS_NAME]
    hf = AutoConfig.from_pretrained(tmp_path / "exits")
    assert isinstance(hf, LayerExitConfig) and hf.kind == "causal-lm" and hf.heads_only and hf.adapter_rank == 4
    assert CausalLMExitConfig.from_hf_dict(hf.to_dict()) == model.config
    with pytest.raises(LayerExitError, match=r"exits of a causal-lm.*EarlyExitLM.with_exits"):
        MultiExitModel.from_pretrained(tmp_path / "exits")
    with pytest.raises(LayerExitError, match=r"exits of a causal-lm.*EarlyExitLM.with_exits"):
        MultiExitConfig.load(tmp_path / "exits")
    classifier = tmp_path / "classifier"
    (classifier).mkdir()
    (classifier / "config.json").write_text(json.dumps({"model_type": "layerexit", "backbone": "b",
                                                        "backbone_type": "bert", "num_layers": 4}))
    with pytest.raises(LayerExitError, match=r"exits of a classifier.*MultiExitModel.from_pretrained"):
        EarlyExitLM.with_exits(make_lm("llama"), classifier)


def test_decoder_exits_saved_in_the_earlier_format_still_load():
    """A folder written by save_exits before the one format (exit_config.json + exits.safetensors)."""
    expected = json.loads((FIXTURES / "legacy_decoder_exits_expected.json").read_text())
    model = EarlyExitLM.with_exits(make_lm("llama"), FIXTURES / "legacy_decoder_exits")
    assert (model.config.backbone, model.config.adapter_rank, model.config.policy) == ("tiny-llama", 4, True)
    assert model.config.training["exits"]["objective"] == "distill"
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        hidden = model.all_hidden(ids)[expected["layer"] - 1]
        logits = model.exit_logits(expected["layer"], hidden)[0, :, :5]
        prob = model.exit_prob(expected["layer"], hidden)[0]
    torch.testing.assert_close(logits, torch.tensor(expected["logits_first5"], dtype=logits.dtype))
    torch.testing.assert_close(prob, torch.tensor(expected["policy"], dtype=prob.dtype))
    assert not torch.allclose(logits, EarlyExitLM(make_lm("llama")).exit_logits(2, hidden)[0, :, :5])  # not identity


def test_policy_features_are_each_exits_cross_entropy_and_normed_state():
    """collect_features (on the teacher-forced cache, in batches) equals a direct computation per exit."""
    model = EarlyExitLM(make_lm("llama", scale=4.0), adapter_rank=4)
    blocks = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.all_hidden(blocks[:, :-1])  # (L, 3, 8, H)
        full = model.exit_logits(4, hidden[-1]).argmax(-1).flatten()
        for target, goal in (("full", full), ("data", blocks[:, 1:].flatten())):
            features = collect_features(model, blocks, layers=[2], target=target, batch_size=2)
            assert features.layers == [2, 4] and features.info == {"target": target, "tokens": 24}
            for c, layer in enumerate(features.layers):
                logits = model.exit_logits(layer, hidden[layer - 1]).flatten(0, 1).float()
                ce = torch.nn.functional.cross_entropy(logits, goal, reduction="none")
                torch.testing.assert_close(features.ce[c], ce)
                torch.testing.assert_close(features.normed[c], model.adapter.final_norm(hidden[layer - 1]).flatten(0, 1))
