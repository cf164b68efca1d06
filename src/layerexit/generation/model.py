"""The early-exit decoder LM: an unmodified causal LM, its adapter, and the exit machinery we add.

Exit ``l`` (1-based, after layer l) predicts the next token as ``lm_head(final_norm(adapter_l(h_l)))``;
``adapter_l`` is the identity unless per-exit adapters were added, and the last exit is always the model
itself. Only what we add (adapters, policy) is saved; the backbone is reloaded by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CausalLMExitConfig, WEIGHTS_NAME
from ..errors import LayerExitError, bad_value
from ..io import atomic_directory
from .adapters import DecoderAdapter, decoder_adapter_for
from .heads import LinearExit, LowRankAdapter, TokenPolicy


class EarlyExitLM(nn.Module):
    """A causal LM with an exit after every layer (shared final norm + LM head by default)."""

    def __init__(self, lm: nn.Module, adapter_rank: int = 0, policy: bool = False, name: str | None = None,
                 adapter_kind: str = "lowrank"):
        super().__init__()
        self.lm = lm
        self.adapter: DecoderAdapter = decoder_adapter_for(lm)
        if int(adapter_rank) < 0:
            raise bad_value("adapter_rank", adapter_rank, "use 0 (shared head only) or a small rank such as 16")
        if adapter_kind not in ("lowrank", "linear"):
            raise bad_value("adapter_kind", adapter_kind, "choose 'lowrank' (trained) or 'linear' (fitted shortcut)")
        L, H = self.adapter.num_layers, self.adapter.hidden_size
        if adapter_kind == "linear":
            self.exit_adapters = nn.ModuleList(LinearExit(H) for _ in range(L - 1))
        else:
            self.exit_adapters = (nn.ModuleList(LowRankAdapter(H, int(adapter_rank)) for _ in range(L - 1))
                                  if adapter_rank else None)
        self.policy = TokenPolicy(H, L) if policy else None
        self.lora_merged = False  # set by merge_lora: the backbone's weights then include the LoRA updates
        dtype = next(lm.parameters()).dtype
        self.to(dtype)
        self.config = CausalLMExitConfig(backbone=str(name or getattr(lm.config, "_name_or_path", "") or ""),
                                 model_type=lm.config.model_type, num_layers=L, hidden_size=H,
                                 adapter_rank=int(adapter_rank), policy=bool(policy), adapter_kind=adapter_kind)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    # --- exits ---------------------------------------------------------------------------------------
    def exit_hidden(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed exit feature of exit ``layer`` (1-based): (…, H) -> (…, H)."""
        if self.exit_adapters is not None and layer < self.num_layers:
            hidden = self.exit_adapters[layer - 1](hidden)
        return self.adapter.final_norm(hidden)

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of exit ``layer`` (1-based): (…, H) -> (…, V)."""
        return self.adapter.lm_head(self.exit_hidden(layer, hidden))

    def exit_prob(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """ConsistentEE policy's exit probability after layer ``layer`` (1-based): (…, H) -> (…,)."""
        if self.policy is None:
            raise bad_value("rule", "policy", "these exits have no trained policy; train one with "
                            "layerexit.generation.train.train_policy or pick maxprob/margin/saturation")
        return self.policy(layer - 1, self.adapter.final_norm(hidden))

    def exit_parameters(self) -> int:
        """Parameters added to the backbone (0 with the shared head alone)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("lm.") or "lora_" in n)

    def merge_lora(self) -> int:
        """Fold trained LoRA updates into the backbone's weights and drop peft's wrappers (returns how many
        projections were merged), so decoding costs what the plain model costs and the fused state-propagation
        path applies again. Save before merging: the merged exits can no longer be written as LoRA tensors."""
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:
            return 0
        merged = 0
        for name, module in list(self.lm.named_modules()):
            if isinstance(module, LoraLayer) and hasattr(module, "get_base_layer"):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(self.lm.get_submodule(parent_name) if parent_name else self.lm, child, module.get_base_layer())
                merged += 1
        self.lora_merged = self.lora_merged or merged > 0
        return merged

    def backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.lm.parameters())

    # --- reference path ------------------------------------------------------------------------------
    def all_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states after every layer for (B, T) unpadded ids, no cache: (L, B, T, H)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.adapter.embed(input_ids, positions)  # (B, T, H)
        kwargs = self.adapter.layer_kwargs(hidden, positions)
        out = []
        for index in range(self.num_layers):
            hidden = self.adapter.run_layers(hidden, index, index + 1, positions, None, kwargs)
            out.append(hidden)
        return torch.stack(out)

    # --- persistence ---------------------------------------------------------------------------------
    def save_exits(self, directory: str | Path) -> None:
        """Write what we add (exits, policy, LoRA) atomically, in layerexit's one checkpoint format: ``config.json``
        (kind "causal-lm") and ``model.safetensors``; the backbone is reloaded by name."""
        if self.lora_merged:
            raise bad_value("exits", str(directory), "LoRA was merged into the backbone (merge_lora), so it can no "
                            "longer be saved apart from it; save the exits before calling merge_lora()")
        with atomic_directory(directory) as tmp:
            self.config.save(tmp)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                       if not k.startswith("lm.") or "lora_" in k}  # what we add: exits, policy, LoRA
            save_file(tensors, str(Path(tmp) / WEIGHTS_NAME), metadata={"format": "pt", "heads_only": "True"})

    @classmethod
    def with_exits(cls, lm: nn.Module, directory: str | Path, name: str | None = None) -> "EarlyExitLM":
        """Attach exits saved by :meth:`save_exits` (or in the earlier ``exit_config.json`` format) to ``lm``,
        checking they were trained on its shape."""
        directory = Path(directory)
        config, weights = CausalLMExitConfig.load(directory)
        L = len(decoder_adapter_for(lm).layers)
        if (config.model_type, config.num_layers, config.hidden_size) != (lm.config.model_type, L, lm.config.hidden_size):
            raise bad_value("exits", str(directory), f"they were trained on {config.model_type} with {config.num_layers} "
                            f"layers and hidden {config.hidden_size} ({config.backbone}); load that backbone")
        model = cls(lm, adapter_rank=config.adapter_rank, policy=config.policy, name=name or config.backbone,
                    adapter_kind=config.adapter_kind)
        model.config.training = config.training
        if config.training.get("lora_rank"):
            from .train import add_lora

            add_lora(model, config.training["lora_rank"])
        tensors = load_file(str(weights))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("lm.") or "lora_" in k]
        if missing or unexpected:
            raise LayerExitError(f"exits={str(directory)!r} do not match: missing {missing}, unexpected {unexpected}")
        return model.eval()
