"""The decision form of asymmetric weights in plain ONNX, and how lowerings read it back.

ONNX ``DequantizeLinear`` takes only integer zero points of the data's type, so a float offset
per block cannot be one; it is added after the dequantization instead. With blocks of B along
``axis`` (0: the K rows of a ``[K, N]`` MatMul weight; 1: the C columns of a ``[R, C]`` embedding
table), nb = ceil(length / B) and the axis padded to nb x B (q 0 there):

    DequantizeLinear(q uint4, Cast(step), axis, block_size=B)      d q, per block
    -> Reshape [nb, B, N] (axis 0) or [R, nb, B] (axis 1)
    -> Add(Cast(offset) [nb, 1, N] or [R, nb, 1])                   + m, one per block
    -> Reshape back, then Slice to the real length when it was padded

Per channel (block 0) is one block spanning the axis. ``Cast`` (float16 to float32, exact) is
there only when the step and offset are stored in float16 (``passes.quantize_asym``); the
arithmetic is float32 d q + m, the same operations as ``quantize_asym.dequantize``, so the graph
reproduces it exactly. The last node carries ``carve.quantize_affine`` (JSON: axis, block,
length) so that a lowering finds the form; ``read(value)`` returns its parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from passes.quantize_rewrite import META, as_matmul, base_name, constant, drop_if_unused
from passes.quantize_sites import Site

AFFINE = "carve.quantize_affine"


@dataclass
class Affine:
    """One asymmetric weight as the form holds it (q unpadded, step/offset float32 per block)."""

    q: np.ndarray  # uint8 in 0..15, the weight's own shape
    step: np.ndarray  # [nb, N] (axis 0) or [R, nb] (axis 1)
    offset: np.ndarray  # the same shape
    block: int  # rows (axis 0) or columns (axis 1) per block; the whole axis when per channel
    axis: int
    nodes: list[ir.Node]  # the form's nodes in graph order
    half: bool = False  # step and offset stored in float16 (behind a Cast)


def build(graph: ir.Graph, base: str, q: np.ndarray, step: np.ndarray, offset: np.ndarray, block: int,
          axis: int, before: ir.Node) -> ir.Value:
    """Insert the form of ``q`` (weight-shaped) before ``before``; returns the float weight value.

    ``step``/``offset``: [nb, N] (axis 0) or [R, nb] (axis 1), or 1-D per channel (block 0)."""
    length = q.shape[axis]
    block = block or length
    nb = -(-length // block)
    step, offset = _per_block(step, axis), _per_block(offset, axis)
    padded_shape = list(q.shape)
    padded_shape[axis] = nb * block
    padded = np.zeros(padded_shape, np.uint8)
    padded[tuple(slice(0, s) for s in q.shape)] = q
    grouped = [nb, block, q.shape[1]] if axis == 0 else [q.shape[0], nb, block]
    offset_shape = [nb, 1, q.shape[1]] if axis == 0 else [q.shape[0], nb, 1]
    nodes: list[ir.Node] = []  # the Casts first, when there are any
    step_value = _float(graph, nodes, f"{base}_step", step)
    offset_value = _float(graph, nodes, f"{base}_offset", offset.reshape(offset_shape))
    nodes.append(ir.node("DequantizeLinear", [constant(graph, f"{base}_uint4", padded, ir.DataType.UINT4), step_value],
                         attributes={"axis": axis, "block_size": block}, name=f"{base}_dq"))
    nodes[-1].outputs[0].type, nodes[-1].outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(padded_shape)
    nodes.append(_reshape(graph, nodes[-1].outputs[0], grouped, f"{base}_blocks"))
    nodes.append(ir.node("Add", [nodes[-1].outputs[0], offset_value], name=f"{base}_add_offset"))
    nodes.append(_reshape(graph, nodes[-1].outputs[0], padded_shape, f"{base}_affine"))
    if nb * block != length:
        cut = [constant(graph, f"{base}_{name}", np.array([v], np.int64)) for name, v in
               (("start", 0), ("end", length), ("axis", axis))]
        nodes.append(ir.node("Slice", [nodes[-1].outputs[0], *cut], name=f"{base}_cut"))
    out = nodes[-1].outputs[0]
    out.name, out.type, out.shape = f"{base}_affine_w", ir.TensorType(ir.DataType.FLOAT), ir.Shape(q.shape)
    nodes[-1].metadata_props[AFFINE] = json.dumps({"axis": axis, "block": block, "length": length})
    graph.insert_before(before, nodes)
    return out


def quantize_weight(graph: ir.Graph, site: Site, q: np.ndarray, step: np.ndarray, offset: np.ndarray,
                    info: dict, block: int) -> None:
    """Make the site read the affine form of its weight and record ``info`` on its MatMul."""
    as_matmul(graph, site)
    old = site.node.inputs[1]
    weight = build(graph, base_name(site), q, step, offset, block, 0, site.node)
    site.node.replace_input_with(1, weight)
    site.node.metadata_props[META] = json.dumps(info, sort_keys=True)
    drop_if_unused(graph, old)


def _per_block(array: np.ndarray, axis: int) -> np.ndarray:
    """A per-channel (1-D) step or offset as one block: [1, N] (axis 0) or [R, 1] (axis 1)."""
    if array.ndim == 2:
        return array
    return array[None, :] if axis == 0 else array[:, None]


def _float(graph: ir.Graph, nodes: list[ir.Node], name: str, array: np.ndarray) -> ir.Value:
    """A float32 value of ``array``: the initializer itself, or a Cast of its float16 form."""
    value = constant(graph, name, np.ascontiguousarray(array))
    if array.dtype == np.float32:
        return value
    cast = ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_float")
    cast.outputs[0].name, cast.outputs[0].type = f"{name}_float", ir.TensorType(ir.DataType.FLOAT)
    cast.outputs[0].shape = ir.Shape(array.shape)
    nodes.append(cast)
    return cast.outputs[0]


def _reshape(graph: ir.Graph, value: ir.Value, shape: list[int], name: str) -> ir.Node:
    node = ir.node("Reshape", [value, constant(graph, f"{name}_shape", np.array(shape, np.int64))], name=name)
    node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(shape)
    return node


def read(value: ir.Value | None) -> Affine | None:
    """The affine form producing ``value``, or None when ``value`` is not one."""
    last = value.producer() if value is not None else None
    if last is None or AFFINE not in last.metadata_props:
        return None
    info = json.loads(last.metadata_props[AFFINE])
    nodes = [last]
    node = last.inputs[0].producer() if last.op_type == "Slice" else last
    if node is not last:
        nodes.append(node)
    add = node.inputs[0].producer()
    grouped = add.inputs[0].producer()
    dq = grouped.inputs[0].producer()
    nodes += [add, grouped, dq]
    half = dq.inputs[1].producer() is not None and dq.inputs[1].producer().op_type == "Cast"
    step, offset = (_const_through_cast(v, nodes) for v in (dq.inputs[1], add.inputs[1]))
    q = ir.convenience.get_const_tensor(dq.inputs[0]).numpy().astype(np.uint8)
    q = q[:info["length"]] if info["axis"] == 0 else q[:, :info["length"]]
    offset = offset.reshape(step.shape)
    return Affine(q, step, offset, int(info["block"]), int(info["axis"]), nodes[::-1], half)


def _const_through_cast(value: ir.Value, nodes: list[ir.Node]) -> np.ndarray:
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        nodes.append(producer)
        value = producer.inputs[0]
    return ir.convenience.get_const_tensor(value).numpy().astype(np.float32)


def remove(graph: ir.Graph, affine: Affine) -> None:
    """Drop the form's nodes and their initializers once nothing reads its output."""
    last = next(n for n in affine.nodes if AFFINE in n.metadata_props)
    if last.outputs[0].uses() or last.outputs[0].is_graph_output():
        return
    inputs = [v for n in affine.nodes for v in n.inputs if v is not None and v.is_initializer()]
    for node in reversed(affine.nodes):
        graph.remove(node, safe=True)
    for value in inputs:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
