"""Backbone adapters: structure per architecture, and loud errors for what layerexit cannot wrap."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AlbertConfig, AutoModel, BertConfig, BertModel, GPT2Config, GPT2Model, T5Config, T5EncoderModel

from layerexit.backbones import ADAPTERS, adapter_for
from layerexit.errors import LayerExitError
from layerexit.model import MultiExitModel
from tiny import ARCHS, HIDDEN, LAYERS, hf_config, make_backbone, make_batch

SUPPORTED = r"albert, bert, distilbert, mpnet, roberta"


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_structure(arch):
    backbone = make_backbone(arch)
    adapter = adapter_for(backbone)
    assert arch in adapter.model_types
    assert adapter.num_layers == LAYERS and adapter.hidden_size == HIDDEN
    assert adapter.has_pooler() == (arch != "distilbert")
    model = MultiExitModel.from_module(backbone, 2)
    assert model.config.exit_feature == ("cls" if arch == "distilbert" else "pooler")
    assert len(model.exits) == LAYERS and model.config.model_type == arch


def test_registry_lists_every_architecture():
    assert set(ARCHS) <= set(ADAPTERS.names())
    assert all(desc for _, desc in ADAPTERS.describe())


@pytest.mark.parametrize(
    "backbone",
    [
        lambda: GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
        lambda: T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
    ],
    ids=["gpt2", "t5"],
)
def test_unsupported_architecture_names_model_type_and_lists_supported(backbone):
    module = backbone()
    with pytest.raises(LayerExitError, match=rf"model_type\)='{module.config.model_type}' is invalid.*{SUPPORTED}"):
        MultiExitModel.from_module(module, 2)


def test_unsupported_local_folder_fails_before_loading_weights(tmp_path):
    GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path)  # config only, no weights
    with pytest.raises(LayerExitError, match=rf"'gpt2' is invalid.*{SUPPORTED}"):
        MultiExitModel.from_backbone(str(tmp_path), num_labels=2)


def test_from_backbone_missing_folder_names_backbone(tmp_path):
    with pytest.raises(LayerExitError, match=r"^backbone=.*is invalid"):
        MultiExitModel.from_backbone(str(tmp_path / "nowhere"), num_labels=2)


def test_from_backbone_needs_two_labels(tmp_path):
    with pytest.raises(LayerExitError, match=r"num_labels=1"):
        MultiExitModel.from_backbone(str(tmp_path), num_labels=1)


def test_pooler_on_distilbert_raises():
    with pytest.raises(LayerExitError, match=r"exit_feature='pooler' is invalid.*distilbert.*'cls' or 'mean'"):
        MultiExitModel.from_module(make_backbone("distilbert"), 2, exit_feature="pooler")


def test_bert_without_pooler_defaults_to_cls_but_refuses_explicit_pooler():
    torch.manual_seed(0)
    backbone = BertModel(hf_config("bert"), add_pooling_layer=False)
    assert MultiExitModel.from_module(backbone, 2).config.exit_feature == "cls"
    with pytest.raises(LayerExitError, match=r"exit_feature='pooler'"):
        MultiExitModel.from_module(backbone, 2, exit_feature="pooler")


def test_unknown_exit_feature_raises():
    with pytest.raises(LayerExitError, match=r"exit_feature='max' is invalid.*pooler, cls, mean"):
        MultiExitModel.from_module(make_backbone("bert"), 2, exit_feature="max")


def test_declared_sentence_transformers_pooling_is_used(tmp_path):
    make_backbone("bert").save_pretrained(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert MultiExitModel.from_backbone(str(tmp_path), 2).config.exit_feature == "mean"
    assert MultiExitModel.from_backbone(str(tmp_path), 2, exit_feature="cls").config.exit_feature == "cls"


def test_albert_with_several_groups_equals_backbone():
    """ALBERT maps layer i to group int(i / (layers / groups)); the engine must use the same mapping."""
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_hidden_groups=2,
                          inner_group_num=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                          initializer_range=0.1)
    backbone = AutoModel.from_config(config).double().eval()
    model = MultiExitModel.from_module(backbone, 2).double().eval()
    adapter = model.adapter
    assert adapter.layer_module(0) is adapter.layer_module(1)
    assert adapter.layer_module(1) is not adapter.layer_module(2)
    batch = make_batch("albert")
    with torch.no_grad():
        hidden = model.run_layers(model.start(**batch), 0, 4).hidden
        reference = backbone(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], reference[real], rtol=0, atol=1e-12)


def test_wrapping_does_not_modify_the_backbone():
    backbone = make_backbone("bert")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = MultiExitModel.from_module(backbone, 3)
    assert model.backbone is backbone
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(backbone, BertModel) and isinstance(backbone.config, BertConfig)
