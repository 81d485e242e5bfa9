"""Is a graph legal for TensorRT's ONNX parser? Every offending node, named, with its reason.

``check(model, version)`` returns a list of ``Offense`` (node name, op, reason); ``require_legal``
raises ``PassError`` naming them. Rules (operator table and its source: ``tensorrt_ops``):

- the opset is within what the parser of ``version`` reads; every operator is a default-domain
  operator that parser imports (custom domains such as ``com.microsoft`` need plugins);
- inputs the parser needs as build-time constants are constant (reduction and squeeze axes,
  TopK's K); TopK has ``sorted=1`` and K < 3840; only LayerNormalization's first output is used;
- data types are TensorRT types: no float64, int16, unsigned ints wider than 8 bits, strings or
  complex; uint8 only as a network input or output; int8, int4 and float8 only as quantized
  values (a QuantizeLinear output or a DequantizeLinear input);
- strongly typed: a node's float inputs share one type (Cast, Q/DQ and Resize excepted);
- Q/DQ: constant scales; zero points absent or 0; QuantizeLinear to int8 or float8 and always
  read by DequantizeLinear; per-channel (non-scalar) scales only on constant weights, and on
  a MatMul weight [K, N] along N (axis 1); block scales (``block_size``) only on constant 2-D
  int4/int8/float8 weights, blocked over K, at opset >= 21; float8 at opset >= 19; no int32
  DequantizeLinear (a quantized bias); an activation quantized into a MatMul/Gemm only when its
  other operand is quantized too (else no int8 GEMM); no QuantizeLinear on a weighted op's
  output (TensorRT quantizes the inputs of weighted ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optimizer.lower import tensorrt_ops as ops
from runtime.errors import PassError

D = ir.DataType
_FLOATS = (D.FLOAT, D.FLOAT16, D.BFLOAT16)
_QUANTIZED = (D.INT8, D.INT4, D.UINT4, D.FLOAT8E4M3FN)
_UNSUPPORTED = {D.DOUBLE: "float64", D.INT16: "int16", D.UINT16: "uint16", D.UINT32: "uint32",
                D.UINT64: "uint64", D.STRING: "string", D.COMPLEX64: "complex64", D.COMPLEX128: "complex128"}
_WEIGHTED = ("MatMul", "Gemm", "Conv", "ConvTranspose")
_MIXED_OK = ("Cast", "CastLike", "QuantizeLinear", "DequantizeLinear", "Resize", "Shape", "Size")


@dataclass(frozen=True)
class Offense:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node!r} ({self.op}): {self.reason}"


def check(model: ir.Model, version: ops.Version = ops.DEFAULT_VERSION) -> list[Offense]:
    """Every reason the TensorRT ``version`` parser would reject or mis-build ``model``."""
    model = _typed(model)
    found: list[Offense] = []
    opset = model.opset_imports.get("", 0)
    if not 9 <= opset <= ops.max_opset(version):
        found.append(Offense("<graph>", "opset", f"opset {opset} is outside 9..{ops.max_opset(version)}, "
                                                 f"what TensorRT {_v(version)} reads"))
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for reason in _node_reasons(node, version, opset):
            found.append(Offense(node.name or "<unnamed>", node.op_type, reason))
    found.extend(_type_offenses(model.graph))
    return found


def _typed(model: ir.Model) -> ir.Model:
    """``model`` if every node output has a type, else a copy with ONNX's type inference applied."""
    if all(v.dtype is not None for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs):
        return model
    import onnx

    inferred = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), data_prop=True)
    return ir.serde.deserialize_model(inferred)


def require_legal(model: ir.Model, version: ops.Version = ops.DEFAULT_VERSION) -> None:
    found = check(model, version)
    if found:
        listed = "; ".join(str(o) for o in found[:8]) + (f"; and {len(found) - 8} more" if len(found) > 8 else "")
        raise PassError(f"the graph is not legal for TensorRT {_v(version)} ({len(found)} offending nodes: {listed}); "
                        "remove or rewrite these nodes, or lower for another target.")


def _v(version: ops.Version) -> str:
    return f"{version[0]}.{version[1]}"


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor.numpy() if tensor is not None else None


def _node_reasons(node: ir.Node, version: ops.Version, opset: int) -> list[str]:
    if node.domain not in ("", "ai.onnx"):
        return [f"domain {node.domain!r} is not read by TensorRT's ONNX parser without a plugin"]
    if node.op_type not in ops.SUPPORTED:
        return [f"{node.op_type} is not supported by TensorRT's ONNX parser"]
    since = ops.SINCE.get(node.op_type)
    if since and version < since:
        return [f"{node.op_type} is parsed only from TensorRT {_v(since)} on (target {_v(version)})"]
    reasons = [f"input {i} must be a build-time constant" for i in ops.CONSTANT_INPUTS.get(node.op_type, ())
               if i < len(node.inputs) and node.inputs[i] is not None and _const(node.inputs[i]) is None]
    reasons += _mixed_types(node)
    if node.op_type == "TopK":
        reasons += _topk(node)
    elif node.op_type == "LayerNormalization" and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        reasons.append("only LayerNormalization's first output is supported")
    elif node.op_type == "QuantizeLinear":
        reasons += _quantize(node)
    elif node.op_type == "DequantizeLinear":
        reasons += _dequantize(node, opset)
    return reasons


def _mixed_types(node: ir.Node) -> list[str]:
    if node.op_type in _MIXED_OK:
        return []
    kinds = {v.dtype for v in node.inputs if v is not None and v.dtype in _FLOATS}
    if len(kinds) > 1:
        return [f"mixes float types {sorted(k.name for k in kinds)}; a strongly typed network needs a Cast"]
    return []


def _topk(node: ir.Node) -> list[str]:
    reasons = []
    k = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if k is not None and int(np.asarray(k).reshape(-1)[0]) > ops.TOPK_MAX:
        reasons.append(f"K = {int(np.asarray(k).reshape(-1)[0])} exceeds TensorRT's limit of {ops.TOPK_MAX}")
    if "sorted" in node.attributes and node.attributes["sorted"].as_int() == 0:
        reasons.append("sorted=0 is not supported")
    return reasons


def _zero_point_reasons(node: ir.Node) -> list[str]:
    reasons = []
    for i, what in ((1, "scale"), (2, "zero point")):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is not None and _const(value) is None:
            reasons.append(f"its {what} is not a constant")
    zero = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    if zero is not None and np.any(zero.astype(np.float32) != 0):
        reasons.append("its zero point is not 0 (TensorRT quantization is symmetric)")
    return reasons


def _quantize(node: ir.Node) -> list[str]:
    reasons = _zero_point_reasons(node)
    out = node.outputs[0]
    if out.dtype not in (D.INT8, D.FLOAT8E4M3FN, D.INT4):
        reasons.append(f"quantizes to {out.dtype.name if out.dtype else 'an unknown type'}; TensorRT quantizes to int8, float8 e4m3 or int4")
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is not None and (scale.shape is None or len(scale.shape) > 0) and _const(node.inputs[0]) is None:
        reasons.append("per-channel scale on an activation; TensorRT takes per-channel scales only on weights")
    if any(use.node.op_type != "DequantizeLinear" for use in out.uses()) or out.is_graph_output():
        reasons.append("its output is read by something other than DequantizeLinear")
    source = node.inputs[0].producer() if node.inputs[0] is not None else None
    if (source is not None and source.op_type in _WEIGHTED and _has_quantized_weight(source)
            and not _quantizes_weighted_inputs(out)):
        reasons.append(f"quantizes the output of weighted op {source.name!r}; TensorRT quantizes inputs of weighted ops")
    return reasons


def _quantizes_weighted_inputs(q_out: ir.Value) -> bool:
    """Whether every DequantizeLinear of ``q_out`` feeds only weighted ops' data inputs (a conv
    chain's next input: TensorRT fuses that as the first op's int8 output)."""
    dqs = [use.node for use in q_out.uses()]
    return bool(dqs) and all(dq.op_type == "DequantizeLinear" and dq.outputs[0].uses() and all(
        use.node.op_type in _WEIGHTED and use.idx == 0 for use in dq.outputs[0].uses()) for dq in dqs)


def _dequantize(node: ir.Node, opset: int) -> list[str]:
    reasons = _zero_point_reasons(node)
    x = node.inputs[0]
    if x.dtype == D.INT32:
        return reasons + ["dequantizes int32 (a quantized bias); keep biases in float"]
    if x.dtype == D.FLOAT8E4M3FN and opset < 19:
        reasons.append("float8 needs opset 19 or newer")
    constant = _const(x) is not None
    producer = x.producer()
    if not constant and (producer is None or producer.op_type != "QuantizeLinear"):
        reasons.append("dequantizes a value that is neither a constant weight nor a QuantizeLinear output")
    scale = node.inputs[1]
    per_channel = scale.shape is None or len(scale.shape) > 0
    block = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
    if per_channel and not constant:
        reasons.append("per-channel scale on an activation; TensorRT takes per-channel scales only on weights")
    elif block:
        reasons += _block_reasons(node, x, opset)
    elif x.dtype in (D.INT4, D.UINT4):
        reasons.append("int4 weights need block scales (block_size)")
    elif per_channel:
        reasons += _axis_reasons(node, x)
    if not constant:
        reasons += _unfused_activation(node)
    return reasons


def _block_reasons(node: ir.Node, x: ir.Value, opset: int) -> list[str]:
    reasons = []
    if opset < 21:
        reasons.append("block_size needs opset 21 or newer")
    if x.shape is None or len(x.shape) != 2:
        reasons.append("block quantization is supported only on 2-D weights")
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    if _reads_as_matmul_weight(node) and axis not in (0, -2):
        reasons.append(f"blocks along axis {axis}; a MatMul weight [K, N] is blocked over K (axis 0)")
    return reasons


def _axis_reasons(node: ir.Node, x: ir.Value) -> list[str]:
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    if _reads_as_matmul_weight(node) and x.shape is not None and len(x.shape) == 2 and axis not in (1, -1):
        return [f"per-channel axis {axis} is not the output channel (axis 1) of the MatMul weight"]
    return []


def _reads_as_matmul_weight(dq: ir.Node) -> bool:
    return any(use.node.op_type == "MatMul" and use.idx == 1 for use in dq.outputs[0].uses())


def _unfused_activation(dq: ir.Node) -> list[str]:
    reasons = []
    for use in dq.outputs[0].uses():
        if use.node.op_type in ("MatMul", "Gemm") and use.idx in (0, 1):
            other = use.node.inputs[1 - use.idx]
            producer = other.producer() if other is not None else None
            if producer is None or producer.op_type != "DequantizeLinear":
                reasons.append(f"quantizes an input of {use.node.name!r} whose other operand is not quantized, "
                               "so TensorRT cannot run it as an int8 GEMM")
    return reasons


def _has_quantized_weight(node: ir.Node) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    producer = weight.producer() if weight is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear" and _const(producer.inputs[0]) is not None


def _type_offenses(graph: ir.Graph) -> list[Offense]:
    """Values whose data type TensorRT cannot hold where they are."""
    io = {id(v) for v in (*graph.inputs, *graph.outputs)}
    found = []
    for value in _values(graph):
        reason = _type_reason(value, id(value) in io)
        if reason:
            where = value.producer()
            found.append(Offense(where.name if where is not None else value.name or "<value>",
                                 where.op_type if where is not None else "initializer" if value.is_initializer() else "input",
                                 f"value {value.name!r} {reason}"))
    return found


def _values(graph: ir.Graph):
    yield from graph.inputs
    yield from (v for v in graph.initializers.values() if not v.is_graph_input())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def _type_reason(value: ir.Value, is_io: bool) -> str | None:
    dtype = value.dtype
    if dtype in _UNSUPPORTED:
        return f"is {_UNSUPPORTED[dtype]}, which TensorRT does not support"
    if dtype == D.UINT8 and not is_io:
        return "is uint8, which TensorRT allows only as a network input or output"
    if dtype in _QUANTIZED:
        producer = value.producer()
        quantized = producer is not None and producer.op_type == "QuantizeLinear"
        dequantized = bool(value.uses()) and all(_quantized_slot(u.node.op_type, u.idx) for u in value.uses())
        if not (quantized or dequantized):
            return f"is {dtype.name.lower()}, which TensorRT holds only as a quantized value between QuantizeLinear and DequantizeLinear"
    return None


def _quantized_slot(op: str, index: int) -> bool:
    """Where a quantized-type value may be read: DequantizeLinear's data, or a Q/DQ zero point."""
    return (op == "DequantizeLinear" and index == 0) or (op in ("QuantizeLinear", "DequantizeLinear") and index == 2)
