"""PyTorch backends: the backbone's own layers (eager), bf16 copies, and dynamic int8 copies.

int8 uses PyTorch's FBGEMM dynamic-quantized linear kernels (``torch.ao.nn.quantized.dynamic.Linear``):
weights int8 per output channel, activations quantized per tensor at run time, accumulation in int32 on
VNNI where the CPU has it. That module family is marked deprecated in favour of torchao, but torchao's
``Int8DynamicActivationInt8WeightConfig`` only reaches speed under ``torch.compile``, which recompiles for
the many (rows, length) shapes the engine produces as rows exit; in eager mode it was about 10x slower than
the FBGEMM kernel here (see docs/backends.md). The choice is confined to :func:`_quantize_linears`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LayerExitError
from . import BACKENDS
from .base import LayerBackend, read_manifest, unique_layers, write_manifest



@BACKENDS.register("eager")
class EagerBackend(LayerBackend):
    name = "eager"


class _CopiedLayers(LayerBackend):
    """Runs per-layer copies of the backbone's layers (cast or quantized); the backbone itself is untouched,
    so the checkpoint, training and the reference path keep the original weights."""

    def build(self) -> None:
        modules, positions = unique_layers(self.model.adapter.layers)
        copies = [self.convert(copy.deepcopy(m)) for m in modules]
        self.layers = [copies[i] for i in positions]

    def convert(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def run_layer(self, index, hidden, state):
        return self.model.adapter.call_layer(self.layers[index], hidden, state.layer_kwargs)


@BACKENDS.register("bf16")
class BF16Backend(_CopiedLayers):
    name = "bf16"
    hidden_dtype = torch.bfloat16

    def convert(self, layer):
        return layer.to(torch.bfloat16).eval()

    def describe(self):
        return {"backend": self.name, "layers": "bfloat16", "exit_heads": "float32"}


@BACKENDS.register("int8")
class Int8Backend(_CopiedLayers):
    name = "int8"
    saves_files = True

    def __init__(self, per_channel: bool = True):
        super().__init__()
        self.per_channel = bool(per_channel)

    def build(self) -> None:
        device = next(self.model.parameters()).device
        if device.type != "cpu":
            raise LayerExitError(f"backend='int8' is invalid for a model on {device}: dynamic int8 kernels run on "
                                 "the CPU; move the model with model.to('cpu') first, or use backend='bf16'")
        super().build()

    def convert(self, layer):
        return _quantize_linears(layer.float().eval(), self.per_channel)

    def describe(self):
        return {"backend": self.name, "weights": "int8 per-channel" if self.per_channel else "int8 per-tensor",
                "activations": "int8 dynamic per-tensor", "kernels": f"torch {torch.__version__} "
                f"{torch.backends.quantized.engine}"}

    # --- persistence: the int8 weights themselves, so a reload runs exactly what was calibrated ----------
    def save(self, directory: Path) -> None:
        modules, positions = unique_layers(self.layers)
        tensors = {}
        for i, module in enumerate(modules):
            for name, linear in _quantized_linears(module):
                weight, bias = linear._weight_bias()
                key = f"{i}.{name}"
                tensors[f"{key}.weight"] = weight.int_repr().contiguous()  # (out, in) int8
                if weight.qscheme() == torch.per_channel_affine:
                    tensors[f"{key}.scale"] = weight.q_per_channel_scales().float().contiguous()  # (out,)
                    tensors[f"{key}.zero_point"] = weight.q_per_channel_zero_points().contiguous()
                else:
                    tensors[f"{key}.scale"] = torch.tensor([weight.q_scale()], dtype=torch.float32)
                    tensors[f"{key}.zero_point"] = torch.tensor([weight.q_zero_point()])
                if bias is not None:
                    tensors[f"{key}.bias"] = bias.detach().contiguous()
        save_file(tensors, str(directory / "int8_layers.safetensors"))
        write_manifest(directory, self, positions=positions, per_channel=self.per_channel)

    def check_saved(self, directory: Path) -> None:
        super().check_saved(directory)
        manifest = read_manifest(directory, self)
        self.per_channel = manifest["per_channel"]

    def load(self, directory: Path) -> None:
        self.build()  # the module structure (quantized from the float weights), then the saved int8 weights
        tensors = load_file(str(directory / "int8_layers.safetensors"))
        modules, _ = unique_layers(self.layers)
        for i, module in enumerate(modules):
            for name, linear in _quantized_linears(module):
                key = f"{i}.{name}"
                scale, zero = tensors[f"{key}.scale"], tensors[f"{key}.zero_point"]
                if scale.numel() > 1 or self.per_channel:
                    weight = torch._make_per_channel_quantized_tensor(tensors[f"{key}.weight"], scale.double(),
                                                                      zero, 0)
                else:
                    weight = torch._make_per_tensor_quantized_tensor(tensors[f"{key}.weight"], float(scale),
                                                                     int(zero))
                linear.set_weight_bias(weight, tensors.get(f"{key}.bias"))


def _quantize_linears(layer: nn.Module, per_channel: bool) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():  # the deprecation notice of torch.ao (see the module docstring)
        warnings.simplefilter("ignore")
        return quantize_dynamic(layer, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def _quantized_linears(module: nn.Module):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [(name, m) for name, m in module.named_modules() if isinstance(m, DynamicLinear)]
