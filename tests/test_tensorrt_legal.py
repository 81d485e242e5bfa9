"""The TensorRT legality checker on small hand-made graphs: each rule names the offending node.

Every case builds a graph with exactly one problem (or none, for the legal twin) so that the
test shows both that the rule fires and that it fires on the right node for the right reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from optimizer.lower.tensorrt_legal import check, require_legal
from runtime.errors import PassError


def _model(nodes, inputs, outputs, inits=(), opset=20, domains=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=imports))


def _x(name="x", dtype=T.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _qdq_matmul(zero=0, act_scale=(0.1,), weight_axis=1, weight_dtype=np.int8, bias_dq=False, weight_dq=True):
    """x -> Q -> DQ -> MatMul(., DQ(W)) (+ optional int32 bias DQ): the w8a8 form, with knobs."""
    scale = np.array(act_scale, np.float32).reshape(() if len(act_scale) == 1 else (len(act_scale),))
    inits = [_init("s", scale), _init("z", np.full(scale.shape, zero, np.int8)),
             _init("wq", np.ones((4, 3), weight_dtype)), _init("ws", np.full((3,), 0.01, np.float32)),
             _init("w", np.ones((4, 3), np.float32))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="act_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="act_dq")]
    if weight_dq:
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="w_dq", axis=weight_axis))
    nodes.append(helper.make_node("MatMul", ["xd", "wd" if weight_dq else "w"], ["y0"], name="mm"))
    if bias_dq:
        inits += [_init("bq", np.ones(3, np.int32)), _init("bs", np.full(3, 0.001, np.float32))]
        nodes += [helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], name="bias_dq", axis=0),
                  helper.make_node("Add", ["y0", "bd"], ["y"], name="bias_add")]
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"], name="out"))
    return _model(nodes, [_x()], [_x("y", shape=(2, 3))], inits)


def _names(found) -> set[tuple[str, str]]:
    return {(o.node, o.op) for o in found}


def test_the_legal_w8a8_form_passes():
    assert check(_qdq_matmul()) == []


@pytest.mark.parametrize("kwargs, node, reason", [
    ({"zero": 3}, "act_q", "zero point is not 0"),
    ({"act_scale": (0.1, 0.2, 0.3, 0.4)}, "act_q", "per-channel scale on an activation"),
    ({"weight_axis": 0}, "w_dq", "not the output channel"),
    ({"bias_dq": True}, "bias_dq", "int32"),
    ({"weight_dq": False}, "act_dq", "other operand is not quantized"),
])
def test_qdq_placement_rules(kwargs, node, reason):
    found = check(_qdq_matmul(**kwargs))
    assert any(o.node == node and reason in o.reason for o in found), found


def _two_matmuls(second: str):
    """Q/DQ MatMul whose output is quantized again, then read by ``second`` (MatMul: its input; Relu: not)."""
    model = onnx.load_from_string(ir.serde.serialize_model(_qdq_matmul()).SerializeToString())
    g = model.graph
    g.node.remove(next(n for n in g.node if n.name == "out"))
    g.node.extend([helper.make_node("QuantizeLinear", ["y0", "s", "z"], ["yq"], name="out_q"),
                   helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"], name="out_dq")])
    if second == "MatMul":
        g.initializer.append(_init("w2", np.ones((3, 3), np.float32)))
        g.node.extend([helper.make_node("QuantizeLinear", ["w2", "ws", "z3"], ["w2q"], name="w2_q", axis=1),
                       helper.make_node("DequantizeLinear", ["w2q", "ws", "z3"], ["w2d"], name="w2_dq", axis=1),
                       helper.make_node("MatMul", ["yd", "w2d"], ["y"], name="mm2")])
        g.initializer.append(_init("z3", np.zeros(3, np.int8)))
    else:
        g.node.append(helper.make_node("Relu", ["yd"], ["y"], name="relu"))
    return ir.serde.deserialize_model(model)


def test_output_quantization_is_legal_only_as_the_next_weighted_input():
    assert not [o for o in check(_two_matmuls("MatMul")) if o.node == "out_q"]
    found = check(_two_matmuls("Relu"))
    assert any(o.node == "out_q" and "output of weighted op" in o.reason for o in found), found


def test_unsupported_operators_are_named():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="fine"),
             helper.make_node("Unique", ["a"], ["u"], name="uniq"),
             helper.make_node("FusedMatMul", ["a", "a"], ["y"], name="ms_op", domain="com.microsoft")]
    model = _model(nodes, [_x(shape=(4, 4))], [_x("y", shape=(4, 4)), _x("u", shape=None)], domains=["com.microsoft"])
    found = check(model)
    assert _names(found) == {("uniq", "Unique"), ("ms_op", "FusedMatMul")}
    with pytest.raises(PassError, match="'uniq' \\(Unique\\): Unique is not supported"):
        require_legal(model)


def test_operators_newer_than_the_target_version():
    nodes = [helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="rms")]
    model = _model(nodes, [_x()], [_x("y")], [_init("g", np.ones(4, np.float32))], opset=23)
    assert any(o.node == "rms" and "10.15" in o.reason for o in check(model, (10, 14)))
    assert check(model, (10, 15)) == []


def test_opset_outside_the_parser_range():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_x()], [_x("y")], opset=23)
    assert _names(check(model, (10, 13))) == {("<graph>", "opset")}


def _topk(k: int | None):
    inits = [_init("k", np.array([k], np.int64))] if k is not None else []
    nodes = [] if k is not None else [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
                                      helper.make_node("Slice", ["shape", "one", "two"], ["k"], name="k_of_shape")]
    if k is None:
        inits = [_init("one", np.array([1], np.int64)), _init("two", np.array([2], np.int64))]
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1))
    out = [helper.make_tensor_value_info("v", T.FLOAT, None), helper.make_tensor_value_info("i", T.INT64, None)]
    # With a static width constant folding would turn the Shape/Slice K into a constant.
    return _model(nodes, [_x(shape=(2, 5000 if k is not None else "width"))], out, inits)


def test_topk_k_limit_and_dynamic_k():
    assert check(_topk(3840)) == []
    assert any(o.node == "topk" and "3840" in o.reason for o in check(_topk(3841)))
    assert any(o.node == "topk" and "build-time constant" in o.reason for o in check(_topk(None)))


def test_lowering_refuses_a_dynamic_or_large_topk():
    from optimizer.lower.tensorrt import lower_tensorrt

    with pytest.raises(PassError, match="at most 3840"):
        lower_tensorrt(_topk(5000))
    with pytest.raises(PassError, match="computed at run time"):
        lower_tensorrt(_topk(None))


def test_unsupported_types_are_named():
    nodes = [helper.make_node("Cast", ["x"], ["d"], name="to_double", to=T.DOUBLE),
             helper.make_node("Cast", ["d"], ["u"], name="to_uint8", to=T.UINT8),
             helper.make_node("Cast", ["u"], ["y"], name="back", to=T.FLOAT)]
    found = check(_model(nodes, [_x()], [_x("y")]))
    assert any(o.node == "to_double" and "float64" in o.reason for o in found)
    assert any(o.node == "to_uint8" and "uint8" in o.reason for o in found)


def test_mixed_float_types_need_a_cast():
    nodes = [helper.make_node("Cast", ["x"], ["h"], name="half", to=T.FLOAT16),
             helper.make_node("Add", ["h", "x"], ["y"], name="mixed")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [_x()], [_x("y", T.FLOAT16)]),
                              opset_imports=[helper.make_opsetid("", 20)])
    found = check(ir.serde.deserialize_model(proto))
    assert any(o.node == "mixed" and "mixes float types" in o.reason for o in found)


def test_layernorm_extra_outputs_are_refused():
    inits = [_init("g", np.ones(4, np.float32)), _init("b", np.zeros(4, np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "mean"], name="ln")]
    model = _model(nodes, [_x()], [_x("y"), helper.make_tensor_value_info("mean", T.FLOAT, None)], inits)
    assert any(o.node == "ln" and "first output" in o.reason for o in check(model))


def test_int4_weights_need_blocks_over_k_at_opset_21():
    def model(axis, block, opset=21):
        inits = [_init("s", np.full((2, 3) if block else (3,), 0.1, np.float32))]
        w = onnx.helper.make_tensor("w4", T.INT4, [4, 3], np.ones(12, np.int8).tolist())
        attrs = {"axis": axis, **({"block_size": block} if block else {})}
        nodes = [helper.make_node("DequantizeLinear", ["w4", "s"], ["w"], name="w4_dq", **attrs),
                 helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
        return _model(nodes, [_x()], [_x("y", shape=(2, 3))], [*inits, w], opset=opset)

    assert check(model(0, 2)) == []
    assert any(o.node == "w4_dq" and "blocked over K" in o.reason for o in check(model(1, 2)))
    assert any(o.node == "w4_dq" and "block scales" in o.reason for o in check(model(1, 0)))
    assert any(o.node == "<graph>" for o in check(model(0, 2, opset=22), (10, 13)))
