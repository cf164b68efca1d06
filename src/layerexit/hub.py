"""Publishing a layerexit checkpoint on the Hugging Face Hub: a generated model card and ``push_to_hub``.

Loading by hub id lives in :func:`layerexit.model.resolve_checkpoint` (huggingface_hub's cache, offline mode
respected); this module only writes. Uploads go through ``huggingface_hub.HfApi`` (``create_repo`` then
``upload_folder``), so authentication, endpoints and retries are huggingface_hub's.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData

from .config import rule_spec
from .errors import bad_value

CARD_NAME = "README.md"


def model_card(model, repo_id: str | None = None, exit_rule: dict | None = None, figures: dict | None = None) -> str:
    """The model card (README.md with YAML metadata) of ``model``: its exits, default rule and measured figures.

    ``figures``: a flat ``{name: number or text}`` mapping of results you measured (e.g. ``{"accuracy": 0.91,
    "speed-up measured (batch 1)": 1.8}``); nothing is invented when it is omitted.
    """
    config = model.config
    base_model = config.backbone if _looks_like_hub_id(config.backbone) else None
    metadata = ModelCardData(library_name="layerexit", pipeline_tag="text-classification", base_model=base_model,
                             tags=["layerexit", "early-exit", config.model_type])
    title = repo_id or "layerexit checkpoint"
    labels = ", ".join(f"`{name}`" for name in config.label_names)
    lines = [
        "---", metadata.to_yaml(), "---", "", f"# {title}", "",
        f"An early-exit classifier made with [layerexit](https://pypi.org/project/layerexit/): a {config.model_type} "
        f"encoder (`{config.backbone}`) with an exit classifier after each of its {config.num_layers} layers. "
        "Each input stops at the first layer whose exit is confident enough, and the layers after it are skipped.",
        "", "## Exits", "",
        "| | |", "|---|---|",
        f"| layers (exits) | {config.num_layers} |",
        f"| exit feature | `{config.exit_feature}` |",
        f"| hidden size | {config.hidden_size} |",
        f"| labels | {labels} |",
        f"| max length | {config.max_length} |",
        f"| ConsistentEE policies | {'yes' if config.policy_hidden else 'no'} |",
        "", "## Exit rule", "",
    ]
    if exit_rule:
        params = ", ".join(f"{k}={v!r}" for k, v in (exit_rule.get("params") or {}).items()) or "defaults"
        fitted = " (fitted on validation data)" if exit_rule.get("fitted") else ""
        lines.append(f"Default rule: `{exit_rule['name']}` ({params}){fitted}; `layerexit.pipeline` uses it "
                     "unless you pass another.")
    else:
        lines.append("No default rule is stored; pass one, e.g. `rule=\"maxprob\"` with `threshold=0.9`.")
    if figures:
        lines += ["", "## Measured figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in _check_figures(figures).items()]
    ident = repo_id or "path/to/checkpoint"
    lines += [
        "", "## Use", "", "```python", "import layerexit", "",
        f'classify = layerexit.pipeline("{ident}")',
        'classify("a gripping, beautifully shot film")  # [{"label": ..., "score": ..., "exit_layer": ...}]',
        "", "from transformers import AutoModel  # after `import layerexit`",
        f'model = AutoModel.from_pretrained("{ident}")', "```", "",
        f'Or on the command line: `layerexit predict --model {ident} "some text"`.', "",
    ]
    return "\n".join(lines)


def push_to_hub(model, repo_id: str, tokenizer=None, *, exit_rule=None, figures: dict | None = None,
                private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                revision: str | None = None, create_pr: bool = False):
    """Save ``model`` (+ tokenizer) with its model card into a temporary folder and upload it as ``repo_id``."""
    if not isinstance(repo_id, str) or not _looks_like_hub_id(repo_id):
        raise bad_value("repo_id", repo_id, "give a hub repository id such as 'user/name'")
    spec = rule_spec(exit_rule)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="layerexit-push-") as tmp:
        folder = Path(tmp) / "checkpoint"
        model.save_pretrained(folder, tokenizer=tokenizer, exit_rule=spec)
        (folder / CARD_NAME).write_text(model_card(model, repo_id, spec, figures), encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 create_pr=create_pr,
                                 commit_message=commit_message or "Upload layerexit early-exit checkpoint")


def _looks_like_hub_id(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(name))) and not Path(str(name)).exists()


def _check_figures(figures: dict) -> dict:
    if not isinstance(figures, dict):
        raise bad_value("figures", figures, "pass a mapping {name: value}, e.g. {'accuracy': 0.91}")
    for name, value in figures.items():
        if not isinstance(value, (int, float, str)) or isinstance(value, bool):
            raise bad_value(f"figures[{name!r}]", value, "each figure is a number or a short text")
    return figures


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
