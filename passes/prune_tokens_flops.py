"""Token pruning, part 9: FLOPs per block before and after, for the pass record.

Per block, from the model map and the weights (read before the rewrite): the weight matmuls of
the attention sub-block and of the MLP cost ``2 * in * out`` per token each (MLP matmuls are those
downstream of the map's MLP input inside the block), and attention costs ``4 * heads * head_dim``
per query-key pair (Q.K^T and P.V). A block that sees ``n`` tokens in attention and ``m`` in its
MLP (they differ only for ``merge``, which merges between the two) costs
``attn_linear * n + attention * n^2 + mlp * m``. Graphs with a symbolic token count are
reported at ``REFERENCE_TOKENS`` (128); the scoring ops the pass adds are not counted (they are
small: one reduction of the probabilities, or N^2 * hidden for ``diverse``).
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from passes.prune_tokens_side import downstream

REFERENCE_TOKENS = 128
_MATMULS = {"MatMul", "Gemm"}


def block_costs(model_map: Any, model: ir.Model) -> list[tuple[int, int, int]]:
    """Per block: (attention linear FLOPs per token, attention FLOPs per token pair, MLP per token)."""
    nodes = {n.name: n for n in model.graph}
    values = {v.name: v for n in model.graph for v in n.outputs}
    out = []
    for block in model_map.blocks:
        members = {id(nodes[name]) for name in block.nodes if name in nodes}
        mlp_input = values.get(block.mlp.input) if block.mlp else None
        in_mlp = {id(n) for n in downstream(model.graph, [mlp_input])} & members if mlp_input is not None else set()
        attn, mlp = 0, 0
        for name in block.nodes:
            node = nodes.get(name)
            per_token = _weight_flops(node) if node is not None else 0
            if id(node) in in_mlp:
                mlp += per_token
            else:
                attn += per_token
        site = block.attention
        pair = 4 * site.heads * site.head_dim if site is not None and site.heads and site.head_dim else 0
        out.append((attn, pair, mlp))
    return out


def _weight_flops(node: ir.Node) -> int:
    if node.op_type not in _MATMULS or len(node.inputs) < 2:
        return 0
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return 0
    rows, cols = weight.const_value.shape
    return 2 * int(rows) * int(cols)


def flops_table(model_map: Any, model: ir.Model, ratios: list[tuple[float, float]] | None,
                before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Before the rewrite (``ratios`` None, ``before`` None): the costs and the full-token FLOPs;
    after: the same table with each block's tokens and FLOPs, and the totals."""
    if before is None:
        n = _static_tokens(model_map, model)
        costs = block_costs(model_map, model)
        return {"tokens": n or REFERENCE_TOKENS, "reference": n is None, "costs": costs}
    n, costs = before["tokens"], before["costs"]
    rows, total_before, total_after = [], 0, 0
    for index, (attn, pair, mlp) in enumerate(costs):
        full = attn * n + pair * n * n + mlp * n
        row: dict[str, Any] = {"block": index, "tokens_before": n, "gflops_before": round(full / 1e9, 4)}
        if ratios is not None:
            a, m = (math.ceil(r * n - 1e-9) for r in ratios[index])
            after = attn * a + pair * a * a + mlp * m
            row.update(tokens_after=a if a == m else [a, m], gflops_after=round(after / 1e9, 4))
            total_after += after
        rows.append(row)
        total_before += full
    table: dict[str, Any] = {"per_sequence_tokens": n, "reference_length": before["reference"], "blocks": rows,
                             "gflops_before": round(total_before / 1e9, 4)}
    if ratios is not None:
        table["gflops_after"] = round(total_after / 1e9, 4)
        table["fewer_flops"] = round(1 - total_after / total_before, 4) if total_before else 0.0
    else:
        table["note"] = "the kept count is data-dependent (threshold); FLOPs after depend on the input"
    return table


def _static_tokens(model_map: Any, model: ir.Model) -> int | None:
    values = {v.name: v for n in model.graph for v in n.outputs}
    first = values.get(model_map.blocks[0].input) if model_map.blocks else None
    if first is None or first.shape is None or len(first.shape) < 2:
        return None
    dim = first.shape[1]
    return dim if isinstance(dim, int) else None
