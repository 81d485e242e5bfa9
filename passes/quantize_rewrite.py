"""Graph edits of the quantize pass: the target-neutral form of its decisions.

A quantized site becomes ``MatMul(x, DequantizeLinear(W_int8, scale, axis=1))``: symmetric
int8 weights with zero point 0 and one scale per output channel (or one per tensor), the form
TensorRT and ONNX Runtime both read. The MatMul carries node metadata ``carve.quantize``
(JSON: mode, site, block, role, smoothing) so that a target's lowering knows how activations
are to be handled: ``dynamic`` (quantized at run time), ``w8`` (kept float) or ``w8a8`` (a
static ``QuantizeLinear``/``DequantizeLinear`` pair with a calibrated scale is inserted on the
activation, shared by every site that reads it). Weight-only ``w8``/``w4`` with ``block`` B
use ``DequantizeLinear(W, scale[ceil(K/B), N], axis=0, block_size=B)`` and ``w4`` stores W as
INT4 (both opset 21). Run as plain ONNX, the graph computes the quantized weights exactly, so
it can be checked before any lowering.

Cases handled: a Gemm site becomes MatMul plus an Add of its bias (C); a weight still read by
other nodes (tied embeddings) is kept for them; SmoothQuant factors are folded into the
producing LayerNormalization / RMS norm / constant Mul when the sites are its only readers
(pre-norm blocks), else a ``Mul`` by 1/s is inserted once for all sites that read the value.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from passes.quantize_sites import Site

META = "carve.quantize"
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}


def constant(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer with a name not yet used in ``graph`` (``dtype`` e.g. INT4 for int8-held values)."""
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                     const_value=ir.tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def fresh_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_N``, not yet naming a value of ``graph`` (two sites may share one weight)."""
    taken = {v.name for n in graph for v in n.outputs} | set(graph.initializers) | {v.name for v in graph.inputs}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def base_name(site: Site) -> str:
    weight = site.node.inputs[1]
    return weight.name if weight is not None and weight.name else site.node.name


def first_reader(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The node of ``nodes`` that comes first in graph order (new nodes go before it)."""
    wanted = {id(n) for n in nodes}
    return next(n for n in graph if id(n) in wanted)


def as_matmul(graph: ir.Graph, site: Site) -> None:
    """Turn a Gemm site into MatMul (+ Add of C); a MatMul site is left as it is."""
    node = site.node
    if node.op_type == "MatMul":
        return
    matmul = ir.node("MatMul", [node.inputs[0], node.inputs[1]], name=f"{node.name}_matmul")
    out = matmul.outputs[0]
    new = [matmul]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        add = ir.node("Add", [out, node.inputs[2]], name=f"{node.name}_bias")
        new.append(add)
        out = add.outputs[0]
    graph.insert_before(node, new)
    old = node.outputs[0]
    name, old.name = old.name, None
    out.name, out.type, out.shape = name, old.type, old.shape
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    matmul.metadata_props.update(node.metadata_props)
    graph.remove(node, safe=True)
    site.node = matmul


def quantize_weight(graph: ir.Graph, site: Site, q: np.ndarray, scale: np.ndarray, info: dict,
                    bits: int = 8, block: int = 0) -> None:
    """Make the site read ``DequantizeLinear(q, scale)`` and record ``info`` on its MatMul.

    ``scale`` [N] is per output channel (axis 1), [] per tensor, [ceil(K/block), N] per block
    along K (axis 0 with ``block_size``, opset 21); ``bits`` 4 stores ``q`` as INT4.
    """
    as_matmul(graph, site)
    attributes = {"axis": 0, "block_size": block} if block else ({"axis": 1} if scale.ndim else {})
    read_dequantized(graph, site.node, base_name(site), q, scale, attributes, bits)
    site.node.metadata_props[META] = json.dumps(info, sort_keys=True)


def read_dequantized(graph: ir.Graph, node: ir.Node, base: str, q: np.ndarray, scale: np.ndarray,
                     attributes: dict, bits: int = 8) -> None:
    """Make ``node`` read its weight (input 1) as ``DequantizeLinear(q, scale)``; the old weight
    is dropped when nothing else reads it. ``bits`` 4 stores ``q`` as INT4."""
    old = node.inputs[1]
    dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
    dq = ir.node("DequantizeLinear", [constant(graph, f"{base}_int{bits}", q, dtype), constant(graph, f"{base}_scale", scale)],
                 attributes=attributes, name=f"{node.name}_weight_dq")
    dq.outputs[0].name = fresh_name(graph, f"{base}_dq")
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(q.shape)
    graph.insert_before(node, [dq])
    node.replace_input_with(1, dq.outputs[0])
    drop_if_unused(graph, old)


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is None or value.uses():
        return
    if value.is_initializer() and not value.is_graph_input():
        graph.initializers.pop(value.name)
    elif value.producer() is not None and value.producer().op_type == "Constant":
        graph.remove(value.producer(), safe=True)


def scaled_input(graph: ir.Graph, x: ir.Value, sites: list[Site], factors: np.ndarray,
                 upstream: dict[int, Site] | None = None) -> str:
    """Divide ``x`` by ``factors`` for ``sites`` only; returns how ("folded into NODE" or "mul").

    ``upstream`` maps id(MatMul node) -> Site for sites not yet quantized, whose weight
    columns a gated product may fold into.
    """
    producer = x.producer()
    if _only_sites(x, sites) and producer is not None:
        target = _fold(graph, producer, factors) or _fold_gate(graph, producer, factors, upstream or {})
        if target:
            return f"folded into {target}"
    mul = ir.node("Mul", [x, constant(graph, f"{x.name}_smooth", (1.0 / factors).astype(np.float32))],
                  name=f"{x.name}_smooth_mul")
    mul.outputs[0].name = f"{x.name}_smoothed"
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    graph.insert_before(first_reader(graph, [s.node for s in sites]), [mul])
    for site in sites:
        site.node.replace_input_with(0, mul.outputs[0])
    return "mul"


def foldable(x: ir.Value, sites: list[Site]) -> bool:
    """Whether ``scaled_input`` can fold factors for ``sites`` into a producer (no Mul needed)."""
    producer, width = x.producer(), sites[0].weight.shape[0]
    if producer is None or not _only_sites(x, sites):
        return False
    if _norm_slots(producer, width):
        return True
    return producer.op_type == "Mul" and any(_linear_source(v, width) for v in producer.inputs)


def _only_sites(x: ir.Value, sites: list[Site]) -> bool:
    readers = {id(s.node) for s in sites}
    return all(id(use.node) in readers and use.idx == 0 for use in x.uses()) and not x.is_graph_output()


def _norm_slots(producer: ir.Node, width: int) -> list[int]:
    """Inputs of a norm (scale, bias) or constant Mul operand that are constant [width]; [] if any is not."""
    if producer.op_type in _NORMS and producer.domain in ("", "com.microsoft"):
        slots = [i for i in (1, 2) if i < len(producer.inputs) and producer.inputs[i] is not None]
    elif producer.op_type == "Mul":
        slots = [i for i in (0, 1) if ir.convenience.get_const_tensor(producer.inputs[i]) is not None][:1]
    else:
        return []
    arrays = [ir.convenience.get_const_tensor(producer.inputs[i]) for i in slots]
    if any(a is None or a.shape.dims[-1:] != (width,) for a in arrays):
        return []
    return slots


def _fold(graph: ir.Graph, producer: ir.Node, factors: np.ndarray) -> str | None:
    """Divide a norm's scale and bias (or a constant Mul operand) by ``factors``; its name, or None."""
    slots = _norm_slots(producer, len(factors))
    if not slots:
        return None
    arrays = [ir.convenience.get_const_tensor(producer.inputs[i]) for i in slots]
    for i, tensor in zip(slots, arrays):
        old = producer.inputs[i]
        producer.replace_input_with(i, constant(graph, f"{old.name or producer.name}_smoothed",
                                                (tensor.numpy() / factors).astype(np.float32)))
        drop_if_unused(graph, old)
    return producer.name


def _fold_gate(graph: ir.Graph, producer: ir.Node, factors: np.ndarray, upstream: dict[int, Site]) -> str | None:
    """x = a * (h @ W + b), W constant (gated MLP's up projection): divide W's columns and b instead."""
    if producer.op_type != "Mul" or len(producer.inputs) != 2:
        return None
    for value in producer.inputs:
        found = _linear_source(value, len(factors))
        if found is None:
            continue
        matmul, add = found
        site = upstream.get(id(matmul))
        if site is not None:
            site.weight = site.weight / factors[None, :]
        else:
            _replace_const(graph, matmul, 1, ir.convenience.get_const_tensor(matmul.inputs[1]).numpy() / factors)
        if add is not None:
            slot = next(i for i, v in enumerate(add.inputs) if v is not matmul.outputs[0])
            _replace_const(graph, add, slot, ir.convenience.get_const_tensor(add.inputs[slot]).numpy() / factors)
        return matmul.name
    return None


def _linear_source(value: ir.Value | None, width: int) -> tuple[ir.Node, ir.Node | None] | None:
    """(MatMul with a constant [K, width] weight, its constant bias Add or None) producing ``value`` alone."""
    node = value.producer() if value is not None and len(value.uses()) == 1 else None
    add = None
    if node is not None and node.op_type == "Add":
        consts = [v for v in node.inputs if ir.convenience.get_const_tensor(v) is not None]
        others = [v for v in node.inputs if ir.convenience.get_const_tensor(v) is None]
        if len(consts) != 1 or len(others) != 1 or tuple(consts[0].shape or ()) != (width,) or len(others[0].uses()) != 1:
            return None
        add, node = node, others[0].producer()
    if node is None or node.op_type != "MatMul":
        return None
    weight = ir.convenience.get_const_tensor(node.inputs[1])
    if weight is None or len(weight.shape) != 2 or weight.shape[1] != width:
        return None
    return node, add


def _replace_const(graph: ir.Graph, node: ir.Node, slot: int, array: np.ndarray) -> None:
    old = node.inputs[slot]
    node.replace_input_with(slot, constant(graph, f"{old.name or node.name}_smoothed", array.astype(np.float32)))
    drop_if_unused(graph, old)


def activation_qdq(graph: ir.Graph, x: ir.Value, sites: list[Site], scale: float) -> None:
    """Insert one static symmetric int8 Q/DQ pair on ``x`` for ``sites``."""
    s = constant(graph, f"{x.name}_act_scale", np.array(scale, np.float32))
    zero = constant(graph, f"{x.name}_act_zero", np.array(0, np.int8))
    quant = ir.node("QuantizeLinear", [x, s, zero], name=f"{x.name}_act_q")
    dequant = ir.node("DequantizeLinear", [quant.outputs[0], s, zero], name=f"{x.name}_act_dq")
    quant.outputs[0].name, dequant.outputs[0].name = f"{x.name}_act_int8", f"{x.name}_act_dq"
    quant.outputs[0].type = ir.TensorType(ir.DataType.INT8)
    dequant.outputs[0].type, dequant.outputs[0].shape = x.type, x.shape
    quant.outputs[0].shape = x.shape
    graph.insert_before(first_reader(graph, [site.node for site in sites]), [quant, dequant])
    for site in sites:
        site.node.replace_input_with(0, dequant.outputs[0])


def decision(node: ir.Node) -> dict | None:
    """The ``carve.quantize`` record of a node, or None."""
    text = node.metadata_props.get(META)
    return json.loads(text) if text else None
