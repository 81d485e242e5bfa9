"""Position tables: RoPE's cos/sin evaluated once for every position, looked up by ``position_ids``.

A traced decoder computes its rotary tables from the sequence length (``Range(0, n)`` times the
inverse frequencies, then Cos/Sin). With a cache the new tokens sit at positions
``past..past+n-1`` (or anywhere, with left padding), so the pass evaluates the table subgraph
once at ``max_positions`` on ONNX Runtime and replaces each table by ``Gather(table,
position_ids)``. Row ``p`` of the evaluated table is computed exactly as the traced graph computes
it for position ``p``, so the rewrite stays exact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.graph_util import ancestors
from runtime.errors import PassError


def evaluate(graph: ir.Graph, outputs: list[ir.Value], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the subgraph computing ``outputs`` (cloned out of ``graph``) on ONNX Runtime."""
    import onnxruntime as ort

    sub = _slice(graph, outputs)
    model = ir.Model(sub, ir_version=10)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _slice(graph: ir.Graph, outputs: list[ir.Value]) -> ir.Graph:
    needed = _needed(graph, outputs)
    mapping: dict[int, ir.Value] = {}
    inputs = []
    for value in graph.inputs:
        if id(value) in needed:
            mapping[id(value)] = ir.Value(name=value.name, shape=value.shape, type=value.type)
            inputs.append(mapping[id(value)])
    initializers = []
    for value in graph.initializers.values():
        if id(value) in needed:
            copy = ir.Value(name=value.name, shape=value.shape, type=value.type, const_value=value.const_value)
            mapping[id(value)] = copy
            initializers.append(copy)
    nodes = []
    for node in graph:
        if not any(id(v) in needed for v in node.outputs):
            continue
        ins = [mapping[id(v)] if v is not None else None for v in node.inputs]
        clone = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()),
                        num_outputs=len(node.outputs), version=node.version, name=node.name)
        for old, new in zip(node.outputs, clone.outputs):
            new.name, mapping[id(old)] = old.name, new
        nodes.append(clone)
    outs = [mapping[id(v)] for v in outputs]
    return ir.Graph(inputs, outs, nodes=nodes, initializers=initializers, opset_imports=dict(graph.opset_imports))


def _needed(graph: ir.Graph, outputs: list[ir.Value]) -> set[int]:
    found = ancestors(outputs)
    for node in graph:
        if any(id(v) in found for v in node.outputs) and \
                any(attr.type == ir.AttributeType.GRAPH for attr in node.attributes.values()):
            raise PassError(f"a position table is computed with a subgraph ({node.op_type} {node.name}); "
                            "kv_cache cannot evaluate it.")
    return found


def rows(graph: ir.Graph, tables: list[ir.Value], token_input: ir.Value, length: int) -> list[np.ndarray]:
    """Each table as ``[positions, width]``: evaluated at ``length`` and ``length - 1`` tokens to
    find the position axis; every other axis but the last must be 1."""
    dtype = token_input.dtype.numpy() if token_input.dtype is not None else np.int64
    long = evaluate(graph, tables, {token_input.name: np.zeros((1, length), dtype)})
    short = evaluate(graph, tables, {token_input.name: np.zeros((1, length - 1), dtype)})
    out = []
    for value, a, b in zip(tables, long, short):
        axes = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        others = [d for i, d in enumerate(a.shape[:-1]) if i not in axes]
        if len(axes) != 1 or axes[0] != a.ndim - 2 or any(d != 1 for d in others):
            raise PassError(f"the position table {value.name} has shape {list(a.shape)} at {length} tokens; kv_cache "
                            "knows tables laid out as [1, ..., positions, width].")
        out.append(a.reshape(a.shape[-2], a.shape[-1]))
    return out
