"""Tiny random encoders of every supported architecture, built offline from configs, and their inputs.

Nothing here downloads anything: backbones come from ``AutoModel.from_config`` (hidden 32, 4 layers, vocab
100). Test modules import these helpers (``from tiny import ...``); shared fixtures live in conftest.py.
"""

from __future__ import annotations

import torch
from transformers import AlbertConfig, AutoModel, BertConfig, DistilBertConfig, MPNetConfig, RobertaConfig

from layerexit.model import MultiExitModel

VOCAB = 100
HIDDEN = 32
LAYERS = 4
NUM_LABELS = 3
ARCHS = ("bert", "roberta", "albert", "distilbert", "mpnet")
#: (architecture, exit feature) pairs that are valid (DistilBERT has no pooler)
CASES = [(arch, feature) for arch in ARCHS for feature in ("pooler", "cls", "mean")
         if not (arch == "distilbert" and feature == "pooler")]
CASE_IDS = [f"{a}-{f}" for a, f in CASES]
#: architectures whose embeddings take token type ids
TOKEN_TYPES = {"bert", "albert"}


def hf_config(arch: str, layers: int = LAYERS, hidden: int = HIDDEN, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, max_position_embeddings=64, initializer_range=0.1)
    if arch == "bert":
        return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=37, type_vocab_size=2, **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=37, type_vocab_size=1, pad_token_id=1, **common)
    if arch == "albert":
        return AlbertConfig(embedding_size=16, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=37, type_vocab_size=2, pad_token_id=0, **common)
    if arch == "distilbert":
        return DistilBertConfig(dim=hidden, n_layers=layers, n_heads=4, hidden_dim=37, pad_token_id=0, **common)
    if arch == "mpnet":
        return MPNetConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=37, pad_token_id=1, **common)
    raise KeyError(arch)


def make_backbone(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny random backbone in eval mode (float32)."""
    torch.manual_seed(seed)
    return AutoModel.from_config(hf_config(arch, **kwargs)).eval()


def make_model(arch: str, feature: str, seed: int = 0, double: bool = True, head_scale: float = 4.0,
               num_labels: int = NUM_LABELS, **kwargs) -> MultiExitModel:
    """A multi-exit model on a tiny random backbone, in eval mode.

    ``head_scale`` multiplies the random exit classifiers' weights so that their confidences spread over
    (1/C, 1) instead of clustering near uniform; confidence rules then exit rows at different layers.
    """
    backbone = make_backbone(arch, seed=seed, **kwargs)
    torch.manual_seed(seed + 1)
    model = MultiExitModel.from_module(backbone, num_labels, exit_feature=feature)
    model.add_policies(8)  # ConsistentEE policies, so the policy rule runs on every architecture too
    with torch.no_grad():
        for head in model.exits:
            head.linear.weight.mul_(head_scale)
            head.linear.bias.normal_(0.0, 0.5)
        for policy in model.policies:  # spread exit probabilities over (0, 1)
            policy.net[-1].weight.mul_(head_scale * 4)
    if double:
        model.double()
    return model.eval()


def make_batch(arch: str, batch: int = 6, max_len: int = 9, seed: int = 0, min_len: int = 2) -> dict:
    """Random token ids with ragged right padding: row lengths vary from ``min_len`` to ``max_len``.

    Real tokens avoid the pad id (RoBERTa and MPNet derive positions from it); padding uses it.
    Returns ``input_ids``, ``attention_mask`` and ``token_type_ids`` (None where the architecture has none).
    """
    cfg = hf_config(arch)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, max_len), generator=gen)  # (B, T)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len  # at least one full row, so the longest row defines T
    if batch > 1:
        lengths[1] = min_len  # and at least one padded row
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()  # (B, T)
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id)
    token_types = None
    if arch in TOKEN_TYPES:  # a second segment in the back half of each row
        token_types = ((torch.arange(max_len)[None, :] >= (lengths[:, None] // 2)) & (mask == 1)).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}


def row(batch: dict, i: int) -> dict:
    """Row ``i`` of a batch alone, without its padding (batch size 1)."""
    n = int(batch["attention_mask"][i].sum())
    return {k: (v[i : i + 1, :n] if v is not None else None) for k, v in batch.items()}
