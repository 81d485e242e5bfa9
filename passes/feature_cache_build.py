"""The feature cache's graph edit: the criterion in the main graph, the rest of the model in an ``If``.

``wrap_tail`` computes the residual of the chosen block (output minus input), its relative L1
change against the ``feature_cache.residual`` input, and ``recompute = not (change <
threshold)``. Every node downstream of the block's output moves into the ``If``'s then-branch
(its nodes keep reading weights and masks from the outer graph, as ONNX scoping allows); the
else-branch returns the ``feature_cache.previous.*`` inputs. Values of the moved outputs are
renamed ``<name>.computed`` inside the branch, since names must be unique across subgraphs.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from optimizer.structure_types import Block
from passes.graph_util import values_by_name
from runtime.errors import PassError

RESIDUAL_IN = "feature_cache.residual"
RESIDUAL_OUT = "feature_cache.next_residual"
RECOMPUTED = "feature_cache.recomputed"
PREVIOUS = "feature_cache.previous."


def wrap_tail(graph: ir.Graph, block: Block, threshold: float) -> int:
    values = values_by_name(graph)
    boundary, start = values[block.output], values[block.input]
    tail = _descendants(graph, boundary)
    outputs = list(graph.outputs)
    inside = {id(v) for node in tail for v in node.outputs}
    stray = [v.name for v in outputs if id(v) not in inside]
    if stray:
        raise PassError(f"output {stray[0]} is not computed from the residual stream after block {block.index}; "
                        "feature_cache can only reuse outputs that depend on the skipped blocks.")
    residual, recompute, state_in, next_residual = _criterion(graph, boundary, start, threshold)
    previous = [ir.Value(name=PREVIOUS + v.name, shape=v.shape, type=v.type) for v in outputs]
    graph.remove(tail, safe=False)
    graph.outputs.clear()  # the moved outputs become the branch's
    results = _if(graph, recompute, tail, outputs, previous)
    graph.inputs.extend([state_in] + previous)
    graph.outputs.extend(results + [next_residual, recompute])
    return len(tail)




def _descendants(graph: ir.Graph, value: ir.Value) -> list[ir.Node]:
    seen, queue = set(), deque([value])
    while queue:
        for user, _ in queue.popleft().uses():
            if id(user) not in seen:
                seen.add(id(user))
                queue.extend(user.outputs)
    return [node for node in graph if id(node) in seen]


def _criterion(graph: ir.Graph, boundary: ir.Value, start: ir.Value, threshold: float):
    t = tape.Tape()
    state_in = ir.Value(name=RESIDUAL_IN, shape=boundary.shape, type=boundary.type)
    const = lambda x, n: t.initializer(ir.tensor(np.array(x, boundary.dtype.numpy())), name=f"feature_cache_{n}")
    residual = t.op("Sub", [boundary, start], name="feature_cache_residual")
    moved = t.op("ReduceSum", [t.op("Abs", [t.op("Sub", [residual, state_in])])], {"keepdims": 0})
    scale = t.op("Add", [t.op("ReduceSum", [t.op("Abs", [state_in])], {"keepdims": 0}), const(1e-12, "tiny")])
    change = t.op("Div", [moved, scale], name="feature_cache_change")
    recompute = t.op("Not", [t.op("Less", [change, const(threshold, "threshold")])], name="feature_cache_decide")
    recompute.name = RECOMPUTED
    next_residual = t.op("Where", [recompute, residual, state_in], name="feature_cache_keep_residual")
    next_residual.name = RESIDUAL_OUT
    next_residual.type, next_residual.shape = boundary.type, boundary.shape
    recompute.type, recompute.shape = ir.TensorType(ir.DataType.BOOL), ir.Shape([])
    for value in t.initializers:
        graph.register_initializer(value)
    for i, node in enumerate(t.nodes):
        node.name = node.name or f"feature_cache_{node.op_type}_{i}"
    graph.extend(t.nodes)
    return residual, recompute, state_in, next_residual


def _if(graph: ir.Graph, recompute: ir.Value, tail: list[ir.Node], outputs: list[ir.Value],
        previous: list[ir.Value]) -> list[ir.Value]:
    names = [v.name for v in outputs]
    for value in outputs:
        value.name = f"{value.name}.computed"
    then = ir.Graph([], outputs, nodes=tail, name="feature_cache_recompute")
    kept = [ir.Node("", "Identity", [p], name=f"feature_cache_reuse_{i}") for i, p in enumerate(previous)]
    for node, value in zip(kept, outputs):
        node.outputs[0].name = f"{value.name[:-len('.computed')]}.reused"
    reuse = ir.Graph([], [n.outputs[0] for n in kept], nodes=kept, name="feature_cache_reuse")
    node = ir.Node("", "If", [recompute], attributes=[ir.AttrGraph("then_branch", then), ir.AttrGraph("else_branch", reuse)],
                   num_outputs=len(outputs), name="feature_cache_if")
    for result, value, name in zip(node.outputs, outputs, names):
        result.name, result.type, result.shape = name, value.type, value.shape
    graph.append(node)
    return list(node.outputs)
