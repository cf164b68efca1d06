"""The backend interface: build per-layer executables from a model once, then run layer ``i`` on the rows
still in the batch (any number of rows, any sequence length: the engine trims both between layers)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from ..errors import LayerExitError

MANIFEST = "backend.json"


class LayerBackend:
    """How the layers of a :class:`~layerexit.MultiExitModel` are computed.

    Subclasses set ``name`` and override :meth:`build` (make the per-layer executables from the model's own
    layers) and :meth:`run_layer`. ``hidden_dtype`` is the dtype of the hidden states travelling between
    layers (``None``: the model's own); exit features are cast back to the exit heads' dtype, so rules and
    heads always see the same precision as in training.
    """

    name = "eager"
    hidden_dtype: torch.dtype | None = None
    #: whether :meth:`save` writes files worth keeping (exported graphs, quantized weights)
    saves_files = False
    #: PyTorch threads for the host work around the layers (embeddings, rule, exit heads) while this backend
    #: runs the layers; ``None``: leave torch's setting alone
    host_threads: int | None = None
    #: whether :meth:`run_layer_and_exit` computes each layer's exit too (the ONNX graphs carry the heads);
    #: otherwise the engine runs the exit heads on the host after :meth:`run_layer`
    computes_exits = False
    #: whether :meth:`embed` computes the backbone's text embeddings (an ONNX graph); otherwise the backbone's
    #: own embeddings run on the host
    computes_embeddings = False

    def __init__(self):
        self.model = None

    # --- life cycle ----------------------------------------------------------------------------------
    def bind(self, model, saved: str | Path | None = None) -> "LayerBackend":
        """Attach to ``model``: load the executables from ``saved`` (a folder written by :meth:`save`) when
        given, else build them from the model's layers."""
        self.model = model
        if saved is not None:
            self.check_saved(Path(saved))
            self.load(Path(saved))
        else:
            self.build()
        return self

    def build(self) -> None:
        """Make the per-layer executables from ``self.model`` (nothing to do for eager)."""

    def save(self, directory: Path) -> None:
        """Write the executables into ``directory`` (already created, empty)."""

    def load(self, directory: Path) -> None:
        """Read executables written by :meth:`save` (the folder was checked by :meth:`check_saved`)."""
        self.build()

    def check_saved(self, directory: Path) -> None:
        if not directory.is_dir():
            raise LayerExitError(f"optimized={str(directory)!r} is invalid: no such folder; build the backend with "
                                 f"model.optimize({self.name!r}) and write it with model.save_optimized(folder)")

    # --- computation ---------------------------------------------------------------------------------
    def run_layer(self, index: int, hidden: torch.Tensor, state) -> torch.Tensor:
        """Layer ``index`` (0-based) for the rows of ``state``: (n, T, H) -> (n, T, H)."""
        return self.model.adapter.run_layer(index, hidden, state.layer_kwargs)

    def run_layer_and_exit(self, index: int, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``index`` and its exit for the rows of ``state``, where :attr:`computes_exits`: hidden
        (n, T, H), exit feature (n, H), exit logits (n, C)."""
        raise NotImplementedError(f"backend {self.name!r} leaves the exits to the host")

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) input of layer 0, where :attr:`computes_embeddings`."""
        raise NotImplementedError(f"backend {self.name!r} leaves the embeddings to the host")

    def host(self):
        """Context around one engine call: limits PyTorch's threads to :attr:`host_threads` for its duration.

        When another runtime computes the layers, PyTorch only does small host work between them, yet after
        each parallel operator its OpenMP threads spin and take the cores the runtime's threads need."""
        if self.host_threads is None or torch.get_num_threads() <= self.host_threads:
            return contextlib.nullcontext()
        return _torch_threads(self.host_threads)

    def describe(self) -> dict:
        """What a report should say about this backend (name, precision, runtime version)."""
        return {"backend": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


@contextlib.contextmanager
def _torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def layer_digest(model) -> str:
    """A digest of the backbone layers' weights: saved executables must come from these exact weights."""
    seen, named = set(), []
    for layer in model.adapter.layers:
        if id(layer) in seen:  # ALBERT shares one layer group between positions
            continue
        seen.add(id(layer))
        named.extend(layer.state_dict().items())
    return weights_digest(named)


def weights_digest(named_tensors) -> str:
    """SHA-1 of (name, tensor) pairs, tensors as float32 bytes."""
    digest = hashlib.sha1()
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def unique_layers(layers: list) -> tuple[list, list[int]]:
    """The distinct modules of ``layers`` and, per layer position, the index of its module among them
    (ALBERT runs one shared layer group at every position)."""
    modules, index_of, positions = [], {}, []
    for layer in layers:
        if id(layer) not in index_of:
            index_of[id(layer)] = len(modules)
            modules.append(layer)
        positions.append(index_of[id(layer)])
    return modules, positions


def write_manifest(directory: Path, backend: LayerBackend, **extra) -> None:
    """``backend.json``: the backend, its settings, versions and the digest of the layers it was built from."""
    model = backend.model
    manifest = {"backend": backend.name, "num_layers": model.config.num_layers, "layer_digest": layer_digest(model),
                "torch": torch.__version__, **backend.describe(), **extra}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: Path, backend: LayerBackend) -> dict:
    """The saved manifest, after checking it is this backend's and was built from this model's layers."""
    path = directory / MANIFEST
    if not path.is_file():
        raise LayerExitError(f"optimized={str(directory)!r} is invalid: it has no {MANIFEST}; write it with "
                             "model.save_optimized(checkpoint)")
    manifest = json.loads(path.read_text())
    if manifest.get("backend") != backend.name:
        raise LayerExitError(f"optimized={str(directory)!r} is invalid: it holds backend "
                             f"{manifest.get('backend')!r}, not {backend.name!r}")
    if manifest.get("layer_digest") != layer_digest(backend.model):
        raise LayerExitError(f"optimized={str(directory)!r} is invalid: it was built from other layer weights than "
                             "this model's; rebuild it with model.optimize(...) and model.save_optimized(...)")
    return manifest


def cpu_flags() -> frozenset[str] | None:
    """The CPU's instruction-set flags as Linux lists them in ``/proc/cpuinfo`` (``avx2``, ``avx512_vnni``...);
    ``None`` where that file cannot be read (other systems). int8 and bf16 speed depend on them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else frozenset(flags)
