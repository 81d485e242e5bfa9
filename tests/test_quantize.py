"""The quantize pass and its ORT CPU lowering: structure, counts, numerics, and user errors.

Tiny built-in models keep this fast; the real MiniLM checks are marked slow.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest

import runtime
from models import registry
from optimizer import optimize
from optimizer.pipeline import PassContext, instantiate, run_pipeline
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from optimizer.progress import Progress
from passes.quantize_rewrite import META
from runtime.errors import PassError

KERNELS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _trace(name: str) -> ir.Model:
    return cached_trace(registry.get(name), Progress())


def _weight_matmuls(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type in ("MatMul", "Gemm")
               and ir.convenience.get_const_tensor(n.inputs[1]) is not None
               and len(n.inputs[1].shape or ()) == 2)


def _ops(path) -> collections.Counter:
    model = ir.load(path / "model.onnx")
    return collections.Counter(n.op_type for n in model.graph)


def _details(art) -> dict:
    return art.manifest["passes"][0]["details"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """fp32 artifacts of the tiny models, the numerical reference."""
    out = tmp_path_factory.mktemp("fp32")
    return {name: optimize(name, passes=["cleanup"], output=out / name) for name in ("tiny-bert", "tiny-llama")}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_dynamic_replaces_every_weight_matmul(name, tmp_path):
    art = optimize(name, passes=["quantize:mode=dynamic"], output=tmp_path / name)
    ops = _ops(art.path)
    quantized = _details(art)["quantized"]
    assert art.manifest["passes"][0]["sites"] == quantized == _weight_matmuls(_trace(name))
    assert sum(ops[k] for k in KERNELS) == quantized
    # What stays float is attention scores and the few outlier-channel side paths.
    float_weights = sum(len(g["float_channels"]) > 0 for g in _details(art)["groups"])
    assert _weight_matmuls(ir.load(art.path / "model.onnx")) == 2 * float_weights
    assert "DequantizeLinear" not in ops


def test_skip_words_leave_sites_float(tmp_path):
    full = optimize("tiny-bert", passes=["quantize"], output=tmp_path / "all")
    head = optimize("tiny-bert", passes=["quantize:skip=first+attention"], output=tmp_path / "skip")
    kept = _details(head)
    assert kept["quantized"] < _details(full)["quantized"]
    assert not any(name.startswith("block.0.") for group in kept["groups"] for name in group["sites"])
    assert kept["by_role"].keys() <= {"mlp", "outside"}
    assert any(name.startswith("block.0.") for name in kept["skipped"])


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("mode", ["dynamic", "w8", "w8a8"])
def test_outputs_stay_close_to_fp32(name, mode, fp32, tmp_path):
    spec = registry.get(name)
    calib = f",calib={name}" if mode == "w8a8" else ""  # static scales need real calibration data
    art = optimize(name, passes=[f"quantize:mode={mode}{calib}"], output=tmp_path / name)
    reference, session = fp32[name].load(), runtime.load(art.path)
    for batch, seq in [(2, 16), (3, 9)]:
        feeds = {k: v.numpy() for k, v in spec.example_inputs(batch, seq).items()}
        want, got = reference.run(feeds), session.run(feeds)
        for out in spec.output_names:
            assert _cosine(want[out], got[out]) >= 0.99, (mode, out, batch, seq)


def test_decisions_are_recorded_target_neutrally():
    """Before lowering: int8 weights behind DequantizeLinear, metadata on each MatMul."""
    model, records = run_pipeline(_trace("tiny-bert"), [PassSpec("quantize", {"mode": "dynamic"})],
                                  PassContext(example_feeds=_example("tiny-bert")))
    marked = [n for n in model.graph if META in n.metadata_props]
    assert len(marked) == records[0].sites
    for node in marked:
        info = json.loads(node.metadata_props[META])
        assert info["mode"] == "dynamic" and info["site"]
        dq = node.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.dtype == ir.DataType.INT8


def test_weight_only_dequantizes_within_half_a_step():
    original = _trace("tiny-llama")
    weights = {n.name: ir.convenience.get_const_tensor(n.inputs[1]).numpy() for n in original.graph
               if n.op_type == "MatMul" and ir.convenience.get_const_tensor(n.inputs[1]) is not None}
    model, _ = run_pipeline(_trace("tiny-llama"), [PassSpec("quantize", {"mode": "w8", "smooth": "false"})], PassContext())
    checked = 0
    for node in model.graph:
        if META not in node.metadata_props or node.op_type != "MatMul":
            continue  # the tied embedding table's DequantizeLinear is covered in test_quantize_embed
        dq = node.inputs[1].producer()
        q, scale = dq.inputs[0].const_value.numpy(), dq.inputs[1].const_value.numpy()
        error = np.abs(q.astype(np.float32) * scale - weights[node.name])
        assert np.all(error <= scale / 2 * (1 + 1e-5) + 1e-12), node.name
        checked += 1
    assert checked == len(weights)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_smoothing_is_exact_in_float(name):
    """Dividing every site input by random factors and scaling the weight rows back changes nothing."""
    import onnxruntime as ort

    from passes.quantize import _groups
    from passes.quantize_rewrite import constant, scaled_input
    from passes.quantize_sites import find_sites

    def run(model):
        data = ir.serde.serialize_model(model).SerializeToString()
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, _example(name))[0]

    model = _trace(name)
    want = run(model)
    sites = find_sites(model, None)
    upstream = {id(s.node): s for s in sites}
    rng = np.random.default_rng(0)
    hows = []
    for x, members in _groups(sites):
        factors = rng.uniform(1.0, 4.0, members[0].weight.shape[0]).astype(np.float32)
        hows.append(scaled_input(model.graph, x, members, factors, upstream))
        for site in members:
            site.weight = site.weight * factors[:, None]
    for site in sites:
        site.node.replace_input_with(1, constant(model.graph, f"{site.node.name}_w", site.weight.astype(np.float32)))
    np.testing.assert_allclose(run(model), want, rtol=1e-3, atol=1e-4)
    if name == "tiny-llama":  # pre-norm RMSNorm weights and the gated up projection take the factors
        assert any(h.startswith("folded into") and "mul" in h for h in hows)
        assert any(h.startswith("folded into node_linear") for h in hows)


def _example(name: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in registry.get(name).example_inputs(2, 16).items()}


def test_unknown_mode_names_the_modes():
    with pytest.raises(PassError, match="dynamic, w8, w4, w8a8"):
        instantiate([PassSpec("quantize", {"mode": "int3"})])


@pytest.mark.parametrize("options, needle", [
    ({"skip": "heads"}, "skip takes words"),
    ({"outliers": "-1"}, "outliers >= 0"),
    ({"mode": "w8a8", "calib": "none"}, "needs calibration data"),
])
def test_bad_options(options, needle):
    with pytest.raises(PassError, match=needle):
        instantiate([PassSpec("quantize", options)])


def test_model_without_matmul_is_refused():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 4]))
    relu = ir.node("Relu", [x], name="relu")
    relu.outputs[0].name, relu.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    relu.outputs[0].shape = ir.Shape(["batch", 4])
    model = ir.Model(ir.Graph([x], [relu.outputs[0]], nodes=[relu], opset_imports={"": 20}), ir_version=10)
    with pytest.raises(PassError, match="no MatMul with constant weights to quantize"):
        run_pipeline(model, [PassSpec("quantize")], PassContext())


def test_static_activations_refuse_example_inputs_only():
    with pytest.raises(PassError, match="give calib=NAME"):
        run_pipeline(_trace("tiny-bert"), [PassSpec("quantize", {"mode": "w8a8"})], PassContext(example_feeds=_example("tiny-bert")))


def test_calibration_data_of_the_wrong_shape_is_refused():
    ctx = PassContext()
    ctx.calibration = {"input_ids": np.zeros((2, 3, 4), np.int64), "attention_mask": np.ones((2, 3), np.int64)}
    with pytest.raises(PassError, match="calibration input 'input_ids' has shape"):
        run_pipeline(_trace("tiny-bert"), [PassSpec("quantize")], ctx)


def test_calibration_given_by_the_caller_is_used():
    ctx = PassContext()
    ctx.calibration = "tiny-bert"
    _, records = run_pipeline(_trace("tiny-bert"), [PassSpec("quantize", {"calib_samples": "8"})], ctx)
    assert any("tiny-bert calibration data (8 samples" in n for n in records[0].details["notes"])


@pytest.mark.slow
def test_minilm_padding_is_respected_after_quantization(tmp_path):
    """A padded batch still gives each sentence about the embedding it has alone (mask live after fusion)."""
    spec = registry.get("minilm")
    tok = spec.tokenizer()
    art = optimize("minilm", passes=["quantize:mode=dynamic,calib=minilm,calib_samples=8"], output=tmp_path / "q")
    assert art.manifest["lowering"]["quantization"]["fusions"]["multi_head_attention"] == 6
    session = art.load()
    texts = ["A short one.", "A considerably longer sentence that needs more tokens than the first one does."]
    batch = tok(texts, padding=True, return_tensors="np")
    together = session.run({k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})["sentence_embedding"]
    alone = tok(texts[:1], return_tensors="np")
    single = session.run({k: alone[k].astype(np.int64) for k in ("input_ids", "attention_mask")})["sentence_embedding"]
    assert _cosine(together[:1], single) > 0.995


def test_unmasked_attention_branch_is_exact():
    """MHA with a mask becomes If(mask all zero, MHA without it, MHA with it): same outputs both ways."""
    import onnxruntime as ort

    from optimizer.lower.ort_fuse import _unmasked_branches

    def value(name, shape):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))

    def build():
        q, k, v, m = value("q", ["b", "s", 8]), value("k", ["b", "s", 8]), value("v", ["b", "s", 8]), value("m", ["b", 1, "s", "s"])
        mha = ir.node("MultiHeadAttention", [q, k, v, None, None, m], attributes={"num_heads": 2},
                      domain="com.microsoft", name="mha")
        mha.outputs[0].name, mha.outputs[0].type = "o", ir.TensorType(ir.DataType.FLOAT)
        graph = ir.Graph([q, k, v, m], [mha.outputs[0]], nodes=[mha], opset_imports={"": 20, "com.microsoft": 1})
        return ir.Model(graph, ir_version=10)

    def run(model, feeds):
        data = ir.serde.serialize_model(model).SerializeToString()
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 5, 8)).astype(np.float32) for n in "qkv"}
    lowered = build()
    assert _unmasked_branches(lowered) == 1
    assert [n.op_type for n in lowered.graph] == ["ReduceL1", "Equal", "If"]
    for mask in (np.zeros((2, 1, 5, 5), np.float32), np.where(rng.random((2, 1, 5, 5)) < 0.3, -1e4, 0).astype(np.float32)):
        np.testing.assert_allclose(run(lowered, {**feeds, "m": mask}), run(build(), {**feeds, "m": mask}), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["dynamic", "w8", "w8a8"])
def test_gemm_whose_output_is_the_graph_output(mode):
    """A Gemm (transB=1, with bias) feeding the graph output directly: quantized, lowered, close."""
    import onnxruntime as ort

    from optimizer.lower.ort import lower_ort

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal(6).astype(np.float32)

    def build():
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 16]))
        wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"), shape=ir.Shape([6, 16]), type=ir.TensorType(ir.DataType.FLOAT))
        bv = ir.Value(name="b", const_value=ir.tensor(b, name="b"), shape=ir.Shape([6]), type=ir.TensorType(ir.DataType.FLOAT))
        gemm = ir.node("Gemm", [x, wv, bv], attributes={"transB": 1}, name="gemm")
        gemm.outputs[0].name, gemm.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
        gemm.outputs[0].shape = ir.Shape(["batch", 6])
        graph = ir.Graph([x], [gemm.outputs[0]], nodes=[gemm], initializers=[wv, bv], opset_imports={"": 20}, name="g")
        return ir.Model(graph, ir_version=10)

    def run(model, feeds):
        data = ir.serde.serialize_model(model).SerializeToString()
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    ctx = PassContext(example_feeds=feeds)
    options = {"mode": mode, **({"calib": "example"} if mode == "w8a8" else {})}
    model, records = run_pipeline(build(), [PassSpec("quantize", options)], ctx)
    assert records[0].sites == 1
    model, lowering = lower_ort(model)
    assert lowering["quantization"]["quantized_matmuls"] == 1
    assert model.graph.outputs[0].name == "y"
    assert _cosine(run(model, feeds), run(build(), feeds)) > 0.99


@pytest.mark.parametrize("mode", ["dynamic", "w8", "w8a8"])
def test_two_matmuls_sharing_one_weight(mode):
    """Two sites reading one weight initializer (prune_tokens source=next's cloned query projection
    does this) each get their own DequantizeLinear, with distinct names, and the graph stays valid."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x1 = ir.Value(name="x1", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 16]))
    x2 = ir.Value(name="x2", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 16]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"), shape=ir.Shape([16, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    a, b = ir.node("MatMul", [x1, wv], name="a"), ir.node("MatMul", [x2, wv], name="b")
    for node, name in ((a, "ya"), (b, "yb")):
        node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = ir.Shape(["batch", 8])
    graph = ir.Graph([x1, x2], [a.outputs[0], b.outputs[0]], nodes=[a, b], initializers=[wv], opset_imports={"": 20}, name="g")
    feeds = {"x1": rng.standard_normal((4, 16)).astype(np.float32), "x2": rng.standard_normal((4, 16)).astype(np.float32)}
    options = {"mode": mode, **({"calib": "example"} if mode == "w8a8" else {})}
    model, records = run_pipeline(ir.Model(graph, ir_version=10), [PassSpec("quantize", options)], PassContext(example_feeds=feeds))
    assert records[0].sites == 2
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    names = [o for n in proto.graph.node for o in n.output]
    assert len(names) == len(set(names))
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert _cosine(got[0], feeds["x1"] @ w) > 0.99 and _cosine(got[1], feeds["x2"] @ w) > 0.99


@pytest.mark.slow
def test_smollm2_dynamic_artifact_loads_and_runs(tmp_path):
    """Grouped-query attention is left unfused: a half-fused SDPA node would not load in ORT."""
    import onnx_ir as ir

    import optimizer
    import runtime

    art = optimizer.optimize("smollm2-135m", passes=["quantize:mode=dynamic,calib_samples=4"], output=tmp_path / "q")
    assert not any(n.domain.startswith("ai.onnxruntime") for n in ir.load(art.path / "model.onnx").graph)
    ids = np.array([[1, 504, 3858, 282, 4649]])
    logits = runtime.load(art.path).run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert logits.shape == (1, 5, 49152) and np.isfinite(logits).all()
