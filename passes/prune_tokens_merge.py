"""Token pruning, part 10: ToMe (bipartite soft matching) in every block, as graph ops.

In each block from ``after`` on, between the attention and the MLP (the map's MLP input), the
current tokens are split alternately into A (even) and B (odd); every A token is matched to its
most similar B token by cosine of the block's attention keys (averaged over heads); the ``r``
best-matched A tokens are merged into their B partners by size-weighted averages (``x * size``
summed into their partners, divided by the summed size), the other A tokens
stay. Order: the kept A tokens (ascending), then B; the CLS (protected, never merged) stays first.
``r`` is clamped per block so that at least the protected tokens and one B token remain.

Sizes start at the attention mask (1 for tokens, 0 for padding: padding then weighs nothing in
any average, and valid A tokens never merge into a padding B token). Proportional attention:
every later block's attention scores get ``log(size)`` of the keys added before the Softmax, so
a merged token draws the attention of all the tokens it stands for (and padding, with size 0,
none). Side values (masks, shapes) follow each token's representative original position. At the
end every original token takes its representative's value (``token_map``), so pooled and
per-token outputs alike are restored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from passes import prune_tokens_plan as plan
from passes.graph_util import values_by_name
from passes.prune_tokens_build import kept_dim, regions, taken_names
from passes.prune_tokens_ops import Ops, gather_tokens, scatter_add
from passes.prune_tokens_restore import proportional_attention, reroute_readers
from passes.prune_tokens_scores import BIG, sort_ascending
from passes.prune_tokens_side import Region, reroute, retag
from passes.prune_tokens_stage import base_positions
from runtime.errors import PassError

_INT_MAX = np.iinfo(np.int64).max


def merge_blocks(model: ir.Model, model_map: Any, opts: Any, target: str) -> dict[str, Any]:
    graph = model.graph
    values = values_by_name(graph)
    first = plan.default_after(opts)
    model_map.block(first)
    blocks = model_map.blocks[first:]
    for block in blocks:
        if block.mlp is None or block.attention is None or block.attention.k is None:
            raise PassError(f"prune_tokens mode=merge merges between attention and MLP, and block {block.index} "
                            f"({block.name}) has no separate attention keys and MLP; use another mode.")
    gathers = [values[b.mlp.input] for b in blocks]
    tokens = plan.tokens_of(graph, model_map, values[model_map.blocks[first].input], target)
    last = values[model_map.blocks[-1].output]
    cut = regions(graph, gathers, last)
    readers, last_shape = list(last.uses()), last.shape
    ops = Ops(graph, "prune_tokens", taken_names(graph))
    positions = base_positions(ops, gathers[0])
    token_map, size = positions, _start_size(ops, tokens, gathers[0])
    n, previous_dim, previous_nodes, records, sizes = tokens.n, tokens.dim, set(), [], {}
    for i, (block, x, nodes) in enumerate(zip(blocks, gathers, cut)):
        r = opts.r if n is None else min(opts.r, (n + 1) // 2 - max(opts.protect, 1))
        if r < 1:
            break
        merged = _merge(ops, x, values[block.attention.k], size, positions, (r, n), block.attention.heads, opts.protect)
        n = None if n is None else n - r
        dim = kept_dim(tokens.dim, n, i)
        fresh = {id(v) for node in ops.nodes for v in node.outputs}
        region = Region(nodes, x, merged["x"], merged["positions"], merged["order"], merged["count"], dim,
                        previous_dim, previous_nodes)
        rewritten = reroute(ops, region, tokens.dim, fresh)
        retag(nodes, tokens.dim, dim)
        token_map = ops.op("GatherElements", merged["new_index"], token_map, axis=1)
        positions, size = merged["positions"], merged["size"]
        sizes[block.index] = size
        previous_dim, previous_nodes = dim, {id(node) for node in nodes}
        records.append({"block": block.index, "name": block.name, "merged": r,
                        "tokens": n if n is not None else f"N - {opts.r * (i + 1)}", "side_values_rewritten": rewritten})
    proportional_attention(ops, model_map, {i + 1: size for i, size in sizes.items() if i + 1 < len(model_map.blocks)})
    full = ops.op("GatherND", last, ops.op("Unsqueeze", token_map, ops.i64(-1)), batch_dims=1)
    reroute_readers(graph, last, full, readers, last_shape)
    return {"mode": "merge", "r": opts.r, "stages": records, "restored": True,
            "restore_reason": "merged tokens stand for several: every original token takes its representative's value",
            "proportional_attention": True, "tokens_per_block": _counts(model_map, records, tokens.n)}


def _start_size(ops: Ops, tokens, x: ir.Value) -> ir.Value:
    if tokens.mask is not None:
        return ops.op("Cast", tokens.mask, to=ir.DataType.FLOAT)
    return ops.op("ConstantOfShape", ops.op("Shape", x, start=0, end=2), value=ir.tensor(np.array([1.0], np.float32)))


def _halves(ops: Ops, value: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(even tokens, odd tokens) of ``value`` along axis 1."""
    return tuple(ops.op("Slice", value, ops.i64(start), ops.i64(_INT_MAX), ops.i64(1), ops.i64(2)) for start in (0, 1))


def _metric(ops: Ops, keys: ir.Value, heads: int | None) -> ir.Value:
    if heads:
        keys = ops.op("ReduceMean", ops.op("Reshape", keys, ops.i64(0, 0, heads, -1)), ops.i64(2), keepdims=0)
    return ops.op("Div", keys, ops.op("Max", ops.op("ReduceL2", keys, ops.i64(-1), keepdims=1), ops.f32(1e-6)))


def _merge(ops: Ops, x, keys, size, positions, counts: tuple[int, int | None], heads: int | None,
           protect: int) -> dict[str, ir.Value]:
    """One ToMe step; ``counts`` is (r, the static token count or None)."""
    r, n = counts
    a_key, b_key = _halves(ops, _metric(ops, keys, heads))
    scores = ops.op("MatMul", a_key, ops.op("Transpose", b_key, perm=[0, 2, 1]))  # [B, Na, Nb]
    a_size, b_size = _halves(ops, size)
    a_pos, b_pos = _halves(ops, positions)
    zero = ops.f32(0.0)
    scores = ops.op("Where", ops.op("Unsqueeze", ops.op("Greater", b_size, zero), ops.i64(1)), scores, ops.f32(-BIG))
    scores = ops.op("Where", ops.op("Unsqueeze", ops.op("Greater", a_size, zero), ops.i64(2)), scores, ops.f32(BIG))
    if protect:
        guarded = ops.op("Less", a_pos, ops.const(np.array(protect, dtype=np.int64)))
        scores = ops.op("Where", ops.op("Unsqueeze", guarded, ops.i64(2)), ops.f32(-2 * BIG), scores)
    best = ops.op("ReduceMax", scores, ops.i64(2), keepdims=0)
    partner = ops.op("ArgMax", scores, axis=2, keepdims=0)
    if n is not None:  # constants, so that TensorRT's TopK gets a build-time K
        na, merges, stay_count = ops.i64((n + 1) // 2), ops.i64(r), ops.i64((n + 1) // 2 - r)
    else:  # a short sequence merges fewer: the protected tokens and one A token stay
        na = ops.dim(a_key, 1)
        merges = ops.op("Max", ops.op("Min", ops.i64(r), ops.op("Sub", na, ops.i64(max(protect, 1)))), ops.i64(0))
        stay_count = ops.op("Sub", na, merges)
    _, order = ops.op("TopK", best, na, axis=1, largest=1, sorted=1, outputs=2)
    src = ops.op("Slice", order, ops.i64(0), merges, ops.i64(1))
    stay = sort_ascending(ops, ops.op("Slice", order, merges, ops.i64(_INT_MAX), ops.i64(1)), stay_count)
    dst = ops.op("GatherElements", partner, src, axis=1)
    weighted = ops.op("Mul", x, ops.op("Unsqueeze", size, ops.i64(-1)))
    a_x, b_x = _halves(ops, weighted)
    moving = gather_tokens(ops, a_x, src)
    b_x = scatter_add(ops, b_x, dst, moving, vectors=True)
    b_size = scatter_add(ops, b_size, dst, ops.op("GatherElements", a_size, src, axis=1), vectors=False)
    new_size = ops.op("Concat", ops.op("GatherElements", a_size, stay, axis=1), b_size, axis=1)
    summed = ops.op("Concat", gather_tokens(ops, a_x, stay), b_x, axis=1)
    new_x = ops.op("Div", summed, ops.op("Unsqueeze", ops.op("Max", new_size, ops.f32(1e-6)), ops.i64(-1)))
    new_positions = ops.op("Concat", ops.op("GatherElements", a_pos, stay, axis=1), b_pos, axis=1)
    new_index = _new_index(ops, positions, stay, src, dst, stay_count)
    count = ops.i64(n - r) if n is not None else ops.op("Sub", ops.dim(x, 1), merges)
    # ``order``: indices of the new tokens in the previous set (a merged B token counts as its B self)
    kept_prev = ops.op("Concat", ops.op("Mul", stay, ops.i64(2)),
                       ops.op("Add", ops.op("Mul", _arange_like(ops, b_pos), ops.i64(2)), ops.i64(1)), axis=1)
    return {"x": new_x, "size": new_size, "positions": new_positions, "new_index": new_index, "count": count,
            "order": kept_prev}


def _arange_like(ops: Ops, rows: ir.Value) -> ir.Value:
    """``[B, M]`` holding 0..M-1 in every row, shaped like ``rows``."""
    return base_positions(ops, ops.op("Unsqueeze", rows, ops.i64(-1)))


def _new_index(ops: Ops, positions, stay, src, dst, stay_count) -> ir.Value:
    """``[B, N]``: where every current token goes (its own slot, or its B partner's)."""
    a_rows, b_rows = _halves(ops, positions)
    a_index = ops.op("Mul", a_rows, ops.i64(0))  # zeros shaped like the A half
    a_index = ops.op("ScatterElements", a_index, stay, _arange_like(ops, stay), axis=1)
    a_index = ops.op("ScatterElements", a_index, src, ops.op("Add", dst, stay_count), axis=1)
    b_index = ops.op("Add", _arange_like(ops, b_rows), stay_count)
    slots = _arange_like(ops, positions)
    even, odd = _halves(ops, slots)
    index = ops.op("ScatterElements", ops.op("Mul", slots, ops.i64(0)), even, a_index, axis=1)
    return ops.op("ScatterElements", index, odd, b_index, axis=1)


def _counts(model_map: Any, records: list[dict], n: int | None) -> list[tuple[float, float]]:
    """Per block, (tokens in attention, tokens in the MLP) as fractions of the original count."""
    base = n or 128
    merged = {r["block"]: r["merged"] for r in records}
    out, current = [], base
    for block in model_map.blocks:
        after = current - merged.get(block.index, 0)
        out.append((current / base, after / base))
        current = after
    return out
