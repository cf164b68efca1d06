"""Hugging Face-native checkpoints: config.json with model_type "layerexit", Auto classes, hub ids through a local
hub cache, push_to_hub against a fake HfApi, dtype/device, file modes, and checkpoints of the earlier format."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertTokenizerFast

import layerexit
from layerexit.config import CONFIG_NAME, WEIGHTS_NAME, LayerExitConfig
from layerexit.errors import LayerExitError
from layerexit.model import MultiExitModel
from layerexit.rules import make_rule
from tiny import make_backbone, make_batch, make_model
from tiny_text import write_backbone

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy_checkpoint"
#: written by save_pretrained before it stopped writing layerexit_config.json beside config.json (with a tokenizer)
TWO_CONFIGS = FIXTURES / "two_config_checkpoint"


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _logits(model, arch="bert"):
    batch = make_batch(arch)
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def fake_hub_cache(root: Path, repo_id: str, checkpoint: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay ``checkpoint`` out as huggingface_hub's cache holds a downloaded model repo (refs/main -> snapshot)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    return root


@pytest.fixture
def saved(tmp_path):
    model = make_model("bert", "mean", double=False)
    model.save_pretrained(tmp_path / "ckpt", exit_rule=make_rule("maxprob", threshold=0.8))
    return model, tmp_path / "ckpt"


def test_config_json_is_a_registered_hugging_face_config(saved):
    model, ckpt = saved
    data = json.loads((ckpt / "config.json").read_text())
    assert data["model_type"] == "layerexit" and data["architectures"] == ["MultiExitModel"]
    assert data["backbone_config"]["model_type"] == "bert" and data["num_layers"] == 4
    assert data["exit_rule"] == {"name": "maxprob", "params": {"threshold": 0.8}}
    config = AutoConfig.from_pretrained(ckpt)
    assert isinstance(config, LayerExitConfig)
    assert config.num_labels == 3 and config.id2label == {0: "0", 1: "1", 2: "2"}
    assert config.to_multi_exit_config() == model.config


def test_auto_model_loads_a_layerexit_checkpoint(saved):
    model, ckpt = saved
    loaded = AutoModel.from_pretrained(ckpt)
    assert type(loaded) is MultiExitModel and not loaded.training
    _same_weights(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model.eval()))


def test_auto_model_from_config_builds_a_fresh_model(saved):
    _, ckpt = saved
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(ckpt))
    assert type(fresh) is MultiExitModel and fresh.config.num_layers == 4 and len(fresh.exits) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_saves_reload_as_saved(tmp_path, dtype):
    model = make_model("bert", "cls", double=False).to(dtype)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    loaded = MultiExitModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == dtype and {p.dtype for p in loaded.parameters()} == {dtype}
    _same_weights(model, loaded)


def test_dtype_and_device_arguments(saved):
    model, ckpt = saved
    loaded = MultiExitModel.from_pretrained(ckpt, dtype="bfloat16", device="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.device == torch.device("cpu")
    assert AutoModel.from_pretrained(ckpt, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(LayerExitError, match=r"^dtype='int8' is invalid: give a floating-point dtype"):
        MultiExitModel.from_pretrained(ckpt, dtype="int8")
    with pytest.raises(LayerExitError, match=r"from_pretrained keyword arguments.*device_map.*takes backbone="):
        MultiExitModel.from_pretrained(ckpt, device_map="auto")


def test_checkpoint_files_have_normal_modes(tmp_path):
    old = os.umask(0o022)
    try:
        make_model("bert", "cls", double=False).save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert modes == {"config.json": 0o644, WEIGHTS_NAME: 0o644}  # one configuration file: config.json


def test_heads_only_checkpoint_records_it_and_loads_onto_its_backbone(tmp_path):
    write_backbone(tmp_path / "encoder", layers=2)
    model = MultiExitModel.from_backbone(str(tmp_path / "encoder"), num_labels=2, exit_feature="cls").eval()
    model.save_pretrained(tmp_path / "heads", heads_only=True)
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["heads_only"] is True
    assert not any(k.startswith("backbone.") for k in load_file(str(tmp_path / "heads" / WEIGHTS_NAME)))
    _same_weights(model, AutoModel.from_pretrained(tmp_path / "heads"))


# --- checkpoints written by layerexit 0.1 (layerexit_config.json + backbone/config.json) ------------------------

def test_checkpoint_of_the_earlier_format_still_loads():
    """The fixture was written by the previous save_pretrained; its outputs were recorded then."""
    assert not (LEGACY / "config.json").exists() and (LEGACY / "backbone" / "config.json").is_file()
    expected = json.loads((FIXTURES / "legacy_checkpoint_expected.json").read_text())
    loaded = MultiExitModel.from_pretrained(LEGACY)
    assert loaded.config.num_layers == 2 and loaded.config.policy_hidden == 8 and loaded.dtype == torch.float32
    inputs = [torch.tensor(expected[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    with torch.no_grad():
        assert torch.allclose(loaded(*inputs), torch.tensor(expected["logits"]), atol=1e-6)


def test_resaving_an_earlier_checkpoint_writes_the_current_format(tmp_path):
    loaded = MultiExitModel.from_pretrained(LEGACY)
    loaded.save_pretrained(tmp_path / "new")
    assert AutoConfig.from_pretrained(tmp_path / "new").model_type == "layerexit"
    _same_weights(loaded, AutoModel.from_pretrained(tmp_path / "new"))


def _expected(name: str):
    expected = json.loads((FIXTURES / f"{name}_expected.json").read_text())
    return [torch.tensor(expected[k]) for k in ("input_ids", "attention_mask", "token_type_ids")], \
        torch.tensor(expected["logits"])


def _check_outputs(model, name: str) -> None:
    inputs, logits = _expected(name)
    with torch.no_grad():
        assert torch.allclose(model(*inputs), logits, atol=1e-6)


def test_earlier_format_loads_through_the_auto_classes_after_import_layerexit():
    """No config.json at all: AutoConfig reads layerexit_config.json + backbone/config.json instead."""
    config = AutoConfig.from_pretrained(LEGACY)
    assert isinstance(config, LayerExitConfig) and config.num_layers == 2 and config.backbone_config
    model = AutoModel.from_pretrained(LEGACY)
    assert type(model) is MultiExitModel and not model.training
    _check_outputs(model, "legacy_checkpoint")
    assert AutoModel.from_pretrained(LEGACY, dtype=torch.float64).dtype == torch.float64
    classifier = AutoModelForSequenceClassification.from_pretrained(LEGACY)
    assert type(classifier).__name__ == "LayerExitForSequenceClassification"


def test_auto_config_is_unchanged_for_folders_that_are_not_earlier_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers' own error, as without layerexit
        AutoConfig.from_pretrained(tmp_path / "empty")
    encoder = write_backbone(tmp_path / "encoder", layers=2)
    assert AutoConfig.from_pretrained(encoder).model_type == "bert"


def test_checkpoint_with_both_configuration_files_still_loads():
    """The fixture was written by save_pretrained when it still wrote layerexit_config.json beside config.json."""
    from layerexit.preflight import checkpoint_config, checkpoint_files

    assert (TWO_CONFIGS / CONFIG_NAME).is_file() and (TWO_CONFIGS / "config.json").is_file()
    assert checkpoint_files(TWO_CONFIGS) == "config.json" and checkpoint_config("--model", TWO_CONFIGS)
    _check_outputs(MultiExitModel.from_pretrained(TWO_CONFIGS), "two_config_checkpoint")
    _check_outputs(AutoModel.from_pretrained(TWO_CONFIGS), "two_config_checkpoint")
    import transformers

    classify = transformers.pipeline("text-classification", model=str(TWO_CONFIGS))
    assert classify("good great film")[0]["label"] in {"negative", "positive"}


@pytest.mark.parametrize("name", ["legacy_checkpoint", "two_config_checkpoint"])
def test_upgrade_checkpoint_writes_the_current_layout(tmp_path, name):
    source = shutil.copytree(FIXTURES / name, tmp_path / name)
    (source / "training_config.json").write_text('{"seed": 1}')  # any other file travels unchanged
    before = MultiExitModel.from_pretrained(source)
    upgraded = layerexit.upgrade_checkpoint(source, tmp_path / "new")
    names = {p.name for p in upgraded.iterdir()}
    assert "config.json" in names and CONFIG_NAME not in names and "backbone" not in names
    assert "training_config.json" in names
    assert (source / CONFIG_NAME).is_file()  # the source is left as it was
    assert json.loads((upgraded / "config.json").read_text())["model_type"] == "layerexit"
    _same_weights(before, MultiExitModel.from_pretrained(upgraded))
    _check_outputs(AutoModel.from_pretrained(upgraded), name)
    in_place = layerexit.upgrade_checkpoint(source)  # default: the folder itself, atomically
    assert in_place == source and not (source / CONFIG_NAME).exists()
    assert sorted(p.name for p in source.iterdir()) == sorted(names)
    _same_weights(before, MultiExitModel.from_pretrained(source))


def test_a_checkpoint_without_its_backbone_does_not_load_another(tmp_path):
    """Earlier format, backbone/ folder gone, config.backbone pointing at a real (different) encoder folder:
    refused, naming backbone=, instead of silently running the other encoder."""
    planted = write_backbone(tmp_path / "other", layers=2)
    ckpt = shutil.copytree(LEGACY, tmp_path / "ckpt")
    shutil.rmtree(ckpt / "backbone")
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    config["backbone"] = str(planted)
    (ckpt / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(LayerExitError, match=r"^backbone=None is invalid: .*missing here.*will not load the "
                                             r"backbone its config names.*pass backbone= explicitly"):
        MultiExitModel.from_pretrained(ckpt)


def test_current_format_without_backbone_weights_is_refused(saved, tmp_path):
    _, ckpt = saved
    tensors = {k: v for k, v in load_file(str(ckpt / WEIGHTS_NAME)).items() if not k.startswith("backbone.")}
    save_file(tensors, str(ckpt / WEIGHTS_NAME), metadata={"format": "pt", "heads_only": "False"})
    with pytest.raises(LayerExitError, match=r"^backbone=None is invalid"):
        MultiExitModel.from_pretrained(ckpt)


def test_explicit_backbone_still_loads_exits_onto_it(saved):
    model, ckpt = saved
    loaded = MultiExitModel.from_pretrained(ckpt, backbone=model.backbone)
    assert loaded.backbone is model.backbone


@pytest.mark.parametrize("damage", ["truncated_weights", "bad_json"])
def test_damaged_checkpoint_files_give_one_clear_error(saved, damage):
    _, ckpt = saved
    if damage == "truncated_weights":
        data = (ckpt / WEIGHTS_NAME).read_bytes()
        (ckpt / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
        pattern = r"model.safetensors is unreadable.*truncated"
    else:
        (ckpt / "config.json").write_text("{not json")
        pattern = r"config.json is not valid JSON"
    with pytest.raises(LayerExitError, match=pattern):
        MultiExitModel.from_pretrained(ckpt)


# --- hub ids ------------------------------------------------------------------------------------------------

def test_hub_id_resolves_through_the_local_hub_cache(saved, tmp_path):
    model, ckpt = saved
    cache = fake_hub_cache(tmp_path / "hub", "someone/tiny-layerexit", ckpt)
    loaded = MultiExitModel.from_pretrained("someone/tiny-layerexit", cache_dir=cache)
    _same_weights(model, loaded)
    auto = AutoModel.from_pretrained("someone/tiny-layerexit", cache_dir=cache)
    assert type(auto) is MultiExitModel
    with pytest.raises(LayerExitError, match=r"^pretrained_model_name_or_path='someone/absent' is invalid: it is "
                                             r"not a local folder.*download it once"):
        MultiExitModel.from_pretrained("someone/absent", cache_dir=cache)


def test_not_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(LayerExitError, match=r"pretrained_model_name_or_path=.*give a checkpoint folder"):
        MultiExitModel.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_import_layerexit_registers_auto_classes_and_honours_hf_hub_cache(saved, tmp_path):
    """A fresh interpreter: `import layerexit` (which imports neither transformers nor the model), then
    transformers' Auto classes, with the hub id resolved from HF_HUB_CACHE offline (no cache_dir argument)."""
    _, ckpt = saved
    cache = fake_hub_cache(tmp_path / "hub", "someone/tiny-layerexit", ckpt)
    code = ("import sys, layerexit\n"
            "assert 'transformers' not in sys.modules and 'layerexit.model' not in sys.modules  # import stays light\n"
            "import transformers\n"
            "c = transformers.AutoConfig.from_pretrained('someone/tiny-layerexit')\n"
            "m = transformers.AutoModel.from_pretrained('someone/tiny-layerexit')\n"
            "s = transformers.AutoModelForSequenceClassification.from_pretrained('someone/tiny-layerexit')\n"
            "print(type(m).__name__, type(c).__name__, type(s).__name__, m.config.num_layers)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MultiExitModel", "LayerExitConfig", "LayerExitForSequenceClassification", "4"]


# --- push_to_hub ----------------------------------------------------------------------------------------------

class FakeHfApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi; never touches the network."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")
                 if p.is_file()}
        FakeHfApi.calls.append(("upload_folder", repo_id, kwargs, files))
        return "commit-info"


def test_push_to_hub_uploads_the_checkpoint_with_a_model_card(tmp_path, monkeypatch):
    import layerexit.hub

    FakeHfApi.calls = []
    monkeypatch.setattr(layerexit.hub, "HfApi", FakeHfApi)
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    tokenizer = BertTokenizerFast.from_pretrained(str(tmp_path / "vocab"))
    model = make_model("bert", "mean", double=False)
    result = model.push_to_hub("someone/tiny-layerexit", tokenizer, exit_rule=make_rule("patience", patience=2),
                               figures={"accuracy": 0.9123, "speed-up measured (batch 1)": 1.8}, private=True,
                               token="hf_fake")
    assert result == "commit-info"
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs, files) = FakeHfApi.calls
    assert (create, repo, repo2) == ("create_repo", "someone/tiny-layerexit", "someone/tiny-layerexit")
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert {"config.json", WEIGHTS_NAME, "README.md", "tokenizer_config.json"} <= set(files)
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: layerexit" in card and "pipeline_tag: text-classification" in card
    assert "| layers (exits) | 4 |" in card and "`mean`" in card
    assert "Default rule: `patience` (patience=2)" in card
    assert "| accuracy | 0.9123 |" in card and "| speed-up measured (batch 1) | 1.8 |" in card
    assert json.loads(files["config.json"])["exit_rule"] == {"name": "patience", "params": {"patience": 2}}


def test_model_card_without_figures_claims_none(saved):
    from layerexit.hub import model_card

    model, _ = saved
    card = model_card(model, "someone/x")
    assert "Measured figures" not in card and "No default rule is stored" in card


def test_push_to_hub_refuses_a_bad_repo_id(saved, monkeypatch):
    import layerexit.hub

    monkeypatch.setattr(layerexit.hub, "HfApi", FakeHfApi)
    with pytest.raises(LayerExitError, match=r"^repo_id='not a repo' is invalid"):
        saved[0].push_to_hub("not a repo")


def test_package_exports():
    assert layerexit.MultiExitModel is MultiExitModel
