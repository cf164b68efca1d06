"""Layer backends (eager, bf16, int8, ONNX Runtime fp32 and int8): the engine on each backend.

Each backend must (1) compute what the eager layers compute, within its precision; (2) keep the engine and
the simulator equal when the simulator's logits come from the same backend (int8 against the int8
simulator, not fp32); (3) survive row dropping and length trimming; (4) save and load.
"""

from __future__ import annotations

import sys

import pytest
import torch

from layerexit.errors import LayerExitError
from layerexit.evaluation.simulate import simulate
from layerexit.execution.torch_backends import FusedEncoderLayer, PackedLinear, bf16_prepack_available
from layerexit.rules import make_rule
from tiny import ARCHS, make_batch, make_model, row

pytest.importorskip("onnxruntime")
needs_onednn = pytest.mark.skipif(not bf16_prepack_available(),
                                  reason="no oneDNN bf16 kernels here (this torch build or an AVX2-only CPU)")

#: backend -> (options, max |logit - eager logit| allowed on the tiny models)
BACKENDS = {
    "eager": ({}, 0.0),
    "bf16": ({}, 0.2),
    "int8": ({}, 0.2),
    "onnx": ({"exporter": "torchscript"}, 1e-4),
    "onnx-int8": ({"exporter": "torchscript"}, 0.2),
}
CASES = [("bert", "mean"), ("mpnet", "pooler"), ("distilbert", "cls")]
N = 12


@pytest.fixture(scope="module")
def optimized():
    """(arch, feature, backend) -> a float32 tiny model optimized with that backend (built once)."""
    cache = {}

    def get(arch, feature, backend):
        if (arch, feature, backend) not in cache:
            model = make_model(arch, feature, double=False)
            options, _ = BACKENDS[backend]
            model.optimize(backend, **options)
            cache[arch, feature, backend] = model
        return cache[arch, feature, backend]

    return get


def _inputs(arch, batch=N, seed=3):
    b = make_batch(arch, batch=batch, seed=seed)
    return {k: v for k, v in b.items() if v is not None}


@pytest.mark.parametrize("arch,feature", CASES, ids=[f"{a}-{f}" for a, f in CASES])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_logits_close_to_eager(optimized, arch, feature, backend):
    model = optimized(arch, feature, backend)
    eager = make_model(arch, feature, double=False)
    inputs = _inputs(arch)
    with torch.no_grad():
        got, want = model(**inputs), eager(**inputs)  # (L, N, C)
    assert got.dtype == torch.float32  # heads and rules always see float32 logits
    diff = float((got - want).abs().max())
    assert diff <= BACKENDS[backend][1], diff
    if backend in ("bf16", "int8", "onnx-int8"):
        assert diff > 0, "a reduced-precision backend returned the eager logits exactly: it did not run"


@pytest.mark.parametrize("arch,feature", CASES, ids=[f"{a}-{f}" for a, f in CASES])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_engine_equals_simulator_on_the_same_backend_row_by_row(optimized, arch, feature, backend):
    """One row at a time the engine and the logit cache run identical shapes, so they agree exactly on
    every backend, int8 included (its activation scales are then the same too)."""
    model = optimized(arch, feature, backend)
    inputs = _inputs(arch)
    rule = make_rule("maxprob", threshold=0.8)
    exits = set()
    for i in range(N):
        one = row(inputs, i)
        with torch.no_grad():
            reference = model(**one)  # (L, 1, C) on this backend
        sim = simulate(make_rule("maxprob", threshold=0.8), reference)
        out = model.early_exit(**one, rule=rule)
        assert torch.equal(out.exit_layer, sim.exit_layer), i
        torch.testing.assert_close(out.logits, reference[out.exit_layer - 1, 0], rtol=0, atol=0)
        exits.add(int(out.exit_layer))
    assert len(exits) > 1, "every row exited at the same layer: the test does not exercise skipping"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_batched_engine_drops_rows_and_trims_length_on_every_backend(optimized, backend):
    """Rows leave and padding columns are cut between layers; each backend must accept the smaller shapes
    and give every row (almost) the exit and prediction the batched simulator gives on that backend."""
    model = optimized("bert", "cls", backend)
    inputs = _inputs("bert", batch=N, seed=5)
    with torch.no_grad():
        reference = model(**inputs)  # (L, N, C)
    rule = make_rule("maxprob", threshold=0.8)
    sim = simulate(make_rule("maxprob", threshold=0.8), reference)
    out = model.early_exit(**inputs, rule=rule)
    assert len(set(out.exit_layer.tolist())) > 1
    same = int((out.exit_layer == sim.exit_layer).sum())
    if backend in ("eager", "onnx"):  # float32: only summation order differs between shapes
        torch.testing.assert_close(out.logits, reference[out.exit_layer - 1, torch.arange(N)], rtol=1e-4, atol=1e-4)
        assert same == N
    else:  # bf16 rounding and int8 per-batch activation scales depend on the batch's shape
        assert same >= N - 2, f"only {same}/{N} rows exit where the {backend} simulator says"


def test_bf16_layers_keep_the_checkpoint_weights_and_hidden_dtype(optimized):
    model = optimized("bert", "cls", "bf16")
    assert next(model.backbone.parameters()).dtype == torch.float32  # the backend runs copies
    query = model.backend.layers[0].qkv  # query, key and value stacked (FusedEncoderLayer)
    if bf16_prepack_available():
        assert isinstance(query, PackedLinear) and query.packed_weight.dtype == torch.bfloat16
        assert model.backend.describe()["linear_weights"] == "oneDNN prepacked"
    else:  # an AVX2-only CPU: plain bf16 linears, which still run (emulated)
        assert type(query) is torch.nn.Linear and query.weight.dtype == torch.bfloat16
        assert model.backend.describe()["linear_weights"] == "plain"
    state = model.start(**_inputs("bert"))
    assert state.hidden.dtype == torch.bfloat16
    assert model.exit_feature(state).dtype == torch.float32


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 384), (4, 384), (3, 7, 384)])
def test_prepacked_bf16_linear_equals_the_plain_bf16_linear(shape):
    """The weight packed once gives the same numbers as ``F.linear``, which packs it at every call."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 96).to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), rtol=0, atol=0)
        strided = x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() == 3 else x.t().contiguous().t()
        assert not strided.is_contiguous() or x.shape[0] == 1
        # a strided input takes another F.linear path (bf16 rounding differs by an ulp); the packed one is stable
        torch.testing.assert_close(packed(strided), packed(x), rtol=0, atol=0)
        torch.testing.assert_close(packed(strided), linear(strided), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_bf16_prepack_can_be_turned_off():
    model = make_model("bert", "cls", double=False)
    backend = model.optimize("bf16", prepack=False)
    assert type(backend.layers[0].qkv) is torch.nn.Linear
    assert backend.describe()["linear_weights"] == "plain"
    packed = make_model("bert", "cls", double=False)
    packed.load_state_dict(model.state_dict())
    packed.optimize("bf16")
    assert packed.backend.describe()["linear_weights"] == "oneDNN prepacked"
    intermediate = packed.backend.layers[0].intermediate  # dense + exact GELU: one fused oneDNN call
    assert intermediate.dense.activation == "gelu" and isinstance(intermediate.intermediate_act_fn, torch.nn.Identity)
    assert packed.backend.layers[0].output_dense.activation == "none"
    inputs = _inputs("bert")
    # the fused GELU runs on the float32 accumulator, the plain path on the bf16-rounded linear output
    torch.testing.assert_close(packed(**inputs), model(**inputs), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_encoder_layer_computes_what_the_hugging_face_layer_computes(arch):
    """BERT-style layers (BERT, RoBERTa, DistilBERT) get the fused inference layer, exactly equal in float32
    on padded and unpadded rows; other architectures keep their own modules."""
    model = make_model(arch, "cls", double=False)
    layer = model.adapter.layers[0]
    if arch not in ("bert", "roberta", "distilbert"):
        assert not FusedEncoderLayer.supports(layer)
        return
    assert FusedEncoderLayer.supports(layer)
    fused = FusedEncoderLayer(layer).eval()
    padded, unpadded = make_batch(arch, batch=5, seed=5), make_batch(arch, batch=3, min_len=9)  # max_len 9
    for batch in (padded, unpadded):  # SDPA's bool mask, then rows of full length (no mask)
        state = model.start(**{k: v for k, v in batch.items() if v is not None})
        with torch.no_grad():
            want = model.adapter.call_layer(layer, state.hidden, state.layer_kwargs)
            got = model.adapter.call_layer(fused, state.hidden, state.layer_kwargs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fused_encoder_layer_only_where_it_is_exact():
    model = make_model("bert", "cls", double=False)
    layer = model.adapter.layers[0]
    layer.attention.self.config._attn_implementation = "eager"  # another attention kernel: keep the module
    try:
        assert not FusedEncoderLayer.supports(layer)
    finally:
        layer.attention.self.config._attn_implementation = "sdpa"
    layer.chunk_size_feed_forward = 4
    assert not FusedEncoderLayer.supports(layer)


def test_bf16_fused_layers_can_be_turned_off_and_give_the_same_answers():
    fused, plain = make_model("bert", "cls", double=False), make_model("bert", "cls", double=False)
    assert fused.optimize("bf16").describe()["layer_forward"].startswith("fused")
    assert plain.optimize("bf16", fuse=False).describe()["layer_forward"] == "Hugging Face modules"
    assert type(plain.backend.layers[0]).__name__ == "BertLayer"
    inputs = _inputs("bert")
    with torch.no_grad():  # one stacked product instead of three may round differently in bf16
        torch.testing.assert_close(fused(**inputs), plain(**inputs), rtol=0.02, atol=0.02)


@needs_onednn
def test_fused_gelu_equals_linear_then_gelu_up_to_bf16_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 256).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = PackedLinear(linear, activation="gelu")(x)
        reference = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), linear.weight.float(),
                                                                        linear.bias.float()))
        torch.testing.assert_close(fused.float(), reference, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="activation='relu'"):
        PackedLinear(linear, activation="relu")


def test_albert_shared_layer_is_exported_once_with_the_dynamo_exporter():
    """The default (torch.export-based) exporter; ALBERT's one shared layer group gives one graph."""
    model = make_model("albert", "pooler", double=False)
    eager = make_model("albert", "pooler", double=False)
    backend = model.optimize("onnx")
    assert backend.exporter == "dynamo" and len(backend._files) == 1 and len(backend.sessions) == 4
    assert not backend.computes_exits  # one graph for four positions: each position's head runs on the host
    inputs = _inputs("albert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), eager(**inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_onnx_graphs_carry_their_exit_heads_in_float32(optimized, backend):
    """One runtime call per layer and exit: the graph returns the hidden states, the exit feature and the
    logits; the host heads are not called; onnx-int8 quantizes the layer's matrices, not the head's."""
    import onnx

    model = optimized("bert", "mean", backend)
    assert model.backend.computes_exits
    graph = onnx.load_from_string(model.backend._graph_bytes["layer_0.onnx"]).graph
    assert [o.name for o in graph.output] == ["output", "feature", "logits"]
    calls = []
    hook = model.exits[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = model.early_exit(**_inputs("bert"), rule=make_rule("full"))
    finally:
        hook.remove()
    assert calls == [] and out.logits.dtype == torch.float32
    ops = [node.op_type for node in graph.node]
    if backend == "onnx-int8":
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops  # the layer is quantized
        from layerexit.execution.onnx import _exit_nodes
        import tempfile, pathlib

        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "layer.onnx"
            path.write_bytes(model.backend._graph_bytes["layer_0.onnx"])
            head_ops = {n.op_type for n in graph.node if n.name in set(_exit_nodes(path))}
        assert head_ops and not head_ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}


@pytest.mark.parametrize("arch,feature", [("bert", "mean"), ("mpnet", "pooler")])
def test_onnx_graphs_take_a_mask_that_masks_nothing_for_unpadded_rows(optimized, monkeypatch, arch, feature):
    """Without padding the adapter builds no attention mask; the graph then gets one that masks nothing, in
    its own layout (all True for BERT's boolean mask, all 0 for MPNet's additive one)."""
    model, eager = optimized(arch, feature, "onnx"), make_model(arch, feature, double=False)
    dtypes = {spec["name"]: spec["dtype"] for spec in model.backend._arguments}
    assert dtypes["attention_mask"] == ("bool" if arch == "bert" else "float32")
    inputs = _inputs(arch)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    assert model.adapter.prepare(torch.zeros(2, 3, model.config.hidden_size), torch.ones(2, 3))["attention_mask"] is None
    prepared, prepare = [], model.adapter.prepare
    monkeypatch.setattr(model.adapter, "prepare", lambda *args: prepared.append(1) or prepare(*args))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), eager(**inputs), rtol=1e-4, atol=1e-4)
    # BERT's graphs take the mask alone, so nothing is prepared on the host; MPNet's also take a position bias
    assert len(prepared) == (0 if arch == "bert" else 1)


def test_graphs_saved_by_earlier_versions_still_load(tmp_path):
    """Earlier versions saved graphs that take the 0/1 mask (n, T), build the attention mask inside and return
    the hidden states only; they still load, with the exit heads on the host."""
    import json

    from layerexit.execution.onnx import _export_graph

    model, eager = make_model("bert", "mean", double=False), make_model("bert", "mean", double=False)
    adapter = model.adapter

    class OldGraph(torch.nn.Module):  # what an earlier version exported for each layer
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden, mask):
            return adapter.call_layer(self.layer, hidden, adapter.prepare(hidden, mask))

    model.optimize("onnx", exporter="torchscript")
    folder = model.save_optimized(tmp_path)
    hidden, mask = torch.randn(2, 5, model.config.hidden_size), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    for i, layer in enumerate(adapter.layers):
        _export_graph(OldGraph(layer).eval(), (hidden, mask), ["hidden", "mask"],
                      [["rows", "length", hidden.shape[-1]], ["rows", "length"]], folder / f"layer_{i}.onnx",
                      "torchscript")
    manifest = json.loads((folder / "backend.json").read_text())
    for key in ("arguments", "exit_digest", "exit_heads", "embeddings"):
        manifest.pop(key, None)
    (folder / "backend.json").write_text(json.dumps(manifest))
    (folder / "embeddings.onnx").unlink()  # nor did they export the embeddings

    loaded = make_model("bert", "mean", double=False)
    backend = loaded.optimize("onnx", saved=folder)
    assert not backend.computes_exits and backend._takes_mask and not backend.computes_embeddings
    inputs = _inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), eager(**inputs), rtol=1e-4, atol=1e-4)
        loaded.early_exit(**inputs, rule=make_rule("maxprob", threshold=0.6))


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_embeddings_graph_equals_the_backbones_embeddings(optimized, arch):
    """Text models start in one ONNX Runtime call: the embeddings graph gives the adapter's layer-0 input
    (token types, RoBERTa's and MPNet's padding-aware positions, ALBERT's projection included), for any rows
    and length; without token types it embeds type 0, as the backbone does."""
    cached = dict(CASES)  # models the other tests export with the default exporter; the rest: the quick one
    if arch in cached:
        model = optimized(arch, cached[arch], "onnx")
    else:
        model = make_model(arch, "cls", double=False)
        model.optimize("onnx", exporter="torchscript")
    backend = model.backend
    assert backend.computes_embeddings and backend.describe()["embeddings"] == "graph"
    for batch, length in ((5, 9), (1, 3)):
        inputs = make_batch(arch, batch=batch, max_len=length, seed=batch)
        ids, types = inputs["input_ids"], inputs["token_type_ids"]
        with torch.no_grad():
            want = model.adapter.embed(ids, types)  # (B, T, H) on the host
            torch.testing.assert_close(backend.embed(ids, types), want, rtol=1e-5, atol=1e-5)
            if types is not None:
                torch.testing.assert_close(backend.embed(ids, None), model.adapter.embed(ids, None), rtol=1e-5,
                                           atol=1e-5)


@pytest.mark.parametrize("changed", ["exits.2.linear.bias", "backbone.embeddings.word_embeddings.weight"])
def test_saved_graphs_refuse_retrained_heads_or_embeddings(tmp_path, optimized, changed):
    model = optimized("bert", "mean", "onnx")
    folder = model.save_optimized(tmp_path)
    other = make_model("bert", "mean", double=False)  # same layers (seed), heads or embeddings changed after saving
    with torch.no_grad():
        other.get_parameter(changed).add_(0.5)
    with pytest.raises(LayerExitError, match="other exit heads or embeddings than this model's"):
        other.optimize("onnx", saved=folder)


def test_saved_graphs_with_host_heads_accept_retrained_heads_but_not_embeddings(tmp_path):
    """ALBERT's shared layer graph leaves the heads to the host: retrained heads load; changed embeddings (in
    the embeddings graph) do not."""
    model = make_model("albert", "pooler", double=False)
    model.optimize("onnx", exporter="torchscript")
    folder = model.save_optimized(tmp_path)
    retrained = make_model("albert", "pooler", double=False)
    with torch.no_grad():
        retrained.exits[1].linear.bias.add_(0.5)
    assert not retrained.optimize("onnx", saved=folder).computes_exits
    other = make_model("albert", "pooler", double=False)
    with torch.no_grad():
        other.backbone.embeddings.word_embeddings.weight.add_(0.5)
    with pytest.raises(LayerExitError, match="other exit heads or embeddings"):
        other.optimize("onnx", saved=folder)


def test_optimize_back_to_eager_and_bad_names():
    model = make_model("bert", "cls", double=False)
    inputs = _inputs("bert")
    with torch.no_grad():
        want = model(**inputs)
        model.optimize("int8")
        assert not torch.equal(model(**inputs), want)
        assert model.optimize("eager").name == "eager"
        assert torch.equal(model(**inputs), want)
    with pytest.raises(LayerExitError, match=r"backend='int4' is invalid: choose one of bf16, eager, int8, onnx"):
        model.optimize("int4")
    with pytest.raises(LayerExitError, match="exporter='jit' is invalid"):
        model.optimize("onnx", exporter="jit")


def test_layer_sessions_default_to_their_own_pools_without_spinning(optimized):
    model = optimized("bert", "mean", "onnx")
    assert model.backend.describe()["thread_pool"] == "session"
    options = model.backend.sessions[0].get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(LayerExitError, match=r"thread_pool='global' is invalid: choose 'session'"):
        make_model("bert", "mean", double=False).optimize("onnx", thread_pool="global")
    from layerexit.execution import own_process_options  # what evaluate, benchmark and serve pass

    assert own_process_options("onnx-int8") == {"thread_pool": "shared"} and own_process_options("int8") == {}


def test_host_work_of_onnx_backends_runs_on_one_torch_thread_and_restores_the_setting(optimized, monkeypatch):
    """PyTorch's spinning threads would take the cores ONNX Runtime's threads need: the engine runs the host
    work (the rule, the engine's bookkeeping) on one torch thread while an ONNX backend computes the embeddings,
    the layers and their exits."""
    model = optimized("bert", "mean", "onnx")
    seen = []
    step = model.run_layer_and_exit
    monkeypatch.setattr(model, "run_layer_and_exit", lambda *args: seen.append(torch.get_num_threads()) or step(*args))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    hook = model.backbone.embeddings.register_forward_hook(lambda *_: seen.append("host embeddings"))
    try:
        with torch.no_grad():
            model(**_inputs("bert"))
            model.early_exit(**_inputs("bert"), rule=make_rule("maxprob", threshold=0.9))
        assert len(seen) > model.config.num_layers and set(seen) == {1} and torch.get_num_threads() == 2
        eager = optimized("bert", "mean", "eager")
        eager_seen = []
        handle = eager.backbone.embeddings.register_forward_hook(lambda *_: eager_seen.append(torch.get_num_threads()))
        with torch.no_grad():
            eager(**_inputs("bert"))
        handle.remove()
        assert eager_seen == [2]  # eager layers keep torch's own setting
    finally:
        hook.remove()
        torch.set_num_threads(previous)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_layer_arguments_are_built_once_per_row_set(optimized, monkeypatch, backend):
    """The attention mask in the attention implementation's layout (and the ONNX graphs' other inputs) is built
    on the host once for each set of running rows, not in every layer: the eager layers and the ONNX graphs
    take it as an argument. BERT's graphs take nothing else, so the ONNX backend skips it for row sets
    without padding (their mask masks nothing)."""
    from layerexit.backbones import EncoderState

    model = optimized("bert", "mean", backend)
    calls, row_sets = [], []  # row_sets: whether each new row set is padded

    def spy_select(self, rows):
        state = select(self, rows)
        row_sets.append(not bool(state.attention_mask.all()))
        return state

    prepare, select = model.adapter.prepare, EncoderState.select
    monkeypatch.setattr(model.adapter, "prepare", lambda h, m: calls.append(h.shape) or prepare(h, m))
    monkeypatch.setattr(EncoderState, "select", spy_select)
    inputs = _inputs("bert")
    assert not bool(inputs["attention_mask"].all())  # the first row set is padded
    with torch.no_grad():
        model.early_exit(**inputs, rule=make_rule("full"))  # every layer, the same rows
        assert len(calls) == 1 and not row_sets
        calls.clear()
        model.early_exit(**inputs, rule=make_rule("maxprob", threshold=0.6))
    built = len(row_sets) if backend == "eager" else sum(row_sets)
    assert len(row_sets) >= 1 and len(calls) == 1 + built, (calls, row_sets)


SHARED_POOL_SCRIPT = """
import warnings, torch, onnxruntime as ort
from tiny import make_model, make_batch
model = make_model("bert", "mean", double=False)
model.optimize("onnx", exporter="torchscript", thread_pool="shared", threads=2)
assert model.backend.describe()["thread_pool"] == "shared"
b = {k: v for k, v in make_batch("bert", batch=5, seed=3).items() if v is not None}
with torch.no_grad():
    shared = model(**b)
other = make_model("bert", "mean", double=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    other.optimize("onnx", exporter="torchscript", thread_pool="shared", threads=3)
assert any("has 2 threads" in str(w.message) for w in caught), [str(w.message) for w in caught]
# a later backend asking for its own pools must still run: the process-wide pool exists now
third = make_model("bert", "mean", double=False)
third.optimize("onnx", exporter="torchscript")
assert third.backend.describe()["thread_pool"] == "shared"
eager = make_model("bert", "mean", double=False)
with torch.no_grad():
    torch.testing.assert_close(shared, eager(**b), rtol=0, atol=1e-4)
    torch.testing.assert_close(third(**b), shared, rtol=0, atol=1e-5)
print("ok")
"""


JOIN_POOL_SCRIPT = """
import onnxruntime as ort, torch
from tiny import make_model, make_batch
ort.set_global_thread_pool_sizes(2, 1)  # other code of the process made the shared pool first
model = make_model("bert", "mean", double=False)
model.optimize("onnx", exporter="torchscript", thread_pool="shared")
assert model.backend.describe()["thread_pool"] == "shared"
b = {k: v for k, v in make_batch("bert", batch=5, seed=3).items() if v is not None}
with torch.no_grad():
    torch.testing.assert_close(model(**b), make_model("bert", "mean", double=False)(**b), rtol=0, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("script", [SHARED_POOL_SCRIPT, JOIN_POOL_SCRIPT], ids=["made-here", "made-elsewhere"])
def test_shared_thread_pool_is_made_once_and_every_later_session_uses_it(tmp_path, script):
    """ONNX Runtime makes the process-wide pool once and then refuses per-session pools, so this runs in a
    fresh interpreter (the test process keeps per-session pools)."""
    import os
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_training_refuses_a_quantized_backend():
    model = make_model("bert", "cls", double=False)
    model.optimize("int8")
    model.train()
    with pytest.raises(LayerExitError, match="backend='int8' is for inference"):
        model(**_inputs("bert"))


def test_missing_onnxruntime_gives_a_clear_error(monkeypatch):
    model = make_model("bert", "cls", double=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(LayerExitError, match=r"ONNX Runtime is not installed; install it with .*layerexit\[onnx\]"):
        model.optimize("onnx", exporter="torchscript")


@pytest.mark.parametrize("backend", ["int8", "onnx", "onnx-int8"])
def test_save_and_load_optimized(tmp_path, optimized, backend):
    model = optimized("bert", "mean", backend)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    folder = model.save_optimized(checkpoint)
    assert folder == checkpoint / "optimized" / backend and (folder / "backend.json").is_file()
    from layerexit.model import MultiExitModel

    loaded = MultiExitModel.from_pretrained(checkpoint)
    loaded.optimize(backend, saved=checkpoint)
    inputs = _inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)


def test_int8_folders_from_before_the_fused_layers_still_load(tmp_path):
    """A folder written by the int8 backend before it fused BERT-style layers holds each module's linears
    (query, key, value apart) and no "fused" entry: it loads as modules and runs the int8 weights it holds."""
    import json

    from layerexit.model import MultiExitModel

    model = make_model("bert", "cls", double=False)
    model.optimize("int8", fuse=False)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    folder = model.save_optimized(checkpoint)
    manifest = json.loads((folder / "backend.json").read_text())
    assert manifest.pop("fused") is False
    manifest.pop("layer_forward")
    (folder / "backend.json").write_text(json.dumps(manifest))
    loaded = MultiExitModel.from_pretrained(checkpoint)
    backend = loaded.optimize("int8", saved=checkpoint)  # default options ask for fused layers
    assert backend.describe()["layer_forward"] == "Hugging Face modules"
    inputs = _inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)
        fused = make_model("bert", "cls", double=False)
        assert fused.optimize("int8").describe()["layer_forward"].startswith("fused")
        torch.testing.assert_close(fused(**inputs), model(**inputs), rtol=1e-4, atol=1e-4)  # same int8 products
    manifest["fused"] = True  # a manifest that does not match the weights: a clear error, not a KeyError
    (folder / "backend.json").write_text(json.dumps(manifest))
    with pytest.raises(LayerExitError, match="no int8 weights for '0.qkv'.*rebuild it"):
        MultiExitModel.from_pretrained(checkpoint).optimize("int8", saved=checkpoint)


def test_saved_backend_refuses_other_weights_and_missing_folders(tmp_path):
    model = make_model("bert", "cls", double=False)
    model.optimize("int8")
    folder = model.save_optimized(tmp_path)
    other = make_model("bert", "cls", seed=9, double=False)
    with pytest.raises(LayerExitError, match="built from other layer weights"):
        other.optimize("int8", saved=folder)
    with pytest.raises(LayerExitError, match="no such folder"):
        other.optimize("int8", saved=tmp_path / "nowhere")
    assert model.optimize("bf16").saves_files is False and model.save_optimized(tmp_path) is None


def test_logit_cache_is_collected_with_the_serving_backend(optimized):
    """Calibration per backend: collect_logits runs through the backend, so simulated operating points are
    those of the backend that serves."""
    from layerexit.evaluation.cache import collect_logits

    model = optimized("bert", "cls", "int8")
    eager = make_model("bert", "cls", double=False)
    encoded = _TinyEncoded(_inputs("bert", batch=6))
    cache = collect_logits(model, encoded, batch_size=1, progress=False)
    for i in range(6):
        with torch.no_grad():
            want = model(**row(encoded.batch, i))[:, 0]  # (L, C) int8
            fp32 = eager(**row(encoded.batch, i))[:, 0]
        torch.testing.assert_close(cache.logits[:, i], want, rtol=0, atol=0)
        assert not torch.equal(cache.logits[:, i], fp32)


class _TinyEncoded:
    """The slice of ``layerexit.data.Encoded`` that collect_logits reads, over a pre-made batch."""

    def __init__(self, batch):
        self.batch = batch
        lengths = batch["attention_mask"].sum(1).tolist()
        self.features = {"input_ids": [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]}
        self.labels = [0] * len(lengths)

    def __getitem__(self, i):
        return row(self.batch, i)

    def __len__(self):
        return len(self.labels)

    def collate(self, items):
        assert len(items) == 1
        return items[0]


def test_benchmark_cli_times_a_backend_against_its_own_full_model(tmp_path, capsys):
    """`--backend` on the CLI; the saved optimized/<backend>/ beside the checkpoint is used when present."""
    import json

    from transformers import AutoTokenizer

    from layerexit.cli.main import main
    from layerexit.model import MultiExitModel
    from tiny_text import write_backbone, write_csv

    write_backbone(tmp_path / "backbone", layers=3)
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "test.csv", 24, seed=3, label_words=True)
    model = MultiExitModel.from_backbone(str(tmp_path / "backbone"), 2, label_names=["negative", "positive"])
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "backbone"))
    model.optimize("onnx-int8", exporter="torchscript")
    model.save_optimized(checkpoint)
    for backend in ("int8", "onnx-int8"):
        out = tmp_path / f"{backend}.json"
        code = main(["benchmark", "--model", str(checkpoint), "--data", str(data), "--backend", backend,
                     "--param", "threshold=0.6", "--batch-sizes", "1,4", "--examples", "8", "--rounds", "1",
                     "--output", str(out)])
        assert code == 0
        entries = json.loads(out.read_text())["measured"]
        assert [e["backend"] for e in entries] == [backend, backend] and all(e["seconds_plain"] > 0 for e in entries)
    with pytest.raises(SystemExit) as refused:  # argparse's own error, naming the option and its choices
        main(["benchmark", "--model", str(checkpoint), "--data", str(data), "--backend", "int4"])
    assert refused.value.code == 2
    assert "argument --backend: invalid choice: 'int4'" in capsys.readouterr().err


def test_onnx_int8_reduce_range_keeps_cpus_without_vnni_accurate():
    """7-bit weights avoid the 16-bit saturation of ONNX Runtime's int8 kernels on CPUs without VNNI (on the
    tiny BERT, full-range weights on an AVX2 CPU moved a logit by 0.29; 7-bit by 0.03); on by default there."""
    from layerexit.execution.onnx import cpu_has_vnni

    model = make_model("bert", "mean", double=False)
    backend = model.optimize("onnx-int8", exporter="torchscript", reduce_range=True)
    assert "7-bit" in backend.describe()["precision"]
    eager = make_model("bert", "mean", double=False)
    inputs = _inputs("bert")
    with torch.no_grad():
        diff = float((model(**inputs) - eager(**inputs)).abs().max())
    assert 0 < diff <= 0.1, diff
    default = make_model("bert", "mean", double=False).optimize("onnx-int8", exporter="torchscript")
    assert default.reduce_range is (not cpu_has_vnni())
