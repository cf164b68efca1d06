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

from ..errors import LayerExitError, bad_value
from . import BACKENDS
from .base import LayerBackend, read_manifest, unique_layers, write_manifest



@BACKENDS.register("eager")
class EagerBackend(LayerBackend):
    name = "eager"


class _CopiedLayers(LayerBackend):
    """Runs per-layer copies of the backbone's layers (cast or quantized); the backbone itself is untouched,
    so the checkpoint, training and the reference path keep the original weights."""

    def __init__(self, fuse: bool = True):
        super().__init__()
        self.fuse = bool(fuse)  # BERT-style layers run as FusedEncoderLayer

    def build(self) -> None:
        modules, positions = unique_layers(self.model.adapter.layers)
        copies = [self.convert(self.fused(copy.deepcopy(m))) for m in modules]
        self.layers = [copies[i] for i in positions]

    def fused(self, layer: nn.Module) -> nn.Module:
        return FusedEncoderLayer(layer) if self.fuse and FusedEncoderLayer.supports(layer) else layer

    def convert(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def layer_forward(self) -> str:
        fused = all(isinstance(layer, FusedEncoderLayer) for layer in self.layers)
        return "fused (one query-key-value product)" if fused else "Hugging Face modules"

    def run_layer(self, index, hidden, state):
        return self.model.adapter.call_layer(self.layers[index], hidden, state.layer_kwargs)


@BACKENDS.register("bf16")
class BF16Backend(_CopiedLayers):
    """bf16 copies of the layers. On a CPU, each linear keeps its weight in oneDNN's blocked layout, packed once
    here: a plain bf16 ``F.linear`` re-packs the weight at every call, a fixed cost that dominates the small
    matrices of the few rows still running deep in the stack (see docs/backends.md). BERT-style layers run as
    :class:`FusedEncoderLayer` (fewer calls per layer, the same computation). ``prepack=False`` keeps plain
    ``nn.Linear`` modules; ``fuse=False`` keeps the Hugging Face layer modules (as for ``int8``)."""

    name = "bf16"
    hidden_dtype = torch.bfloat16

    def __init__(self, prepack: bool = True, fuse: bool = True):
        super().__init__(fuse)
        self.prepack = bool(prepack)

    def convert(self, layer):
        layer = layer.to(torch.bfloat16).eval()
        if self.prepack and _can_prepack(layer):
            _prepack_linears(layer)
        return layer

    def describe(self):
        packed = any(isinstance(m, PackedLinear) for layer in self.layers for m in layer.modules())
        return {"backend": self.name, "layers": "bfloat16", "exit_heads": "float32",
                "linear_weights": "oneDNN prepacked" if packed else "plain", "layer_forward": self.layer_forward()}


#: where a post-norm encoder layer of each family keeps its parts: query, key, value, attention output
#: projection, its LayerNorm, intermediate projection, activation, output projection, its LayerNorm
_ENCODER_LAYOUTS = {
    "BertLayer": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "attention.output.LayerNorm", "intermediate.dense", "intermediate.intermediate_act_fn",
                  "output.dense", "output.LayerNorm"),
    "TransformerBlock": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",  # DistilBERT
                         "sa_layer_norm", "ffn.lin1", "ffn.activation", "ffn.lin2", "output_layer_norm"),
}
_ENCODER_LAYOUTS["RobertaLayer"] = _ENCODER_LAYOUTS["XLMRobertaLayer"] = _ENCODER_LAYOUTS["BertLayer"]


class _Intermediate(nn.Module):
    """The intermediate projection and its activation, under the names the bf16 prepacking fuses (``dense``
    followed by the exact GELU: one oneDNN call)."""

    def __init__(self, dense: nn.Module, activation: nn.Module):
        super().__init__()
        self.dense, self.intermediate_act_fn = dense, activation

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (n, T, H) -> (n, T, I)
        return self.intermediate_act_fn(self.dense(hidden))


class FusedEncoderLayer(nn.Module):
    """An inference copy of a post-norm BERT-style encoder layer (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) that
    computes what the Hugging Face layer computes with SDPA attention, in fewer calls: query, key and value as
    one matrix product (their weights stacked), then PyTorch's scaled-dot-product attention and the two
    residual LayerNorms called directly. At batch 1 on a CPU with bf16 matrix units a layer's products take a
    few hundred microseconds, and the Hugging Face module tree adds about a dozen nested module calls, an
    attention-interface lookup and a signature inspection (``apply_chunking_to_forward``) per layer: a fixed
    cost of the same order, paid again for every layer an input runs. Built by the ``bf16`` and ``int8``
    backends, before they cast or quantize; the checkpoint's layers are untouched.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        layout = _ENCODER_LAYOUTS[type(layer).__name__]
        part = dict(zip(("query", "key", "value", "attention_dense", "attention_norm", "intermediate", "activation",
                         "output", "output_norm"), (layer.get_submodule(path) for path in layout)))
        attention = layer.get_submodule(layout[0].rsplit(".", 1)[0])  # the self-attention module
        self.head_size = attention.attention_head_size
        self.num_heads = part["query"].out_features // self.head_size
        self.scaling = attention.scaling
        stacked = (part["query"], part["key"], part["value"])
        weight = part["query"].weight
        self.qkv = nn.Linear(weight.shape[1], sum(p.out_features for p in stacked), dtype=weight.dtype,
                             device=weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([p.weight for p in stacked]))  # (3 * heads * head_size, hidden)
            self.qkv.bias.copy_(torch.cat([p.bias for p in stacked]))
        self.attention_dense, self.attention_norm = part["attention_dense"], part["attention_norm"]
        self.intermediate = _Intermediate(part["intermediate"], part["activation"])
        self.output_dense, self.output_norm = part["output"], part["output_norm"]

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        """An encoder layer whose computation this class reproduces exactly: one of the known families, SDPA
        attention with biased query/key/value and the default scale, no cross-attention or decoder cache, no
        chunked feed-forward."""
        layout = _ENCODER_LAYOUTS.get(type(layer).__name__)
        if layout is None:
            return False
        try:
            parts = [layer.get_submodule(path) for path in layout]
            attention = layer.get_submodule(layout[0].rsplit(".", 1)[0])
        except AttributeError:
            return False
        config = getattr(attention, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
            return False
        head_size = getattr(attention, "attention_head_size", None)
        plain = all(type(p) is nn.Linear and p.bias is not None for p in parts[:3])
        chunked = [m.chunk_size_feed_forward for m in (layer, *layer.children())  # BertLayer, DistilBERT's FFN
                   if hasattr(m, "chunk_size_feed_forward")]
        return (plain and head_size is not None and getattr(attention, "scaling", None) == head_size ** -0.5
                and not getattr(layer, "is_decoder", False) and not getattr(layer, "add_cross_attention", False)
                and not getattr(config, "is_decoder", False) and all(c == 0 for c in chunked)
                and getattr(config, "position_embedding_type", "absolute") == "absolute")

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, width = hidden.shape  # (n, T, H); attention_mask: SDPA's bool (n, 1, T, T) or None
        qkv = self.qkv(hidden).view(n, length, 3, self.num_heads, self.head_size)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (n, heads, T, head_size)
        context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                             scale=self.scaling)  # (n, heads, T, head_size)
        context = context.transpose(1, 2).reshape(n, length, width)
        norm = self.attention_norm
        hidden = nn.functional.layer_norm(self.attention_dense(context) + hidden, (width,), norm.weight, norm.bias,
                                          norm.eps)
        norm = self.output_norm
        return nn.functional.layer_norm(self.output_dense(self.intermediate(hidden)) + hidden, (width,), norm.weight,
                                        norm.bias, norm.eps)


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight was reordered once into oneDNN's blocked layout.

    ``F.linear`` on a bf16 CPU tensor hands the weight to oneDNN, which reorders it for its kernels (AMX or
    AVX-512 BF16) at every call; this module does it once. Same results as the linear it replaces on a
    contiguous input (the same kernel runs; a strided input is made contiguous first). ``activation="gelu"``
    applies the exact (erf) GELU inside the same kernel, on the float32 accumulator before rounding to bf16.
    Built by :class:`BF16Backend`; gradients do not flow through it.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "gelu"):
            raise bad_value("activation", activation, "use 'none' or 'gelu'")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = activation
        weight = linear.weight.detach()  # (out, in)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # opaque oneDNN tensor
        self.bias = None if linear.bias is None else linear.bias.detach()  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        algorithm = "none" if self.activation == "gelu" else ""  # "none": the erf GELU, not the tanh one
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, self.activation,
                                                  [], algorithm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation}")


def _can_prepack(layer: nn.Module) -> bool:
    """oneDNN's packed bf16 linear exists in this build, this CPU has bf16 kernels for it (AVX-512 or
    AVX-NE-CONVERT), and the layer sits on the CPU."""
    if not bf16_prepack_available():
        return False
    return all(p.device.type == "cpu" for p in layer.parameters())


def bf16_prepack_available() -> bool:
    """Whether :class:`PackedLinear` can run here: oneDNN in this torch build and a CPU it has bf16 kernels for
    (on an AVX2-only CPU oneDNN refuses to pack bf16 weights, and bf16 matrix products are emulated: slow)."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")):
        return False
    supported = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else False


def _prepack_linears(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child))
        else:
            _prepack_linears(child)
    # a dense layer followed by the exact GELU (the BERT family's and ViT's intermediate block): one fused call
    dense, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
    if isinstance(dense, PackedLinear) and dense.activation == "none" and _is_exact_gelu(act):
        dense.activation = "gelu"
        module.intermediate_act_fn = nn.Identity()


def _is_exact_gelu(act) -> bool:
    from transformers.activations import GELUActivation

    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act) is GELUActivation and act.act is nn.functional.gelu


@BACKENDS.register("int8")
class Int8Backend(_CopiedLayers):
    """Dynamic int8 copies of the layers (FBGEMM kernels, see the module docstring). BERT-style layers run as
    :class:`FusedEncoderLayer` before quantization (its stacked query-key-value weight quantized per output
    channel, as the three were); ``fuse=False`` keeps the Hugging Face modules. Saved folders record which
    (folders written before the fused layers existed load as modules)."""

    name = "int8"
    saves_files = True

    def __init__(self, per_channel: bool = True, fuse: bool = True):
        super().__init__(fuse)
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
                f"{torch.backends.quantized.engine}", "layer_forward": self.layer_forward()}

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
        save_file(tensors, str(directory / "int8_layers.safetensors"))  # keys: "<layer>.<linear's module path>"
        write_manifest(directory, self, positions=positions, per_channel=self.per_channel, fused=self.fuse)

    def check_saved(self, directory: Path) -> None:
        super().check_saved(directory)
        manifest = read_manifest(directory, self)
        self.per_channel = manifest["per_channel"]
        self.fuse = manifest.get("fused", False)  # folders saved before fused layers hold the modules' linears

    def load(self, directory: Path) -> None:
        self.build()  # the module structure (quantized from the float weights), then the saved int8 weights
        tensors = load_file(str(directory / "int8_layers.safetensors"))
        modules, _ = unique_layers(self.layers)
        for i, module in enumerate(modules):
            for name, linear in _quantized_linears(module):
                key = f"{i}.{name}"
                if f"{key}.weight" not in tensors:
                    raise LayerExitError(f"optimized={str(directory)!r} is invalid: it has no int8 weights for "
                                         f"{key!r} (another layer form or layerexit version wrote it); rebuild it "
                                         "with model.optimize('int8') and model.save_optimized(checkpoint)")
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
