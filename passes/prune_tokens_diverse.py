"""Token pruning, part 5: DivPrune's max-min diversity subset, as an ONNX Loop.

Greedy farthest-point selection on the stream's token features at the gather point, with
cosine distance ``D = 1 - cos(x_i, x_j)``: every step picks the token farthest from everything
picked so far (``argmax`` of each token's distance to its nearest picked token) and lowers the
others' distances by its row of ``D``. Protected tokens are picked first; when there are none,
the first valid token starts. Padding tokens (attention mask 0) come after every valid token, so
they are only picked when K exceeds the valid count. Picked tokens are never picked again.

The loop runs K times (a constant when N is static, else ``ceil(r * N)`` at run time), one
``[batch, N]`` update per step; its scan output is the pick order, sorted ascending afterwards
like the other criteria's indices.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.prune_tokens_ops import Ops

_UNSET, _PADDING, _PICKED, _PROTECTED = 1.0e4, -2.0, -3.0, 2.0e4


def distances(ops: Ops, x: ir.Value) -> ir.Value:
    """``[batch, N, N]`` cosine distances between the tokens of ``x`` ``[batch, N, hidden]``."""
    norm = ops.op("ReduceL2", x, ops.i64(-1), keepdims=1)
    unit = ops.op("Div", x, ops.op("Max", norm, ops.f32(1e-6)))
    similarity = ops.op("MatMul", unit, ops.op("Transpose", unit, perm=[0, 2, 1]))
    return ops.op("Sub", ops.f32(1.0), similarity)


def diverse_picks(ops: Ops, x: ir.Value, count: ir.Value, valid: ir.Value | None,
                  protected: ir.Value | None) -> ir.Value:
    """Indices ``[batch, K]`` of the greedy max-min diverse subset, in pick order."""
    dist = distances(ops, x)
    start = ops.op("ConstantOfShape", ops.op("Shape", x, start=0, end=2),
                   value=ir.tensor(np.array([_UNSET], dtype=np.float32)))
    if valid is not None:
        start = ops.op("Where", valid, start, ops.f32(_PADDING))
    if protected is not None:
        start = ops.op("Where", protected, ops.f32(_PROTECTED), start)
    positions = ops.op("Unsqueeze", ops.op("Range", ops.const(np.array(0, dtype=np.int64)),
                                          ops.op("Squeeze", ops.dim(x, 1), ops.i64(0)),
                                          ops.const(np.array(1, dtype=np.int64))), ops.i64(0))  # [1, N]
    body = _body(ops, dist, positions)
    trips = ops.op("Squeeze", count, ops.i64(0))
    keep_going = ops.const(np.array(True), "true")
    _, picks = ops.op("Loop", trips, keep_going, start, body=body, outputs=2)  # picks: [K, batch]
    return ops.op("Transpose", picks, perm=[1, 0])


def _body(outer: Ops, dist: ir.Value, positions: ir.Value) -> ir.Graph:
    """One greedy step: pick, update the distances to the picked set, mark the pick."""
    step = ir.Value(name=outer.name("div_step"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name=outer.name("div_cond"), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    state = ir.Value(name=outer.name("div_state"), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([step, cond, state], [], nodes=[], name=outer.name("divprune_body"))
    ops = Ops(graph, outer.prefix, outer.taken, body=True)
    pick = ops.op("ArgMax", state, axis=1, keepdims=1)  # [B, 1]: protected first, then farthest
    rows = ops.op("GatherElements", dist, ops.op("Expand", ops.op("Unsqueeze", pick, ops.i64(-1)),
                                                  ops.op("Concat", ops.op("Shape", pick), ops.dim(dist, 2), axis=0)),
                  axis=1)  # [B, 1, N]: distances from the pick
    nearer = ops.op("Min", ops.op("Squeeze", rows, ops.i64(1)), state)
    # protected tokens keep their priority until picked; padding and picked tokens keep their marks
    kept_marks = ops.op("Or", ops.op("Less", state, ops.f32(-1.0)), ops.op("Greater", state, ops.f32(_UNSET)))
    updated = ops.op("Where", kept_marks, state, nearer)
    picked = ops.op("Equal", positions, pick)
    new_state = ops.op("Where", picked, ops.f32(_PICKED), updated)
    cond_out = ops.op("Identity", cond)
    graph.outputs.extend([cond_out, new_state, ops.op("Squeeze", pick, ops.i64(1))])
    for value, dtype in ((cond_out, ir.DataType.BOOL), (new_state, ir.DataType.FLOAT)):
        value.dtype = dtype
    graph.outputs[2].dtype = ir.DataType.INT64
    return graph
