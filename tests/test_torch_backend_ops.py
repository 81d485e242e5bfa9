"""The torch lowering's operators, one ONNX node at a time, against ONNX Runtime.

Each case is a one-node graph with the edge cases that matter: negative indices and steps,
0/-1 in reshape targets, broadcasting expands, the decoder's mask and cache operators (Trilu,
Range, Where, Concat of an empty past), per-axis and blocked quantization, asymmetric
convolution pads, and resizing. Inputs are fixed arrays; outputs must match ORT exactly or to
float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optimizer.lower.torch import build_graph_module

RNG = np.random.default_rng(0)
F32 = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
_TYPES = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64, np.int8: TensorProto.INT8,
          np.uint8: TensorProto.UINT8, np.bool_: TensorProto.BOOL, np.int32: TensorProto.INT32}


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _model(op: str, inputs: dict, consts: dict | None = None, attrs: dict | None = None, outputs: int = 1):
    """A one-node ONNX model: ``inputs`` are graph inputs, ``consts`` initializers."""
    consts = consts or {}
    names = list(inputs) + list(consts)
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, _TYPES[v.dtype.type], v.shape) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run_both(op: str, inputs: dict, consts: dict | None = None, attrs: dict | None = None, outputs: int = 1):
    proto = _model(op, inputs, consts, attrs, outputs)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    module = build_graph_module(ir.from_proto(proto))
    with torch.inference_mode():
        got = module(*[torch.from_numpy(v) for v in inputs.values()])
    return want, [g.numpy() for g in got]


CASES = [
    ("Slice", {"x": F32}, {"s": _i64(-1, 0), "e": _i64(-10**18, 10**18), "a": _i64(3, 1), "st": _i64(-2, 2)}, {}),
    ("Slice", {"x": F32}, {"s": _i64(1), "e": _i64(-1), "a": _i64(-1)}, {}),
    ("Gather", {"x": F32}, {"i": _i64(-1, 0, 2).reshape(3, 1)}, {"axis": 2}),
    ("Reshape", {"x": F32}, {"s": _i64(0, -1, 5)}, {}),
    ("Expand", {"x": F32[:, :1]}, {"s": _i64(1, 3, 1, 1)}, {}),
    ("Unsqueeze", {"x": F32}, {"a": _i64(-1, 0)}, {}),
    ("Squeeze", {"x": F32[:, :1]}, {"a": _i64(1)}, {}),
    ("Transpose", {"x": F32}, {}, {"perm": [0, 2, 3, 1]}),
    ("Concat", {"x": np.zeros((2, 3, 0, 5), np.float32), "y": F32}, {}, {"axis": 2}),
    ("Trilu", {"x": F32}, {"k": _i64(1)}, {"upper": 0}),
    ("Trilu", {"x": F32}, {}, {}),
    ("Range", {}, {"a": np.array(2, np.int64), "b": np.array(11, np.int64), "c": np.array(3, np.int64)}, {}),
    ("Where", {"c": F32 > 0, "x": F32}, {"y": np.array(-3.0, np.float32)}, {}),
    ("CumSum", {"x": F32}, {"a": np.array(2, np.int64)}, {"exclusive": 1, "reverse": 1}),
    ("Pad", {"x": F32}, {"p": _i64(0, 1, 0, 2, 0, 0, 3, 1)}, {}),
    ("ReduceMean", {"x": F32}, {"a": _i64(-1, 1)}, {"keepdims": 0}),
    ("ReduceSum", {"x": F32}, {}, {"keepdims": 1}),
    ("ReduceL2", {"x": F32}, {"a": _i64(3)}, {}),
    ("ReduceMax", {"x": F32}, {"a": _i64(0)}, {}),
    ("Softmax", {"x": F32}, {}, {"axis": 1}),
    ("LayerNormalization", {"x": F32}, {"g": RNG.standard_normal(5).astype(np.float32)}, {"epsilon": 1e-3}),
    ("Gelu", {"x": F32}, {}, {"approximate": "tanh"}),
    ("Div", {"x": _i64(7, -7, 9)}, {"y": _i64(2, 2, -4)}, {}),
    ("Pow", {"x": F32}, {"y": np.array(2.0, np.float32)}, {}),
    ("Clip", {"x": F32}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.25, np.float32)}, {}),
    ("Cast", {"x": F32}, {}, {"to": TensorProto.INT64}),
    ("Shape", {"x": F32}, {}, {"start": 1, "end": -1}),
    ("ConstantOfShape", {}, {"s": _i64(2, 3)}, {"value": numpy_helper.from_array(np.array([7], np.int64))}),
    ("GatherND", {"x": F32}, {"i": _i64(1, 2, 0, 0).reshape(2, 2)}, {}),
    ("GatherND", {"x": F32}, {"i": RNG.integers(-3, 3, (2, 3, 2, 2)).astype(np.int64)}, {"batch_dims": 2}),
    ("GatherND", {"x": F32[:, :, 0]}, {"i": np.array([1, 2, 0, 2, -1, 1], np.int64).reshape(2, 3, 1)},
     {"batch_dims": 1}),
    ("Tile", {"x": F32}, {"r": _i64(1, 2, 1, 3)}, {}),
    ("Gemm", {"a": F32[0, 0]}, {"b": F32[1, 0], "c": F32[0, 1, 0, :4]}, {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("Einsum", {"a": F32[0], "b": F32[1]}, {}, {"equation": "ijk,ilk->ijl"}),
    ("Conv", {"x": F32}, {"w": RNG.standard_normal((6, 3, 3, 2)).astype(np.float32)}, {"pads": [1, 0, 0, 1], "strides": [2, 1]}),
    ("ConvTranspose", {"x": F32}, {"w": RNG.standard_normal((3, 2, 4, 4)).astype(np.float32)}, {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("Resize", {"x": F32}, {"r": np.array([], np.float32), "s": np.array([], np.float32), "z": _i64(2, 3, 9, 7)},
     {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
    ("Resize", {"x": F32}, {"r": np.array([], np.float32), "s": np.array([1, 1, 2, 2], np.float32)},
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    ("DequantizeLinear", {"x": RNG.integers(-128, 127, (4, 6), dtype=np.int8)},
     {"s": np.linspace(0.01, 0.1, 6, dtype=np.float32)}, {"axis": 1}),
    ("DequantizeLinear", {"x": RNG.integers(-128, 127, (4, 6), dtype=np.int8)},
     {"s": np.linspace(0.01, 0.1, 12, dtype=np.float32).reshape(2, 6)}, {"axis": 0, "block_size": 2}),
    ("DequantizeLinear", {"x": RNG.integers(0, 255, (4, 6), dtype=np.uint8)},
     {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8)}, {}),
    ("QuantizeLinear", {"x": F32 * 100}, {"s": np.array(0.5, np.float32), "z": np.array(0, np.int8)}, {}),
    ("QuantizeLinear", {"x": F32[0, 0]}, {"s": np.linspace(0.01, 0.1, 5, dtype=np.float32), "z": np.zeros(5, np.uint8)},
     {"axis": 1}),
]


@pytest.mark.parametrize("op, inputs, consts, attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_operator_matches_onnxruntime(op, inputs, consts, attrs):
    want, got = _run_both(op, inputs, consts, attrs)
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.dtype == g.dtype, (op, w.shape, g.shape, w.dtype, g.dtype)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_multi_output_operators_match_onnxruntime():
    for op, inputs, consts, attrs, n in [
        ("Split", {"x": F32}, {"s": _i64(2, 3)}, {"axis": 3}, 2),
        ("TopK", {"x": F32}, {"k": _i64(2)}, {"axis": 1}, 2),
        ("DynamicQuantizeLinear", {"x": F32}, {}, {}, 3),
    ]:
        want, got = _run_both(op, inputs, consts, attrs, outputs=n)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-6, atol=1e-6)


def _subgraph(name: str, inputs: list, outputs: list, nodes: list):
    return helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                             [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs])


def _run_graph(nodes, inputs: dict, outputs: list[str], consts: dict | None = None):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, _TYPES[v.dtype.type], v.shape) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    with torch.inference_mode():
        got = build_graph_module(ir.from_proto(proto))(*[torch.from_numpy(v) for v in inputs.values()])
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flag", [True, False])
def test_if_runs_the_branch_the_condition_picks(flag):
    """Both branches read an outer value (x) and an outer constant (k), as ONNX subgraphs may."""
    then = _subgraph("then", [], [("t", TensorProto.FLOAT, None)], [helper.make_node("Mul", ["x", "k"], ["t"])])
    other = _subgraph("else", [], [("e", TensorProto.FLOAT, None)], [helper.make_node("Neg", ["x"], ["e"])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    _run_graph([node], {"c": np.array(flag), "x": F32}, ["y"], {"k": np.array(3.0, np.float32)})


def test_loop_carries_state_and_stacks_scan_outputs():
    body = _subgraph("body", [("i", TensorProto.INT64, []), ("cond", TensorProto.BOOL, []), ("acc", TensorProto.FLOAT, None)],
                     [("cond_out", TensorProto.BOOL, []), ("acc_out", TensorProto.FLOAT, None), ("scan", TensorProto.FLOAT, None)],
                     [helper.make_node("Identity", ["cond"], ["cond_out"]),
                      helper.make_node("Add", ["acc", "x"], ["acc_out"]),
                      helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", ["acc_out", "i_f"], ["scan"])])
    node = helper.make_node("Loop", ["m", "go", "a0"], ["a_final", "scans"], body=body)
    _run_graph([node], {"x": F32[0, 0]}, ["a_final", "scans"],
               {"m": np.array(4, np.int64), "go": np.array(True), "a0": np.zeros((4, 5), np.float32)})


def test_unknown_operator_is_named_with_its_node():
    from runtime.errors import PassError

    node = helper.make_node("FancyRotate", ["x"], ["y"], name="rotate_7")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(PassError, match=r"node rotate_7 \(FancyRotate\): operator FancyRotate has no torch implementation"):
        build_graph_module(ir.from_proto(proto))


def test_onnxruntime_contrib_operator_is_refused_with_the_remedy():
    from runtime.errors import PassError

    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft", name="mm_dq")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.int8), "w"),
                               numpy_helper.from_array(np.ones(3, np.float32), "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(PassError, match=r"mm_dq.*com\.microsoft\.DynamicQuantizeMatMul.*--target torch"):
        build_graph_module(ir.from_proto(proto))


def test_unsupported_attribute_combination_is_refused_when_building():
    from runtime.errors import PassError

    with pytest.raises(PassError, match="Resize mode 'cubic' with coordinate_transformation_mode 'tf_crop_and_resize'"):
        build_graph_module(ir.from_proto(_model(
            "Resize", {"x": F32}, {"r": np.array([], np.float32), "s": np.array([1, 1, 2, 2], np.float32)},
            {"mode": "cubic", "coordinate_transformation_mode": "tf_crop_and_resize"})))
