"""Outlier channels kept in float: an exact channel split in front of a quantized matmul.

A matmul whose input comes from an elementwise activation of another matmul (the MLP's
``down(gelu(up(x) + b))``) often sees one or two channels far larger than the rest (MiniLM:
one Gelu output channel at 24 against a median of 1.3), and a per-tensor int8 activation step
is then set by them. Those channels come from columns of the upstream weight, so they can be
computed apart at no extra full-size work::

    up(x) with columns `out` zeroed -> act -> down with rows `out` zeroed   (quantized, as before)
    up(x)[:, out] -> act -> down[out, :]                                     (float, k columns: tiny)
    result = main + outlier part        (the Add joins the residual Sum when lowered)

The main path keeps its width (zeroed columns, not removed ones): MLAS's int8 GEMM measured
markedly slower on two threads with K = 1535 than with 1536. Outliers are the channels whose
calibrated |x| maximum exceeds ``ratio`` times the median channel's, at most
``MAX_FRACTION`` of them. Handled producers: a MatMul with a constant weight, an optional
constant bias Add, then one unary activation with act(0) = 0 (Gelu, Relu, Tanh, Erf,
FastGelu, QuickGelu; so the zeroed channels are exactly 0 and widen no range), each read only
by the next. Anything else: no split.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.quantize_rewrite import constant, drop_if_unused
from passes.quantize_sites import Site

UNARY = {"Gelu", "Relu", "Tanh", "Erf", "FastGelu", "QuickGelu"}
MAX_FRACTION = 0.02


def outlier_channels(absmax: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of channels above ``ratio`` x the median channel maximum (largest first, capped)."""
    if ratio <= 0 or absmax is None or absmax.size < 8:
        return np.array([], np.int64)
    typical = float(np.median(absmax)) or 1e-12
    order = np.argsort(-absmax)
    cap = max(1, int(absmax.size * MAX_FRACTION))
    return np.sort(np.array([i for i in order[:cap] if absmax[i] > ratio * typical], np.int64))


def producer_chain(x: ir.Value, sites: list[Site]) -> tuple[ir.Node, ir.Node | None, ir.Node] | None:
    """(matmul, bias add or None, activation) producing ``x`` for ``sites`` only, or None."""
    act = x.producer()
    readers = {id(s.node) for s in sites}
    if act is None or act.op_type not in UNARY or any(id(u.node) not in readers for u in x.uses()):
        return None
    prev = _single_producer(act.inputs[0])
    add = None
    if prev is not None and prev.op_type == "Add":
        add, prev = prev, _single_producer(_non_constant(prev))
    if prev is None or prev.op_type != "MatMul" or _const(prev.inputs[1]) is None:
        return None
    if add is not None and _bias(add, prev) is None:
        return None
    return prev, add, act


def split(graph: ir.Graph, chain, sites: list[Site], out: np.ndarray, upstream: Site | None) -> None:
    """Move channels ``out`` of the chain into a float side path added after each site."""
    matmul, add, act = chain
    w1 = _const(matmul.inputs[1]).numpy()
    x0 = matmul.inputs[0]
    side_h = ir.node("MatMul", [x0, constant(graph, f"{matmul.name}_outliers_w", w1[:, out].copy())],
                     name=f"{matmul.name}_outliers")
    side = [side_h]
    h = side_h.outputs[0]
    if add is not None:
        bias = _bias(add, matmul)
        side.append(ir.node("Add", [h, constant(graph, f"{add.name}_outliers_b", bias[out].copy())],
                            name=f"{add.name}_outliers"))
        h = side[-1].outputs[0]
        _replace(graph, add, _bias_slot(add, matmul), _zeroed(bias, out, axis=0))
    side.append(ir.node(act.op_type, [h], attributes={a.name: a.value for a in act.attributes.values()},
                        domain=act.domain, name=f"{act.name}_outliers"))
    for node in side:
        _narrow(node.outputs[0], len(out), like=act.outputs[0])
    graph.insert_after(act, side)
    _replace(graph, matmul, 1, _zeroed(w1, out, axis=1))
    if upstream is not None:
        upstream.weight = _zeroed(upstream.weight, out, axis=1)
    for site in sites:
        _add_side(graph, site, side[-1].outputs[0], site.weight[out].copy())
        site.weight = _zeroed(site.weight, out, axis=0)
        _replace(graph, site.node, 1, site.weight)


def _zeroed(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    out = np.array(array, dtype=np.float32, copy=True)
    if axis == 0:
        out[index] = 0.0
    else:
        out[:, index] = 0.0
    return out


def _replace(graph: ir.Graph, node: ir.Node, slot: int, array: np.ndarray) -> None:
    old = node.inputs[slot]
    node.replace_input_with(slot, constant(graph, f"{old.name or node.name}_main", array))
    drop_if_unused(graph, old)


def _add_side(graph: ir.Graph, site: Site, g_out: ir.Value, rows: np.ndarray) -> None:
    """site result += g_out @ rows, joined after the site's bias Add (so lowering still folds it)."""
    mm = ir.node("MatMul", [g_out, constant(graph, f"{site.node.name}_outliers_w", rows)],
                 name=f"{site.node.name}_outliers")
    tail = site.node
    uses = tail.outputs[0].uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add" and _bias(uses[0].node, tail) is not None:
        tail = uses[0].node
    result = tail.outputs[0]
    join = ir.node("Add", [result, mm.outputs[0]], name=f"{site.node.name}_outliers_add")
    graph.insert_after(tail, [mm, join])
    name = result.name
    result.name = f"{name}_main"
    joined = join.outputs[0]
    joined.name, joined.type, joined.shape = name, result.type, result.shape
    for use in list(result.uses()):
        if use.node is not join:
            use.node.replace_input_with(use.idx, joined)
    for i, value in enumerate(graph.outputs):
        if value is result:
            graph.outputs[i] = joined


def _narrow(value: ir.Value, width: int, like: ir.Value) -> None:
    """Give a side-path value ``like``'s type and shape with ``width`` channels."""
    if like.shape is not None and like.shape.rank():
        value.shape = ir.Shape([*like.shape.dims[:-1], width])
    value.type = like.type


def _single_producer(value: ir.Value | None) -> ir.Node | None:
    if value is None or len(value.uses()) != 1 or value.is_graph_output():
        return None
    return value.producer()


def _const(value: ir.Value | None):
    return ir.convenience.get_const_tensor(value) if value is not None else None


def _non_constant(add: ir.Node) -> ir.Value | None:
    loose = [v for v in add.inputs if _const(v) is None]
    return loose[0] if len(loose) == 1 else None


def _bias_slot(add: ir.Node, matmul: ir.Node) -> int:
    return 1 if add.inputs[0] is matmul.outputs[0] else 0


def _bias(add: ir.Node, matmul: ir.Node) -> np.ndarray | None:
    """The constant [N] operand of ``add`` when its other operand is ``matmul``'s output."""
    if len(add.inputs) != 2 or matmul.outputs[0] not in add.inputs:
        return None
    tensor = _const(add.inputs[_bias_slot(add, matmul)])
    n = _const(matmul.inputs[1]).shape[-1] if _const(matmul.inputs[1]) is not None else None
    if tensor is None or tuple(tensor.shape) != (n,):
        return None
    return tensor.numpy().astype(np.float32)
