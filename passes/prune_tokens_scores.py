"""Token pruning, part 3: per-token importance and the choice of the kept tokens, as graph ops.

Criteria (each gives a float ``[batch, N]`` score, higher = keep):
- ``attention_scores``: attention received, from the block's own probabilities
  ``[batch, heads, N, N]``: the CLS row (query 0) averaged over heads (``source=cls``), or the
  average over heads and queries (``source=mean``; padding queries included: their rows only
  spread over valid keys, so they add little);
- ``pagerank_scores``: Zero-TPrune's weighted PageRank on the head-averaged attention graph:
  ``s <- s A`` from a uniform start over the valid tokens, renormalised, ``iterations`` times
  (Zero-TPrune's second, similarity-based stage is not done);
- ``frame_change``: TimeChat-Online's differential drop: 1 - cosine between each token's
  features and the previous frame's at the same position (a zero previous frame gives 1, and
  ``first_call`` makes every token of such a row pass a threshold).

``adjust`` makes protected tokens (CLS, special token ids) win and padding (attention mask 0)
lose, so masked tokens are the first to go. ``select_static`` keeps ``K = ceil(r * N)`` tokens:
TopK on the scores, then the kept indices sorted ascending (TopK of their negation), so token
order, and the CLS in front, are preserved; K is a constant when N is static (TensorRT's TopK
needs K <= 3840). ``select_threshold`` (ONNX Runtime only: K is data-dependent) keeps, in every
row, at least the tokens whose score passes the threshold; rows keep the batch's largest count.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from passes.prune_tokens_ops import Ops

BIG = 1.0e4  # scores live in [0, 2]; protected tokens get +BIG, padding -BIG
TOPK_LIMIT = 3840


def attention_scores(ops: Ops, probs: ir.Value, source: str) -> ir.Value:
    if source == "cls":
        row = ops.op("Gather", probs, ops.const(np.array(0, dtype=np.int64)), axis=2)  # [B, heads, N]
        return ops.op("ReduceMean", row, ops.i64(1), keepdims=0)
    return ops.op("ReduceMean", probs, ops.i64(1, 2), keepdims=0)


def pagerank_scores(ops: Ops, probs: ir.Value, valid: ir.Value | None, iterations: int) -> ir.Value:
    graph = ops.op("ReduceMean", probs, ops.i64(1), keepdims=0)  # [B, N, N], rows sum to 1
    if valid is not None:
        start = ops.op("Cast", valid, to=ir.DataType.FLOAT)
    else:
        ones = ir.tensor(np.array([1.0], dtype=np.float32))
        start = ops.op("ConstantOfShape", ops.op("Shape", graph, start=0, end=2), value=ones)
    s = ops.op("Unsqueeze", start, ops.i64(1))  # [B, 1, N]
    for _ in range(iterations):
        s = ops.op("MatMul", s, graph)
        s = ops.op("Div", s, ops.op("ReduceSum", s, ops.i64(2), keepdims=1))
    return ops.op("Squeeze", s, ops.i64(1))


def frame_change(ops: Ops, x: ir.Value, previous: ir.Value) -> ir.Value:
    dot = ops.op("ReduceSum", ops.op("Mul", x, previous), ops.i64(-1), keepdims=0)
    norms = ops.op("Mul", _norm(ops, x), _norm(ops, previous))
    cosine = ops.op("Div", dot, ops.op("Max", norms, ops.f32(1e-6)))
    return ops.op("Sub", ops.f32(1.0), cosine)


def first_call(ops: Ops, previous: ir.Value) -> ir.Value:
    """``[batch, 1]`` bool: the rows whose previous frame is all zeros (the first call of a stream),
    where every token counts as new whatever the threshold."""
    magnitude = ops.op("ReduceMax", ops.op("Abs", previous), ops.i64(1, 2), keepdims=0)
    return ops.op("Unsqueeze", ops.op("Equal", magnitude, ops.f32(0.0)), ops.i64(1))


def _norm(ops: Ops, x: ir.Value) -> ir.Value:
    return ops.op("ReduceL2", x, ops.i64(-1), keepdims=0)


def adjust(ops: Ops, scores: ir.Value, valid: ir.Value | None, protected: ir.Value | None) -> ir.Value:
    if valid is not None:
        scores = ops.op("Where", valid, scores, ops.f32(-BIG))
    if protected is not None:
        scores = ops.op("Where", protected, ops.f32(BIG), scores)
    return scores


def static_count(n: int | None, ratio: float) -> int | None:
    """K = ceil(ratio * N) when N is static (at least 1), else None."""
    return None if n is None else max(1, math.ceil(ratio * n - 1e-9))


def count_of(ops: Ops, tokens: ir.Value, ratio: float, n: int | None) -> ir.Value:
    """int64 ``[1]``: ceil(ratio * N), from the static N or the stream's shape."""
    k = static_count(n, ratio)
    if k is not None:
        return ops.i64(k)
    n_float = ops.op("Cast", ops.dim(tokens, 1), to=ir.DataType.FLOAT)
    # the small margin keeps ceil(0.5 * 128) at 64 despite float rounding
    k_float = ops.op("Ceil", ops.op("Sub", ops.op("Mul", n_float, ops.f32(ratio)), ops.f32(1e-4)))
    return ops.op("Max", ops.op("Cast", k_float, to=ir.DataType.INT64), ops.i64(1))


def select_static(ops: Ops, scores: ir.Value, count: ir.Value) -> ir.Value:
    """Indices ``[batch, K]`` of the K best tokens, in ascending order."""
    _, best = ops.op("TopK", scores, count, axis=1, largest=1, sorted=1, outputs=2)  # TensorRT has no sorted=0
    return sort_ascending(ops, best, count)


def sort_ascending(ops: Ops, idx: ir.Value, count: ir.Value) -> ir.Value:
    as_float = ops.op("Cast", idx, to=ir.DataType.FLOAT)  # exact below 2**24 tokens
    _, order = ops.op("TopK", as_float, count, axis=1, largest=0, sorted=1, outputs=2)
    return ops.op("GatherElements", idx, order, axis=1)


def threshold_count(ops: Ops, passing: ir.Value, protected: ir.Value | None) -> ir.Value:
    """int64 ``[1]``: the largest number of passing (or protected) tokens in any row, at least 1."""
    if protected is not None:
        passing = ops.op("Or", passing, protected)
    per_row = ops.op("ReduceSum", ops.op("Cast", passing, to=ir.DataType.INT64), ops.i64(1), keepdims=0)
    return ops.op("Max", ops.op("ReduceMax", per_row, ops.i64(0), keepdims=1), ops.i64(1))


def relative_to_mean(ops: Ops, scores: ir.Value, valid: ir.Value | None) -> ir.Value:
    """Scores divided by their row's mean over the valid tokens (threshold 1 = average)."""
    if valid is None:
        mean = ops.op("ReduceMean", scores, ops.i64(1), keepdims=1)
    else:
        weights = ops.op("Cast", valid, to=ir.DataType.FLOAT)
        total = ops.op("ReduceSum", ops.op("Mul", scores, weights), ops.i64(1), keepdims=1)
        mean = ops.op("Div", total, ops.op("Max", ops.op("ReduceSum", weights, ops.i64(1), keepdims=1), ops.f32(1.0)))
    return ops.op("Div", scores, ops.op("Max", mean, ops.f32(1e-6)))
