"""save_pretrained / from_pretrained round-trip exactly; heads-only checkpoints refuse the wrong backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerexit.config import CONFIG_NAME, WEIGHTS_NAME
from layerexit.errors import LayerExitError
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from tiny import ARCHS, make_backbone, make_batch, make_model


def _inputs(arch: str) -> tuple:
    batch = make_batch(arch)
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def _assert_same_weights(a: MultiExitModel, b: MultiExitModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_full_round_trip_is_exact(tmp_path, arch):
    model = make_model(arch, None, double=False)
    model.train()  # the loaded model must come back in eval mode regardless
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file() and not (tmp_path / "ckpt" / CONFIG_NAME).exists()
    assert not (tmp_path / "ckpt" / "backbone").exists()  # the backbone's config is embedded in config.json
    loaded = MultiExitModel.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    _assert_same_weights(model, loaded)
    model.eval()
    inputs = _inputs(arch)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))
    rule = make_rule("patience", patience=1)
    a, b = model.early_exit(*inputs, rule=rule), loaded.early_exit(*inputs, rule=rule)
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_only_round_trip_onto_the_same_backbone(tmp_path, arch):
    model = make_model(arch, "mean", double=False)
    model.save_pretrained(tmp_path / "heads", heads_only=True)
    saved = load_file(str(tmp_path / "heads" / WEIGHTS_NAME))
    assert saved and all(k.startswith(("exits.", "policies.")) for k in saved)
    assert any(k.startswith("policies.") for k in saved)  # ConsistentEE policies travel with the exits
    assert not (tmp_path / "heads" / "backbone").exists()
    loaded = MultiExitModel.from_pretrained(tmp_path / "heads", backbone=model.backbone)
    assert loaded.backbone is model.backbone
    assert loaded.config == model.config
    _assert_same_weights(model, loaded)
    inputs = _inputs(arch)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))


def test_heads_only_onto_an_equal_backbone_built_again(tmp_path):
    """Same architecture and seed, but another module object: the fingerprint matches, weights load."""
    model = make_model("roberta", "cls", double=False)
    model.save_pretrained(tmp_path / "heads", heads_only=True)
    loaded = MultiExitModel.from_pretrained(tmp_path / "heads", backbone=make_backbone("roberta"))
    _assert_same_weights(model, loaded)


@pytest.mark.parametrize(
    "other",
    [dict(arch="bert", hidden=48), dict(arch="bert", layers=2), dict(arch="bert", vocab=120), dict(arch="roberta")],
    ids=["hidden", "layers", "vocab", "model_type"],
)
def test_heads_only_refuses_a_different_backbone(tmp_path, other):
    model = make_model("bert", "cls", double=False)
    model.save_pretrained(tmp_path / "heads", heads_only=True)
    other = dict(other)
    backbone = make_backbone(other.pop("arch"), **other)
    with pytest.raises(LayerExitError, match=r"^backbone=.*is invalid.*trained on"):
        MultiExitModel.from_pretrained(tmp_path / "heads", backbone=backbone)


def test_heads_only_loads_the_recorded_local_backbone(tmp_path):
    """A model built from a local folder records it; a heads-only checkpoint reloads it from there."""
    make_backbone("bert").save_pretrained(tmp_path / "encoder")
    model = MultiExitModel.from_backbone(str(tmp_path / "encoder"), num_labels=2, exit_feature="cls")
    assert model.config.backbone == str(tmp_path / "encoder")
    model.eval().save_pretrained(tmp_path / "heads", heads_only=True)
    loaded = MultiExitModel.from_pretrained(tmp_path / "heads")
    _assert_same_weights(model, loaded)


def test_folder_without_config_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerExitError, match=rf"checkpoint=.*config.json.*nor {CONFIG_NAME}"):
        MultiExitModel.from_pretrained(tmp_path / "empty")


def test_checkpoint_with_missing_weights_raises(tmp_path):
    model = make_model("bert", "cls", double=False)
    model.save_pretrained(tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    del tensors["exits.1.linear.weight"]
    save_file(tensors, str(tmp_path / "ckpt" / WEIGHTS_NAME))
    with pytest.raises(LayerExitError, match=r"missing weights.*exits\.1\.linear\.weight"):
        MultiExitModel.from_pretrained(tmp_path / "ckpt")


def test_save_overwrites_atomically_and_keeps_a_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(tmp_path / "vocab"))
    first = make_model("bert", "cls", seed=0, double=False)
    second = make_model("bert", "cls", seed=5, double=False)
    first.save_pretrained(tmp_path / "ckpt")
    second.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "vocab"]  # no temporary folders left
    _assert_same_weights(second, MultiExitModel.from_pretrained(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "tokenizer_config.json").is_file()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["num_layers"] == 4 and config["exit_feature"] == "cls" and config["backbone_fingerprint"]
