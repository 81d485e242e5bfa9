"""Weight-only quantize modes (w8, w4, block-wise) and their MatMulNBits lowering.

Structure (INT4 / block-wise DequantizeLinear at opset 21), numerics (the decision graph on ORT
equals a numpy-dequantized reference; the lowering equals the decision), counts, and the
errors a user can hit. Tiny built-in models and hand-made graphs keep it fast.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from models import registry
from optimizer.lower.ort_wonly import lower_weight_only
from optimizer.pipeline import PassContext, instantiate, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from passes import quantize_block as qb
from passes.quantize_rewrite import META
from runtime.errors import PassError


def _trace(name: str) -> ir.Model:
    return cached_trace(registry.get(name), Progress())


def _feeds(name: str, batch: int = 2, seq: int = 16) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in registry.get(name).example_inputs(batch, seq).items()}


def _run(model: ir.Model, feeds, optimize: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:  # ORT would otherwise fuse DequantizeLinear + MatMul into its int8-activation kernel
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _quantize(name: str, options: dict, calibration=None) -> tuple[ir.Model, dict]:
    ctx = PassContext(example_feeds=_feeds(name), calibration=calibration)
    model, records = run_pipeline(_trace(name), [PassSpec("quantize", options)], ctx)
    return model, records[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _site_dqs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    return [(n, n.inputs[1].producer()) for n in model.graph if n.op_type == "MatMul" and META in n.metadata_props]


def test_w4_block_decision_structure_and_counts():
    model, record = _quantize("tiny-llama", {"mode": "w4", "block": "32"})
    assert model.opset_imports[""] == 21
    pairs = _site_dqs(model)
    assert record.details["quantized"] == len(pairs) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert record.sites == 15  # and the tied embedding table
    for matmul, dq in pairs:
        q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
        k, n = q.shape
        assert q.dtype == ir.DataType.INT4
        assert dq.attributes.get_int("axis") == 0 and dq.attributes.get_int("block_size") == 32
        assert tuple(scale.shape) == (-(-k // 32), n)
        assert -8 <= q.numpy().min() and q.numpy().max() <= 7
        info = json.loads(matmul.metadata_props[META])
        assert (info["mode"], info["bits"], info["block_size"]) == ("w4", 4, 32)
    assert any("opset lifted from 20 to 21" in note for note in record.details["notes"])


@pytest.mark.parametrize("options", [{"mode": "w4", "block": "32"}, {"mode": "w4"}, {"mode": "w8", "block": "64"}])
def test_decision_equals_numpy_dequantized_reference(options):
    """The decision graph on ORT computes exactly the float model with numpy-dequantized weights."""
    model, _ = _quantize("tiny-llama", options)
    fmt = qb.Format(4 if options["mode"] == "w4" else 8, int(options.get("block", 0)))
    feeds = _feeds("tiny-llama", 3, 11)
    want = _run(model, feeds)
    reference = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for node in list(reference.graph):
        if node.op_type != "DequantizeLinear" or META in node.metadata_props:
            continue  # the table's DequantizeLinear stays: it is checked in test_quantize_embed
        q, scale = (v.const_value.numpy() for v in node.inputs[:2])
        weight = ir.Value(name=f"{node.name}_float", const_value=ir.tensor(qb.dequantize(q, scale, fmt)))
        reference.graph.register_initializer(weight)
        node.outputs[0].replace_all_uses_with(weight)
        reference.graph.remove(node, safe=True)
    np.testing.assert_array_equal(_run(reference, feeds), want)


def test_lowering_equals_the_decision():
    """MatMulNBits (float compute) and GatherBlockQuantized reproduce the decision graph."""
    model, _ = _quantize("tiny-llama", {"mode": "w4", "block": "32"})
    feeds = _feeds("tiny-llama", 2, 9)
    want = _run(model, feeds)
    counts = lower_weight_only(model, accuracy_level=1)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert counts == {"MatMulNBits": 15, "GatherBlockQuantized": 1} == {k: ops[k] for k in counts}
    assert ops["DequantizeLinear"] == 0 and ops["MatMul"] == 4  # only attention's two per block
    np.testing.assert_allclose(_run(model, feeds, optimize=True), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, floor", [("w8", 0.9995), ("w4", 0.98)])
def test_lossy_within_budget(mode, floor):
    """End to end through the artifact: logits stay this close to fp32 on tiny-llama (random weights)."""
    from optimizer import optimize

    model, _ = _quantize("tiny-llama", {"mode": mode, "block": "32" if mode == "w4" else "0"})
    art = optimize("tiny-llama", passes=[f"quantize:mode={mode}" + (",block=32" if mode == "w4" else "")])
    feeds = _feeds("tiny-llama", 2, 16)
    assert _cosine(art.load().run(feeds)["logits"], _run(_trace("tiny-llama"), feeds)) >= floor
    assert _cosine(_run(model, feeds), _run(_trace("tiny-llama"), feeds)) >= floor


def test_block_math():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 6)).astype(np.float32)  # K = 40: the last block of 32 is short
    fmt = qb.Format(4, 32)
    q, scale, offset = qb.quantize(w, fmt)
    assert offset is None and scale.shape == (2, 6) and q.min() >= -8 and q.max() <= 7
    err = np.abs(qb.dequantize(q, scale, fmt) - w)
    assert np.all(err <= np.repeat(scale, 32, 0)[:40] / 2 * (1 + 1e-6))
    np.testing.assert_allclose(scale[1], np.abs(w[32:]).max(0) / 7, rtol=1e-6)
    ratios = qb.clip_ratios(w, fmt)
    clipped = qb.dequantize(*qb.quantize(w, fmt, ratios)[:2], fmt)
    assert ((clipped - w) ** 2).sum() <= (err ** 2).sum()
    # ONNX DequantizeLinear with block_size reads the short last block the same way.
    dq = ir.node("DequantizeLinear", [ir.Value(name="q", const_value=ir.tensor(q, dtype=ir.DataType.INT4, name="q")),
                                      ir.Value(name="s", const_value=ir.tensor(scale, name="s"))],
                 attributes={"axis": 0, "block_size": 32})
    dq.outputs[0].name = "w"
    graph = ir.Graph([], [dq.outputs[0]], nodes=[dq], initializers=[dq.inputs[0], dq.inputs[1]], opset_imports={"": 21})
    np.testing.assert_array_equal(_run(ir.Model(graph, ir_version=10), {}), qb.dequantize(q, scale, fmt))


def test_awq_search_protects_a_salient_channel():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, 5] *= 40.0  # one channel carries most of the output
    w = rng.standard_normal((64, 32)).astype(np.float32)
    alpha, err, base = qb.awq_alpha(x, np.abs(x).mean(0), w, qb.Format(4, 32), min_gain=0.05)
    assert alpha > 0 and err < 0.95 * base


def _matmul_model(k: int, n: int, opset: int, extra_op: str | None = None) -> ir.Model:
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", k]))
    w = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((k, n)).astype(np.float32), name="w"))
    mm = ir.node("MatMul", [x, w], name="mm")
    mm.outputs[0].name, mm.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    mm.outputs[0].shape = ir.Shape(["batch", n])
    nodes = [mm]
    if extra_op:
        nodes.append(ir.node(extra_op, [mm.outputs[0]], name="extra"))
        nodes[-1].outputs[0].name, nodes[-1].outputs[0].type = "z", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, initializers=[w], opset_imports={"": opset}, name="g")
    return ir.Model(graph, ir_version=10)


def test_odd_sizes_lower_exactly():
    """K not a multiple of the block, per-channel int8: MatMulNBits pads and repeats scales exactly."""
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)}
    for options in ({"mode": "w4", "block": "32"}, {"mode": "w8"}):
        model, _ = run_pipeline(_matmul_model(40, 6, 20), [PassSpec("quantize", options)], PassContext())
        want = _run(model, feeds)
        assert lower_weight_only(model, accuracy_level=1) == {"MatMulNBits": 1}
        np.testing.assert_allclose(_run(model, feeds, optimize=True), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, needle", [
    ({"block": "48"}, "no block size 48"),
    ({"mode": "dynamic", "block": "32"}, "applies to the weight-only modes"),
    ({"mode": "w4", "per_channel": "false"}, "needs per-channel or block-wise"),
    ({"mode": "w4", "embed": "2"}, "embed takes one of"),
])
def test_bad_options(options, needle):
    with pytest.raises(PassError, match=needle):
        instantiate([PassSpec("quantize", options)])


def test_w4_without_matmul_is_refused():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 8]))
    relu = ir.node("Relu", [x], name="relu")
    relu.outputs[0].name, relu.outputs[0].type = "r", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[relu], opset_imports={"": 20}, name="g")
    with pytest.raises(PassError, match="no MatMul with constant weights"):
        run_pipeline(ir.Model(graph, ir_version=10), [PassSpec("quantize", {"mode": "w4"})], PassContext())


@pytest.mark.parametrize("opset, extra, needle", [(17, None, "has opset 17; export it at opset 20"),
                                                  (20, "GroupNormalization", "GroupNormalization")])
def test_opsets_that_cannot_hold_int4_are_refused(opset, extra, needle):
    model = _matmul_model(32, 4, opset)
    if extra:  # a GroupNormalization elsewhere in the graph (its inputs need not be valid here)
        node = ir.node(extra, [model.graph.inputs[0]], name="gn")
        model.graph.append(node)
    with pytest.raises(PassError, match=needle):
        run_pipeline(model, [PassSpec("quantize", {"mode": "w4"})], PassContext())
    run_pipeline(_matmul_model(32, 4, opset), [PassSpec("quantize", {"mode": "w8"})], PassContext())  # int8 per channel is fine


def test_calibration_of_the_wrong_shape_is_refused():
    ctx = PassContext(calibration={"input_ids": np.zeros((2, 3, 4), np.int64), "attention_mask": np.ones((2, 3), np.int64)})
    with pytest.raises(PassError, match="calibration input 'input_ids' has shape"):
        run_pipeline(_trace("tiny-llama"), [PassSpec("quantize", {"mode": "w4"})], ctx)


def test_gptq_lowers_the_output_error_against_rounding():
    """On inputs with correlated channels GPTQ's error compensation beats round to nearest."""
    from passes.quantize_gptq import gptq

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 96)).astype(np.float32) * rng.uniform(0.2, 3.0, 96).astype(np.float32)
    x[:, :12] += 2.0 * rng.standard_normal((2000, 1)).astype(np.float32)
    w = (0.05 * rng.standard_normal((96, 40))).astype(np.float32)
    fmt = qb.Format(4, 32)
    exact = x @ w

    def error(q, scale):
        return np.linalg.norm(x @ qb.dequantize(q, scale, fmt) - exact) / np.linalg.norm(exact)

    q, scale = gptq(w, x.T.astype(np.float64) @ x, fmt, clip=True)
    assert scale.shape == (3, 40) and q.min() >= -8 and q.max() <= 7
    assert error(q, scale) < 0.9 * error(*qb.quantize_clipped(w, fmt, (x ** 2).mean(0), True)[:2])


def test_gptq_in_the_pass():
    model, record = _quantize("tiny-llama", {"mode": "w4", "block": "32", "gptq": "true"}, calibration="tiny-llama")
    assert record.details["quantized"] == 14
    feeds = _feeds("tiny-llama")
    assert _cosine(_run(model, feeds), _run(_trace("tiny-llama"), feeds)) >= 0.98
    with pytest.raises(PassError, match="gptq applies to the weight-only modes"):
        instantiate([PassSpec("quantize", {"mode": "dynamic", "gptq": "true"})])
    with pytest.raises(PassError, match="need calibration data; drop calib=none"):
        _quantize("tiny-llama", {"mode": "w4", "gptq": "true", "calib": "none"})
