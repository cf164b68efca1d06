"""ONNX Runtime backends: each layer exported once (``torch.onnx.export``, dynamic rows and sequence length)
and run by its own ONNX Runtime session; ``onnx-int8`` adds ONNX Runtime's dynamic int8 quantization
(per-channel weights by default). Each graph also computes its layer's exit (feature and logits, float32
also under int8: the heads are left unquantized), so a layer and its exit cost one runtime call. A text
model's embeddings are one more graph (float32: table lookups and a norm), so starting a batch is one call
too; the rule stays in PyTorch on the host. Where layers are shared between positions (ALBERT) one graph
serves several exits, so the heads run on the host instead.

Each graph takes the running rows' hidden states (n, T, H) float32 and the layer's arguments as the adapter
builds them once per row set on the host (the attention mask in the attention implementation's layout, MPNet's
position bias; a mask that masks nothing when no row is padded), plus the mean-pooling weights of the exit
feature: no graph rebuilds them. Rows and length are dynamic axes, so the engine's row dropping and length
trimming need nothing else. Graphs saved by earlier versions, which take the 0/1 mask (n, T) instead or
come without the embeddings graph, still load.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LayerExitError, bad_value
from ..heads import mean_weights, pool_feature
from . import BACKENDS
from .base import LayerBackend, cpu_flags, read_manifest, unique_layers, weights_digest, write_manifest


def require_onnxruntime():
    """The ``onnxruntime`` module, or a clear error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise LayerExitError("backend='onnx' is invalid here: ONNX Runtime is not installed; install it with "
                             "`pip install 'layerexit[onnx]'` (onnx, onnxruntime, onnxscript), or choose "
                             "backend='int8' or 'bf16'") from None
    return onnxruntime


_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
           "none": "ORT_DISABLE_ALL"}


class _LayerGraph(nn.Module):
    """What one exported graph computes: (hidden (n, T, H), the layer's arguments) -> hidden (n, T, H), and with
    an exit head also that layer's exit feature (n, H) and logits (n, C), so a step costs one runtime call.

    The layer's arguments are what the adapter's ``prepare`` builds for a row set (the attention mask in the
    attention implementation's layout, MPNet's position bias), named by ``arguments``, then the mean-pooling
    weights (n, 1, T) when the exit feature is a mean: built once per row set on the host, not in every layer.
    """

    def __init__(self, adapter, layer: nn.Module, arguments: tuple[str, ...], head: nn.Module | None = None,
                 feature: str = "mean"):
        super().__init__()
        self.layer = layer
        self.backbone = adapter.backbone  # the adapter's layer call may read backbone parts
        self.arguments = arguments
        self.head = head
        self.feature = feature
        self._adapter = adapter

    def forward(self, hidden, *inputs):
        kwargs = dict(zip(self.arguments, inputs))
        out = self._adapter.call_layer(self.layer, hidden, kwargs)
        out = out[0] if isinstance(out, tuple) else out  # (n, T, H)
        if self.head is None:
            return out
        weights = inputs[len(self.arguments)] if self.feature == "mean" else None  # (n, 1, T)
        feature = pool_feature(self._adapter, self.feature, out, weights)  # (n, H)
        return out, feature, self.head(feature)


class _EmbeddingGraph(nn.Module):
    """What the embeddings graph computes: token ids (n, T) (and token types (n, T) where the model reads
    them) -> (n, T, H), the input of layer 0, as the adapter embeds text on the host."""

    def __init__(self, adapter):
        super().__init__()
        self.backbone = adapter.backbone
        self._adapter = adapter

    def forward(self, input_ids, *token_type_ids):  # (hidden, *arguments) as the layer graphs, for the exporter
        return self._adapter.embed(input_ids, token_type_ids[0] if token_type_ids else None)


def _argument_specs(prepared: dict, length: int) -> list[dict]:
    """The tensors ``adapter.prepare`` built for padded example rows of ``length`` tokens: name, dtype and
    shape, each dimension ``rows``, ``length`` or a fixed size (``None`` values, such as a vision model's mask,
    are not inputs)."""
    specs = []
    for name, value in prepared.items():
        if isinstance(value, torch.Tensor):
            shape = ["rows" if d == 0 else "length" if size == length else int(size) for d, size in enumerate(value.shape)]
            dtype = "float32" if value.is_floating_point() else str(value.dtype).removeprefix("torch.")  # float graphs
            specs.append({"name": name, "dtype": dtype, "shape": shape})
    return specs


@BACKENDS.register("onnx")
class OnnxBackend(LayerBackend):
    name = "onnx"
    hidden_dtype = torch.float32
    saves_files = True
    quantized = False

    def __init__(self, threads: int | None = None, optimization: str = "all", exporter: str = "dynamo",
                 thread_pool: str = "session", host_threads: int | None = 1):
        super().__init__()
        if thread_pool not in ("session", "shared"):
            raise bad_value("thread_pool", thread_pool, "choose 'session' (a thread pool per layer session, idle "
                            "threads sleep; the default) or 'shared' (ONNX Runtime's process-wide pool: faster, but "
                            "every later ONNX Runtime session in the process must use it too)")
        if optimization not in _LEVELS:
            raise bad_value("optimization", optimization, f"choose one of {', '.join(_LEVELS)}")
        if exporter not in ("dynamo", "torchscript"):
            raise bad_value("exporter", exporter, "choose 'dynamo' (torch.export-based, the default) or "
                            "'torchscript' (the legacy exporter: deprecated, but ~15x faster to export)")
        self.threads = threads
        self.host_threads = host_threads  # PyTorch's share: embeddings, rule (tiny next to the layers)
        self.thread_pool = thread_pool
        self.optimization = optimization
        self.exporter = exporter

    # --- building ------------------------------------------------------------------------------------
    def build(self) -> None:
        require_onnxruntime()
        with tempfile.TemporaryDirectory(prefix="layerexit-onnx-") as tmp:
            self._export(Path(tmp))
            self._open(Path(tmp))

    def _export(self, directory: Path) -> None:
        model = self.model
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise LayerExitError(f"backend={self.name!r} is invalid for a model on {device}: export on the CPU; move "
                                 "the model with model.to('cpu') first")
        modules, positions = unique_layers(model.adapter.layers)
        # example rows with ragged padding, so the layer arguments keep the masked form; a length (11) unlikely
        # to equal any other dimension, so the arguments' length axes can be told apart
        hidden = torch.randn(2, 11, model.config.hidden_size)
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, 7:] = 0
        prepared = model.adapter.prepare(hidden, mask)
        specs = _argument_specs(prepared, mask.shape[1])
        arguments = tuple(spec["name"] for spec in specs)
        example = (hidden, *(prepared[spec["name"]].to(getattr(torch, spec["dtype"])) for spec in specs))
        was_dtype = next(model.backbone.parameters()).dtype
        # each layer's exit head goes into its graph, unless layers are shared between positions (ALBERT):
        # one graph per distinct layer then, and the heads run on the host
        with_exits = _exits_in_graphs(positions)
        takes_weights = with_exits and model.config.exit_feature == "mean"
        if takes_weights:
            example = (*example, mean_weights(mask, torch.float32)[:, None])  # (n, 1, T)
        shapes = [["rows", "length", hidden.shape[-1]], *(spec["shape"] for spec in specs)]
        shapes += [["rows", 1, "length"]] if takes_weights else []
        names = ["hidden", *arguments, *(["weights"] if takes_weights else [])]
        for i, module in enumerate(modules):
            head = model.exits[i] if with_exits else None
            graph = _LayerGraph(model.adapter, module, arguments, head, model.config.exit_feature).eval()
            if was_dtype != torch.float32:
                graph = _float_copy(graph)
            path = directory / f"layer_{i}.onnx"
            _export_graph(graph, example, names, shapes, path, self.exporter,
                          _EXIT_OUTPUTS if with_exits else ("output",))
            if self.quantized:
                self._quantize(path)
        self._embeddings = None
        if model.adapter.reads_text:  # the embeddings too: one call instead of a dozen small host ops
            graph = _EmbeddingGraph(model.adapter).eval()
            if was_dtype != torch.float32:
                graph = _float_copy(graph)
            ids = torch.randint(5, min(1000, model.backbone.config.vocab_size), (2, 11))  # (n, T)
            example = (ids, torch.zeros_like(ids)) if model.adapter.uses_token_type_ids else (ids,)
            names = ["input_ids", "token_type_ids"][: len(example)]
            _export_graph(graph, example, names, [["rows", "length"]] * len(example), directory / EMBEDDINGS,
                          self.exporter, ("hidden",))  # float32 also under onnx-int8: table lookups
            self._embeddings = EMBEDDINGS
        self._positions = positions
        self._files = [f"layer_{i}.onnx" for i in range(len(modules))]
        self._arguments = specs

    def _quantize(self, path: Path) -> None:
        pass

    def _open(self, directory: Path) -> None:
        ort = require_onnxruntime()
        threads = int(self.threads or torch.get_num_threads())
        if self.thread_pool == "shared":
            use_shared_thread_pool(threads)
        options = _session_options(ort, threads, shared=_SHARED_POOL_THREADS is not None)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.optimization])
        sessions = []
        for name in self._files:
            try:
                session = _session(ort, directory / name, options, threads)
            except Exception as err:  # noqa: BLE001  (ORT raises its own exception types)
                raise LayerExitError(f"optimized={str(directory)!r} is invalid: ONNX Runtime "
                                     f"{ort.__version__} cannot run {name}: {str(err).splitlines()[0]}; re-export "
                                     f"with model.optimize({self.name!r}) on this installation") from None
            sessions.append(session)
        self._embedding_session = None
        if self._embeddings:
            self._embedding_session = _session(ort, directory / self._embeddings, options, threads)
            self._embedding_inputs = [i.name for i in self._embedding_session.get_inputs()]
        self.computes_embeddings = self._embedding_session is not None
        self.pool_used = "session" if sessions[0].get_session_options().use_per_session_threads else "shared"
        self._graph_bytes = {name: (directory / name).read_bytes()
                             for name in [*self._files, *([self._embeddings] if self._embeddings else [])]}
        inputs = {i.name for i in sessions[0].get_inputs()}
        # graphs saved by earlier versions take the 0/1 mask (n, T) and build the attention mask themselves
        self._takes_mask = "mask" in inputs
        self._takes_weights = "weights" in inputs
        # graphs saved by earlier versions (or for shared layers) return the hidden states only
        self.computes_exits = [o.name for o in sessions[0].get_outputs()] == list(_EXIT_OUTPUTS)
        self.sessions = [sessions[i] for i in self._positions]

    # --- computation ---------------------------------------------------------------------------------
    def _feed(self, hidden, state) -> dict:
        feed = {"hidden": hidden.detach().float().contiguous().numpy()}  # (n, T, H) float32, no copy
        if self._takes_mask:
            feed["mask"] = np.ascontiguousarray(state.attention_mask.numpy(), dtype=np.int64)  # (n, T)
            return feed
        arguments = state.row_cache.get("onnx_arguments")  # the same for every layer of a row set
        if arguments is None:
            arguments = state.row_cache["onnx_arguments"] = self._arguments_for(state)
        feed.update(arguments)
        return feed

    def _arguments_for(self, state) -> dict:
        """The graphs' layer arguments for the rows of ``state`` (built by the adapter, as the eager layers get
        them), and the mean-pooling weights; as numpy arrays."""
        rows, length = state.attention_mask.shape
        unpadded = bool(state.attention_mask.all())
        # rows without padding need no attention mask: when that is all the graphs take, skip building it
        only_masks = all(spec["name"] == "attention_mask" for spec in self._arguments)
        kwargs = {} if only_masks and unpadded else state.layer_kwargs
        feed = {}
        for spec in self._arguments:
            value = kwargs.get(spec["name"])
            if value is None:  # rows without padding: the adapter skips the mask, the graph takes one
                feed[spec["name"]] = _no_masking(spec, rows, length)
            else:
                feed[spec["name"]] = np.ascontiguousarray(value.to(getattr(torch, spec["dtype"])).numpy())
        if self._takes_weights:  # (n, 1, T); without padding 1/T everywhere, the float32 quotient mean_weights gives
            feed["weights"] = (np.full((rows, 1, length), np.float32(1) / np.float32(length)) if unpadded
                               else mean_weights(state.attention_mask, torch.float32)[:, None].numpy())
        return feed

    def embed(self, input_ids, token_type_ids):
        ids = input_ids.numpy().astype(np.int64, copy=False)  # (B, T)
        feed = {"input_ids": ids}
        if "token_type_ids" in self._embedding_inputs:  # absent: type 0, as the backbone's default
            feed["token_type_ids"] = (np.zeros_like(ids) if token_type_ids is None
                                      else token_type_ids.numpy().astype(np.int64, copy=False))
        return torch.from_numpy(self._embedding_session.run(None, feed)[0])  # (B, T, H)

    def run_layer(self, index, hidden, state):
        return torch.from_numpy(self.sessions[index].run(["output"], self._feed(hidden, state))[0])  # (n, T, H)

    def run_layer_and_exit(self, index, state):
        hidden, feature, logits = self.sessions[index].run(None, self._feed(state.hidden, state))
        return torch.from_numpy(hidden), torch.from_numpy(feature), torch.from_numpy(logits)  # (n,T,H) (n,H) (n,C)

    def describe(self):
        ort = require_onnxruntime()
        return {"backend": self.name, "runtime": f"onnxruntime {ort.__version__}", "precision": "float32",
                "optimization": self.optimization, "exporter": self.exporter,
                "thread_pool": getattr(self, "pool_used", self.thread_pool), "threads": self.threads,
                "host_threads": self.host_threads,
                "exit_heads": "in the layer graphs" if getattr(self, "computes_exits", False) else "host",
                "embeddings": "graph" if getattr(self, "computes_embeddings", False) else "host"}

    # --- persistence ---------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        for name, data in self._graph_bytes.items():
            (directory / name).write_bytes(data)
        carried = self.computes_exits or self._embeddings  # weights besides the layers' inside the graphs
        extra = {"exit_digest": exit_digest(self.model, heads=self.computes_exits)} if carried else {}
        write_manifest(directory, self, positions=self._positions, files=self._files, arguments=self._arguments,
                       embeddings=self._embeddings, **extra)

    def check_saved(self, directory: Path) -> None:
        super().check_saved(directory)
        require_onnxruntime()
        manifest = read_manifest(directory, self)
        self._positions, self._files = manifest["positions"], manifest["files"]
        self._arguments = manifest.get("arguments", [])  # none in graphs that take the 0/1 mask
        self._embeddings = manifest.get("embeddings")  # none in folders saved by earlier versions
        if len(self._positions) != self.model.config.num_layers:
            raise LayerExitError(f"optimized={str(directory)!r} is invalid: it has {len(self._positions)} layers, "
                                 f"the model {self.model.config.num_layers}")
        heads = _exits_in_graphs(self._positions)
        if "exit_digest" in manifest and manifest["exit_digest"] != exit_digest(self.model, heads=heads):
            raise LayerExitError(f"optimized={str(directory)!r} is invalid: its graphs carry other exit heads or "
                                 "embeddings than this model's (trained after they were saved?); rebuild them with "
                                 f"model.optimize({self.name!r}) and model.save_optimized(checkpoint)")

    def load(self, directory: Path) -> None:
        self._open(directory)


@BACKENDS.register("onnx-int8")
class OnnxInt8Backend(OnnxBackend):
    name = "onnx-int8"
    quantized = True

    def __init__(self, threads: int | None = None, optimization: str = "all", exporter: str = "dynamo",
                 thread_pool: str = "session", host_threads: int | None = 1, per_channel: bool = True,
                 reduce_range: bool | None = None):
        super().__init__(threads, optimization, exporter, thread_pool, host_threads)
        self.per_channel = bool(per_channel)
        #: 7-bit weights. ONNX Runtime's int8 kernels for CPUs without VNNI (AVX2, AVX-512 before VNNI) add
        #: pairs of uint8 x int8 products in 16 bits, which saturate with full-range weights; ``None`` turns it
        #: on exactly on such a CPU (the one quantizing: the graphs are saved quantized).
        self.reduce_range = (not cpu_has_vnni()) if reduce_range is None else bool(reduce_range)

    def _quantize(self, path: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.onnx_model import ONNXModel

        model = onnx.load(str(path))
        # the exporter's intermediate shapes can contradict the quantizer's own shape inference (seen on the
        # exit head's Gemm): drop them, ONNX Runtime infers shapes when it loads the graph
        del model.graph.value_info[:]
        # the quantizer rewrites Gemm nodes as MatMul + Add under new names; do it first, so the names of the
        # exit nodes it is told to leave alone are the ones it sees
        ONNXModel(model).replace_gemm_with_matmul()
        onnx.save(model, str(path))
        out = path.with_suffix(".int8.onnx")
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process concerns static quantization
        try:  # the exit heads stay float32: tiny matrices, and the rule reads their logits
            quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=self.per_channel,
                             reduce_range=self.reduce_range, nodes_to_exclude=_exit_nodes(path))
        finally:
            logging.getLogger().setLevel(quiet)
        os.replace(out, path)

    def describe(self):
        return {**super().describe(), "precision": "int8 dynamic (weights per-"
                f"{'channel' if self.per_channel else 'tensor'}{', 7-bit' if self.reduce_range else ''}, "
                "activations per-tensor)"}


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI dot-product instructions (AVX-512 VNNI or AVX-VNNI); ``True`` where its flags
    cannot be read (then ONNX Runtime's defaults are kept)."""
    flags = cpu_flags()
    return True if flags is None else bool({"avx512_vnni", "avx_vnni"} & flags)


_SHARED_POOL_THREADS: int | None = None  # size of this process's global ONNX Runtime pool, once layerexit made it


def use_shared_thread_pool(threads: int) -> int:
    """Create ONNX Runtime's process-wide ("global") intra-op thread pool with ``threads`` threads, once per
    process; returns its size (0 when other code of the process made it first: it is joined, size unknown).

    The engine calls one session per layer. With a pool per session (ONNX Runtime's default), each pool's
    threads spin after their layer returns and starve the next layer's pool; with spinning turned off
    (layerexit's ``thread_pool="session"``) every parallel operator pays a wake-up instead. One shared pool
    has neither cost. ONNX Runtime allows one such pool per process and, once it exists, refuses sessions
    that ask for their own pool: code that creates ONNX Runtime sessions later in the same process must set
    ``SessionOptions.use_per_session_threads = False``. That is why ``thread_pool="shared"`` is an opt-in of
    the library, and the choice of layerexit's own processes (``evaluate``, ``benchmark``, ``serve``).
    """
    global _SHARED_POOL_THREADS
    ort = require_onnxruntime()
    if _SHARED_POOL_THREADS is None:
        try:
            ort.set_global_thread_pool_sizes(int(threads), 1)
            _SHARED_POOL_THREADS = int(threads)
        except Exception as err:  # noqa: BLE001  (ORT raises its own exception types)
            if "already been created" not in str(err):
                raise
            _SHARED_POOL_THREADS = 0  # made by other code in this process, size unknown: join it
    elif _SHARED_POOL_THREADS and _SHARED_POOL_THREADS != int(threads):
        warnings.warn(f"backend onnx: ONNX Runtime's shared thread pool of this process has {_SHARED_POOL_THREADS} "
                      f"threads (made once per process), not the {threads} asked for; using it", stacklevel=3)
    return _SHARED_POOL_THREADS


def _session_options(ort, threads: int, shared: bool):
    options = ort.SessionOptions()
    if shared:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads of per-session pools spin by default; with a session per layer and PyTorch in between,
        # the spinning pools of the other layers take the cores from the running one
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(ort, path: Path, options, threads: int):
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        if not options.use_per_session_threads or "global thread pool" not in str(err):
            raise
    # other code made the process-wide pool: every session must use it
    shared = _session_options(ort, threads, shared=True)
    shared.graph_optimization_level, shared.execution_mode = options.graph_optimization_level, options.execution_mode
    return ort.InferenceSession(str(path), shared, providers=["CPUExecutionProvider"])


def _float_copy(graph: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(graph)
    clone.float()
    clone._adapter = type(graph._adapter)(clone.backbone)
    return clone


_EXIT_OUTPUTS = ("output", "feature", "logits")
EMBEDDINGS = "embeddings.onnx"


def _exits_in_graphs(positions: list[int]) -> bool:
    """Whether the layer graphs carry the exit heads: one graph per position (not shared between positions, as
    ALBERT's layer group is)."""
    return positions == list(range(len(positions)))


def exit_digest(model, heads: bool = True) -> str:
    """A digest of what the graphs read besides the layers: the backbone's weights outside them (embeddings, a
    pooler, a final norm) and, where the layer graphs carry them (``heads``), the exit heads."""
    layers = {id(p) for layer in model.adapter.layers for p in layer.parameters()}
    outside = [(f"backbone.{n}", p) for n, p in model.backbone.named_parameters() if id(p) not in layers]
    exits = [(f"exits.{n}", p) for n, p in model.exits.named_parameters()] if heads else []
    return weights_digest([*outside, *exits])


def _exit_nodes(path: Path) -> list[str]:
    """Names of the nodes of a graph with exits that only its exit feature and logits need (not ``output``)."""
    import onnx

    graph = onnx.load(str(path)).graph
    if len(graph.output) == 1:
        return []
    producer = {out: node for node in graph.node for out in node.output}
    needed, todo = set(), ["output"]
    while todo:  # walk back from the hidden-state output
        node = producer.get(todo.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            todo.extend(node.input)
    return [node.name for node in graph.node if node.name not in needed]


def _no_masking(spec: dict, rows: int, length: int) -> np.ndarray:
    """An attention mask that masks nothing, in the layout of ``spec``: all True (a boolean mask) or all 0
    (an additive one)."""
    shape = [rows if d == "rows" else length if d == "length" else d for d in spec["shape"]]
    if spec["dtype"] == "bool":
        return np.ones(shape, dtype=np.bool_)
    return np.zeros(shape, dtype=np.dtype(spec["dtype"]))


def _export_graph(graph: nn.Module, example: tuple, names: list[str], shapes: list[list], path: Path,
                  exporter: str, outputs: tuple[str, ...] = ("output",)) -> None:
    """``torch.onnx.export`` with dynamic rows and sequence length (inputs and outputs); ``shapes`` gives each
    input's dimensions as ``rows``, ``length`` or a fixed size."""
    outputs = list(outputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {name: {d: size for d, size in enumerate(shape) if isinstance(size, str)}
                    for name, shape in zip(names, shapes)}
            axes.update({"output": {0: "rows", 1: "length"}, "hidden": {0: "rows", 1: "length"},
                         "feature": {0: "rows"}, "logits": {0: "rows"}})
            axes = {k: v for k, v in axes.items() if k in names or k in outputs}
            torch.onnx.export(graph, example, str(path), dynamic_axes=axes, dynamo=False, opset_version=18,
                              input_names=names, output_names=outputs)
            return
        dims = {"rows": torch.export.Dim("rows"), "length": torch.export.Dim("length")}
        dynamic = tuple({d: dims[size] for d, size in enumerate(shape) if isinstance(size, str)} for shape in shapes)
        # forward(first, *rest): the exporter wants the shapes in that structure (no rest: first alone)
        structure = (dynamic[0], dynamic[1:]) if len(dynamic) > 1 else (dynamic[0],)
        torch.onnx.export(graph, example, str(path), dynamic_shapes=structure, dynamo=True,
                          external_data=False, verbose=False, input_names=names, output_names=outputs)
