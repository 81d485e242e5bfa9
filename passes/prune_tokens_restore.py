"""Token pruning, part 4: the output contract (restoring the full token set at the end).

Whether to restore (``restore=auto``): the graph after the last block is walked from the last
block's output. Paths that reach a reduction over the token axis (a mean or sum pool, e.g.
MiniLM's masked mean) or a Gather of a protected position on the token axis (the CLS token)
through per-token ops only (norms, elementwise ops, weight matmuls) are pooled and need no
restore; a path that reaches a graph output with the token axis, or any other op (ViT-S's
Slice and Reshape of the patch tokens into a grid), needs every token: the pass restores.

How (``scatter_back``): dropped tokens take their last computed value. The stream before the
first gather is the starting full tensor; at every later stage, and at the end, the current
tokens are scattered into it at their original positions. Merged tokens (``mode=merge``) are
restored by a Gather instead: each original token takes its merge representative's value.
The restored value replaces the last block's output for every reader after the blocks; a graph
output keeps its name and shape.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from passes.prune_tokens_ops import Ops, scatter_add, scatter_tokens
from runtime.errors import PassError

_PER_TOKEN = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity", "Neg", "Abs",
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "Gelu", "Relu", "Tanh", "Sigmoid", "Erf", "Softplus", "Clip", "MatMul", "Gemm", "Where",
}
_POOLS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}


def needs_restore(last_output: ir.Value, token_axis: int, protect: int) -> tuple[bool, str]:
    """(whether the outputs need every token, the reason), from the walk in the module docstring."""
    frontier, seen = [last_output], set()
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            return True, f"graph output {value.name!r} is per token"
        for node, _ in value.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            verdict = _classify(node, token_axis, protect)
            if verdict == "pooled":
                continue
            if verdict != "per-token":
                return True, f"{node.op_type} node {node.name!r} reads the tokens"
            frontier.extend(node.outputs)
    return False, "the outputs pool the tokens"


def _classify(node: ir.Node, token_axis: int, protect: int) -> str:
    if node.op_type in _POOLS:
        axes = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None and "axes" in node.attributes:
            axes = list(node.attributes["axes"].value)
        rank = _rank(node.inputs[0])
        if axes is None or rank is None:
            return "other"
        axes = [a + rank if a < 0 else a for a in axes]
        return "pooled" if token_axis in axes else "per-token"
    if node.op_type == "Gather":
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        index = _constant(node.inputs[1])
        if axis == token_axis and index is not None and all(0 <= i < protect for i in index):
            return "pooled"
        return "other"
    return "per-token" if node.op_type in _PER_TOKEN else "other"


def _constant(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in value.const_value.numpy().reshape(-1)]


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def scatter_back(ops: Ops, first_full: ir.Value, steps: list[tuple[ir.Value, ir.Value]]) -> ir.Value:
    """Start from ``first_full`` and scatter each ``(positions, tokens)`` in order."""
    full = first_full
    for positions, tokens in steps:
        full = scatter_tokens(ops, full, positions, tokens)
    return full


def nearest_kept(ops: Ops, tokens: ir.Value, kept: ir.Value) -> ir.Value:
    """``[batch, N]``: for every token of ``tokens``, the index of the most similar (cosine) of
    ``kept`` (kept tokens find themselves)."""
    def unit(x: ir.Value) -> ir.Value:
        return ops.op("Div", x, ops.op("Max", ops.op("ReduceL2", x, ops.i64(-1), keepdims=1), ops.f32(1e-6)))

    similarity = ops.op("MatMul", unit(tokens), ops.op("Transpose", unit(kept), perm=[0, 2, 1]))
    return ops.op("ArgMax", similarity, axis=2, keepdims=0)


def take_representatives(ops: Ops, tokens: ir.Value, token_map: ir.Value) -> ir.Value:
    """``tokens[b, token_map[b, t]]`` for every original token ``t`` (merged tokens' restore)."""
    return ops.op("GatherND", tokens, ops.op("Unsqueeze", token_map, ops.i64(-1)), batch_dims=1)


def reroute_readers(graph: ir.Graph, old: ir.Value, new: ir.Value, readers: list[tuple[ir.Node, int]],
                    shape: ir.Shape | None) -> None:
    """Make ``readers`` (collected before ``new`` was built) read ``new``; if ``old`` is a graph
    output, ``new`` takes over its name and type, with ``shape`` (the full token set's)."""
    for node, index in readers:
        node.replace_input_with(index, new)
    new.shape, new.dtype = shape, old.dtype
    if old.is_graph_output():
        name, dtype = old.name, old.dtype
        old.name = f"{name}_kept_tokens"
        new.name, new.dtype, new.shape = name, dtype, shape
        for i, value in enumerate(graph.outputs):
            if value is old:
                graph.outputs[i] = new


def proportional_attention(ops: Ops, model_map: Any, sizes: dict[int, ir.Value]) -> None:
    """Add ``log(size)`` of the keys to the attention scores of each block in ``sizes`` (ToMe's
    proportional attention: a token standing for several draws their share of attention)."""
    nodes = {n.name: n for n in ops.graph}
    for index, size in sizes.items():
        site = model_map.blocks[index].attention
        softmax = nodes.get(site.softmax_node) if site is not None and site.softmax_node else None
        if softmax is None:
            raise PassError(f"prune_tokens adds log(size) to the attention scores of block {index}, which has no "
                            "Softmax (fused attention); use fill=last (no proportional attention) or another mode.")
        bias = ops.op("Unsqueeze", ops.op("Log", ops.op("Max", size, ops.f32(1e-6))), ops.i64(1, 2))
        softmax.replace_input_with(0, ops.op("Add", softmax.inputs[0], bias))


def represented(ops: Ops, token_map: ir.Value, weights: ir.Value, kept: ir.Value) -> ir.Value:
    """``[batch, K]``: how many original tokens (weighted: padding 0) each kept token stands for."""
    zeros = ops.op("Mul", ops.op("Cast", kept, to=ir.DataType.FLOAT), ops.f32(0.0))
    return scatter_add(ops, zeros, token_map, weights, vectors=False)
