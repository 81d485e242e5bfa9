"""Strongly typed low precision for TensorRT: fp16 or bf16 in the graph itself.

TensorRT 11 dropped the builder's precision flags; a strongly typed network runs every layer
in the type its ONNX tensors carry. This module rewrites a float32 graph so that its tensors
are float16 (or bfloat16) except where precision matters:

- every node gets a precision: ``KEEP_FLOAT32`` ops (LayerNormalization, Softmax, Pow,
  ReduceMean and the other reductions, RMS norms) stay float32, and so does an elementwise
  node (Add, Sub, Mul, Div, Sqrt, Reciprocal, ...) whose non-constant float inputs all come
  from float32 nodes: that keeps an RMSNorm's variance chain Pow -> ReduceMean -> Add(eps) ->
  Sqrt -> Reciprocal in float32, where x**2 of a large activation would overflow float16;
- float32 initializers and Constant/ConstantOfShape values read by low-precision nodes are
  converted (clipped to the finite range, so a float32-min attention mask becomes -65504, not
  -inf); an initializer read by both kinds is duplicated;
- ``Cast(to=FLOAT)`` in a low-precision node casts to the low type instead;
- a ``Cast`` is inserted wherever a value crosses between precisions (one per value and type);
- float32 graph inputs stay float32 (a Cast follows them) and float outputs are cast back to
  float32 under their own names, so the artifact's signature does not change.

Inputs whose type the ONNX operator fixes to float32 (Resize's ``scales``) are left alone.
Graphs with subgraphs (If, Loop, Scan) are refused: their inner types would need the same care.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from runtime.errors import PassError

FLOAT = ir.DataType.FLOAT
LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
KEEP_FLOAT32 = frozenset({
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
    "InstanceNormalization", "BatchNormalization", "Softmax", "LogSoftmax", "Pow", "ReduceMean", "ReduceSum",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "CumSum", "Exp", "Log",
})
# Elementwise ops that stay float32 when everything non-constant they read is float32.
_FOLLOWERS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Abs", "Max", "Min", "Clip"})
# (op, input index) whose type ONNX fixes at float32 whatever the data type.
_FIXED_FLOAT32 = {("Resize", 2)}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def convert(model: ir.Model, precision: str) -> dict:
    """Rewrite ``model`` in place to ``precision`` (fp16, bf16; fp32 leaves it); returns counts."""
    if precision == "fp32":
        return {"precision": "fp32"}
    low = LOW[precision]
    graph = model.graph
    if any(isinstance(a.value, (ir.Graph, list)) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for n in graph for a in n.attributes.values()):
        raise PassError(f"the {precision} lowering for TensorRT does not handle If/Loop/Scan subgraphs; "
                        "lower this model with precision=fp32.")
    keep = _keep_float32(graph, low, model.opset_imports.get("", 0))
    converter = _Converter(graph, low, keep)
    for node in list(graph):
        converter.visit(node, FLOAT if id(node) in keep else low)
    converter.fix_outputs()
    return {"precision": precision, "float32_nodes": dict(Counter(n.op_type for n in graph if id(n) in keep)),
            "casts_inserted": converter.casts, "initializers_converted": converter.converted}


def _schema_allows(node: ir.Node, low: ir.DataType, opset: int) -> bool:
    """Whether the operator at this opset accepts ``low`` where it reads float data (Conv takes
    bfloat16 only from opset 22: before that a bf16 graph keeps it float32)."""
    if node.domain not in ("", "ai.onnx") or not any(_is_float(v) for v in node.inputs):
        return True
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return True
    wanted = f"tensor({'float16' if low == ir.DataType.FLOAT16 else 'bfloat16'})"
    index = next(i for i, v in enumerate(node.inputs) if _is_float(v))
    if index >= len(schema.inputs):
        return True
    constraint = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}.get(schema.inputs[index].type_str)
    return constraint is None or wanted in constraint


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def _keep_float32(graph: ir.Graph, low: ir.DataType, opset: int) -> set[int]:
    """ids of the nodes that run in float32 (graph order is topological)."""
    keep: set[int] = set()
    for node in graph:
        if (node.op_type in KEEP_FLOAT32 and node.domain in ("", "com.microsoft")) or not _schema_allows(node, low, opset):
            keep.add(id(node))
        elif node.op_type in _FOLLOWERS:
            sources = [v.producer() for v in node.inputs if _is_float(v) and not _is_const(v)]
            if sources and all(p is not None and id(p) in keep for p in sources):
                keep.add(id(node))
    return keep


class _Converter:
    """Walks nodes in order, giving each input the type its node runs in."""

    def __init__(self, graph: ir.Graph, low: ir.DataType, keep: set[int]):
        self.graph, self.low, self.keep = graph, low, keep
        self.casts = 0
        self.converted = 0
        self._cast_of: dict[tuple[int, ir.DataType], ir.Value] = {}
        self._low_copy: dict[int, ir.Value] = {}

    def visit(self, node: ir.Node, runs_in: ir.DataType) -> None:
        if node.op_type in ("Constant", "ConstantOfShape") and runs_in != FLOAT:
            self._retype_attribute(node)
        for index, value in enumerate(node.inputs):
            if not _is_float(value) or (node.op_type, index) in _FIXED_FLOAT32 or value.dtype == runs_in:
                continue
            node.replace_input_with(index, self._as_type(value, runs_in, node))
        if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT and runs_in != FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", runs_in.value)
        for out in node.outputs:
            if out.dtype == FLOAT and runs_in != FLOAT and node.op_type not in ("Shape", "Size"):
                out.type = ir.TensorType(runs_in)

    def _as_type(self, value: ir.Value, dtype: ir.DataType, reader: ir.Node) -> ir.Value:
        if value.is_initializer() and not value.is_graph_input() and value.dtype == FLOAT and dtype == self.low:
            return self._low_initializer(value)
        key = (id(value), dtype)
        if key not in self._cast_of:
            cast = ir.node("Cast", [value], attributes={"to": dtype.value}, name=f"{value.name}_to_{dtype.name.lower()}")
            cast.outputs[0].name = f"{value.name}_{dtype.name.lower()}"
            cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
            producer = value.producer()
            if producer is not None:
                self.graph.insert_after(producer, [cast])
            else:
                self.graph.insert_before(reader, [cast])
            self._cast_of[key] = cast.outputs[0]
            self.casts += 1
        return self._cast_of[key]

    def _low_initializer(self, value: ir.Value) -> ir.Value:
        """The low-precision twin of a float32 initializer (the initializer itself when only low nodes read it)."""
        if id(value) in self._low_copy:
            return self._low_copy[id(value)]
        array = _to_low(value.const_value.numpy(), self.low)
        if not any(id(use.node) in self.keep or (use.node.op_type, use.idx) in _FIXED_FLOAT32 for use in value.uses()):
            value.const_value = ir.tensor(array, name=value.name)
            value.type = ir.TensorType(self.low)
            twin = value
        else:
            name = f"{value.name}_{self.low.name.lower()}"
            twin = ir.Value(name=name, shape=value.shape, type=ir.TensorType(self.low), const_value=ir.tensor(array, name=name))
            self.graph.register_initializer(twin)
        self._low_copy[id(value)] = twin
        self.converted += 1
        return twin

    def _retype_attribute(self, node: ir.Node) -> None:
        attr = node.attributes.get("value")
        if attr is None or attr.type != ir.AttributeType.TENSOR or attr.value.dtype != FLOAT:
            return
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_low(attr.value.numpy(), self.low)))
        self.converted += 1

    def fix_outputs(self) -> None:
        """Cast low-precision graph outputs back to float32 under their original names."""
        for i, out in enumerate(self.graph.outputs):
            if out.dtype != self.low:
                continue
            name = out.name
            out.name = f"{name}_{self.low.name.lower()}"
            cast = ir.node("Cast", [out], attributes={"to": FLOAT.value}, name=f"{name}_to_float")
            cast.outputs[0].name, cast.outputs[0].type, cast.outputs[0].shape = name, ir.TensorType(FLOAT), out.shape
            self.graph.append(cast)
            self.graph.outputs[i] = cast.outputs[0]
            self.casts += 1


def _to_low(array: np.ndarray, low: ir.DataType) -> np.ndarray:
    if low == ir.DataType.FLOAT16:
        return np.clip(array, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
    import ml_dtypes

    return array.astype(ml_dtypes.bfloat16)
