"""Cleanup passes: structure (what went away), numerics (exactly equal outputs), counts, and
cases where there is nothing to do."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from optimizer.pipeline import PassContext, run_pipeline
from optimizer.specs import PassSpec


def _messy_model() -> ir.Model:
    """y = Relu(x) + Relu(x) + (c1 * c2), plus a node nobody reads.

    fold_constants turns c1*c2 into one constant; cse merges the two Relus; dead_code removes
    the unread Sigmoid.
    """
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 4]))
    c1 = ir.node("Constant", [], attributes={"value": ir.tensor(np.arange(4, dtype=np.float32))}, name="c1")
    c2 = ir.node("Constant", [], attributes={"value": ir.tensor(np.full(4, 0.5, np.float32))}, name="c2")
    mul = ir.node("Mul", [c1.outputs[0], c2.outputs[0]], name="mul")
    r1, r2 = ir.node("Relu", [x], name="relu_a"), ir.node("Relu", [x], name="relu_b")
    unused = ir.node("Sigmoid", [x], name="unused")
    s = ir.node("Add", [r1.outputs[0], r2.outputs[0]], name="sum")
    y = ir.node("Add", [s.outputs[0], mul.outputs[0]], name="y")
    y.outputs[0].name, y.outputs[0].dtype, y.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["batch", 4])
    nodes = [c1, c2, mul, r1, r2, unused, s, y]
    graph = ir.Graph([x], [y.outputs[0]], nodes=nodes, opset_imports={"": 20}, name="messy")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("name, removed, gone", [
    ("dead_code", 1, {"unused"}),
    ("cse", 2, {"unused", "relu_b"}),  # cse also drops what it made dead, and the unread Sigmoid
    ("fold_constants", 4, {"c1", "c2", "mul", "unused"}),  # folding also drops what it made dead
    ("cleanup", None, {"c1", "c2", "mul", "unused", "relu_b"}),
])
def test_cleanup_passes(name, removed, gone):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    reference = _run(_messy_model(), x)
    model, records = run_pipeline(_messy_model(), [PassSpec(name)], PassContext())
    names = {n.name for n in model.graph}
    assert not (names & gone), names
    assert records[0].nodes_after < records[0].nodes_before
    if removed is not None:
        assert records[0].sites == removed
    np.testing.assert_array_equal(_run(model, x), reference)


def test_cleanup_on_a_clean_graph_changes_nothing():
    model, _ = run_pipeline(_messy_model(), [PassSpec("cleanup")], PassContext())
    again, records = run_pipeline(model, [PassSpec("cleanup")], PassContext())
    assert records[0].sites == 0 and records[0].nodes_before == records[0].nodes_after


def test_cleanup_keeps_traced_outputs_equal(tiny_onnx):
    from optimizer import load

    rng = np.random.default_rng(3)
    feeds = {"ids": rng.integers(0, 50, (3, 7)), "features": rng.standard_normal((3, 7, 16)).astype(np.float32)}
    model = load(tiny_onnx)
    before = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)[0]
    model, records = run_pipeline(model, [PassSpec("cleanup")], PassContext())
    after = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)[0]
    assert records[0].nodes_after <= records[0].nodes_before
    np.testing.assert_array_equal(after, before)
