"""Token pruning, part 1: a small graph builder and the token-indexed gathers the pass is made of.

``Ops`` appends new nodes to a graph (or a Loop body) with unique node and value names under a
prefix; the pass sorts the graph once at the end, so nodes may be created in any order.

Gathers along the token axis, with per-row indices ``idx`` ``[batch, K]`` (int64):
- ``gather_tokens(x, idx)``: ``x`` ``[batch, N, hidden]`` -> ``[batch, K, hidden]`` (GatherND
  with ``batch_dims=1``, one row of ``hidden`` per index);
- ``take(v, idx, axes)``: any value with the token dim on ``axes`` (a ``[batch, 1, N, N]`` mask,
  a ``[batch, N, 1]`` pooling weight, a ``[1, N, d]`` rotary table) gathered on each of those
  axes (GatherElements with expanded indices; a batch dim of 1 is first expanded to the batch);
- ``scatter_tokens(full, idx, x)``: writes ``x`` ``[batch, K, hidden]`` back into ``full``
  ``[batch, N, hidden]`` at ``idx`` (ScatterElements on the token axis).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from runtime.errors import PassError


class Ops:
    """Appends nodes to ``graph`` with names ``{prefix}_{op}_{n}``; ``taken`` holds the names in use."""

    def __init__(self, graph: ir.Graph, prefix: str, taken: set[str], body: bool = False):
        self.graph, self.prefix, self.taken, self.body = graph, prefix, taken, body
        self.nodes: list[ir.Node] = []

    def name(self, base: str) -> str:
        i, name = 0, f"{self.prefix}_{base}"
        while name in self.taken:
            i += 1
            name = f"{self.prefix}_{base}_{i}"
        self.taken.add(name)
        return name

    def op(self, op_type: str, *inputs: ir.Value | None, outputs: int = 1, **attrs: Any) -> Any:
        """Add one node; returns its output value (or a tuple when ``outputs`` > 1)."""
        node = ir.node(op_type, list(inputs), attrs or None, num_outputs=outputs, name=self.name(op_type.lower()))
        for value in node.outputs:
            value.name = self.name(op_type.lower() + "_out")
        self.graph.append(node)
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, array: Any, base: str = "const") -> ir.Value:
        """A typed initializer holding ``array`` (a Constant node inside a Loop body), so that
        lowerings that retype constants (TensorRT's fp16) see its type."""
        array = np.asarray(array)
        name = self.name(base)
        if self.body:
            value = self.op("Constant", value=ir.tensor(array, name=name))
        else:
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            self.graph.register_initializer(value)
        value.dtype, value.shape = ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape)
        return value

    def i64(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64), "i64")

    def f32(self, value: float) -> ir.Value:
        return self.const(np.array(value, dtype=np.float32), "f32")

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        """``value``'s size on ``axis`` as an int64 ``[1]``."""
        return self.op("Shape", value, start=axis, end=axis + 1)

    def clone(self, node: ir.Node, inputs: list[ir.Value | None]) -> ir.Node:
        """A copy of ``node`` (same op, attributes and domain) reading ``inputs``."""
        copy = ir.node(node.op_type, inputs, {a.name: a for a in node.attributes.values()}, domain=node.domain,
                       num_outputs=len(node.outputs), name=self.name(f"{node.name or node.op_type}_pruned"))
        for old, new in zip(node.outputs, copy.outputs):
            new.name = self.name(f"{old.name}_pruned")
            new.dtype = old.dtype
        self.graph.append(copy)
        self.nodes.append(copy)
        return copy


def gather_tokens(ops: Ops, x: ir.Value, idx: ir.Value) -> ir.Value:
    """``x[b, idx[b, k], :]`` for a ``[batch, N, hidden]`` stream."""
    return ops.op("GatherND", x, ops.op("Unsqueeze", idx, ops.i64(-1)), batch_dims=1)


def scatter_tokens(ops: Ops, full: ir.Value, idx: ir.Value, x: ir.Value) -> ir.Value:
    """``full`` with ``full[b, idx[b, k], :] = x[b, k, :]``."""
    wide = ops.op("Expand", ops.op("Unsqueeze", idx, ops.i64(-1)), ops.op("Shape", x))
    return ops.op("ScatterElements", full, wide, x, axis=1)


def scatter_add(ops: Ops, base: ir.Value, index: ir.Value, updates: ir.Value, vectors: bool) -> ir.Value:
    """``base`` (``[batch, M]`` or ``[batch, M, hidden]``) plus ``updates`` (``[batch, R]`` or
    ``[batch, R, hidden]``) summed into rows ``index`` (``[batch, R]``). Written as a one-hot
    MatMul rather than ScatterElements ``reduction=add``, which ONNX Runtime's CPU kernels lack
    in float16 (TensorRT's fp16 graphs) and which costs nothing extra at these sizes."""
    zero = ops.const(np.array(0, dtype=np.int64))
    one = ops.const(np.array(1, dtype=np.int64))
    rows = ops.op("Range", zero, ops.op("Squeeze", ops.dim(base, 1), ops.i64(0)), one)  # [M]
    hits = ops.op("Equal", ops.op("Unsqueeze", index, ops.i64(-1)), ops.op("Unsqueeze", rows, ops.i64(0, 1)))
    onehot = ops.op("Transpose", ops.op("Cast", hits, to=ir.DataType.FLOAT), perm=[0, 2, 1])  # [B, M, R]
    if vectors:  # [batch, R, hidden] updates
        return ops.op("Add", base, ops.op("MatMul", onehot, updates))
    summed = ops.op("MatMul", onehot, ops.op("Unsqueeze", updates, ops.i64(-1)))
    return ops.op("Add", base, ops.op("Squeeze", summed, ops.i64(-1)))


def take(ops: Ops, value: ir.Value, idx: ir.Value, axes: list[int]) -> ir.Value:
    """``value`` gathered with the per-row indices ``idx`` on each of ``axes`` (see module doc)."""
    shape = value.shape
    rank = len(shape) if shape is not None else None
    if rank is None or rank < 2 or 0 in axes:
        raise PassError(f"prune_tokens cannot follow the token-indexed value {value.name!r} (shape {shape}): it has "
                        "no batch axis in front; this model's layout is not supported.")
    out = value
    if shape[0] == 1:
        # a table shared by every row ([1, N, d]): one copy per row, so rows can keep different tokens
        batch = ops.dim(idx, 0)
        out = ops.op("Expand", out, ops.op("Concat", batch, ops.op("Shape", out, start=1), axis=0))
    for axis in axes:
        out = _take_axis(ops, out, idx, axis, rank)
    return out


def _take_axis(ops: Ops, value: ir.Value, idx: ir.Value, axis: int, rank: int) -> ir.Value:
    others = [a for a in range(1, rank) if a != axis]
    # idx is [batch, K]: inserting every other axis leaves K on ``axis``
    placed = ops.op("Unsqueeze", idx, ops.i64(*others)) if others else idx
    pieces = [ops.op("Shape", value, start=0, end=axis), ops.dim(idx, 1)]
    if axis + 1 < rank:
        pieces.append(ops.op("Shape", value, start=axis + 1))
    target = ops.op("Concat", *pieces, axis=0)
    return ops.op("GatherElements", value, ops.op("Expand", placed, target), axis=axis)


_BOOLEAN = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "IsNaN"}
_INDEX = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}
_DATA_INPUT = {"Where": 1}  # which input carries the output type (default: the first)


def fill_types(graph: ir.Graph) -> None:
    """Give every untyped node output its element type (the new nodes carry none): lowerings that
    retype a graph (TensorRT's fp16) decide node by node from these types. Run after sorting."""
    for node in graph:
        for index, value in enumerate(node.outputs):
            if value.dtype is None:
                value.dtype = _output_type(node, index)


def _output_type(node: ir.Node, index: int) -> ir.DataType | None:
    op = node.op_type
    if op in _BOOLEAN:
        return ir.DataType.BOOL
    if op in _INDEX or (op == "TopK" and index == 1):
        return ir.DataType.INT64
    if op == "Cast":
        return ir.DataType(node.attributes["to"].as_int())
    if op in ("Constant", "ConstantOfShape") and "value" in node.attributes:
        return node.attributes["value"].as_tensor().dtype
    if op == "ConstantOfShape":
        return ir.DataType.FLOAT
    if op == "Loop":  # state outputs follow the state inputs; our scan output is indices
        states = node.inputs[2:]
        return states[index].dtype if index < len(states) else ir.DataType.INT64
    source = node.inputs[_DATA_INPUT.get(op, 0)] if node.inputs else None
    return source.dtype if source is not None else None
