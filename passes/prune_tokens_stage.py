"""Token pruning, part 6: one pruning stage (score, choose, gather) and what every stage needs.

A stage sits at a block boundary: the residual-stream value entering block ``b``. It scores the
current tokens (``passes.prune_tokens_scores``, ``passes.prune_tokens_diverse``), keeps K of
them, gathers the stream and the tokens' original positions, and returns a ``Region`` description
for ``passes.prune_tokens_side`` to rewire the rest of the graph onto the kept tokens.

``Tokens`` holds what is shared by all stages: the token dim, the static N (or None), the
attention-mask input (a ``[batch, N]`` graph input other than the token input; padding is what
it marks 0) and the token-id input (for protected token ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from passes import prune_tokens_scores as sc
from passes.prune_tokens_diverse import diverse_picks
from passes.prune_tokens_lookahead import next_block_scores
from passes.prune_tokens_ops import Ops, gather_tokens
from passes.prune_tokens_side import TokenDim
from runtime.errors import PassError

FRAME_INPUT, FRAME_OUTPUT = "prune_tokens_previous_frame", "prune_tokens_frame_features"


@dataclass
class Tokens:
    dim: TokenDim
    n: int | None  # static token count, or None
    mask: ir.Value | None
    ids: ir.Value | None
    first: ir.Value  # the full stream at the first gather point (its N is the original count)
    source: str = "mean"  # attention criterion: "cls" or "mean" (``auto`` resolved)


@dataclass
class Stage:
    block: int
    ratio: float  # fraction of the original N that the blocks from here on see
    gather: ir.Value  # the stream value entering ``block``
    probs: ir.Value | None  # the previous block's attention probabilities
    next_qk: tuple | None = None  # source=next: this block's (q, k, heads, head_dim)


@dataclass
class Kept:
    relative: ir.Value  # [B, K] indices into the previous token set, ascending
    positions: ir.Value  # [B, K] original positions
    count: ir.Value  # int64 [1]
    static: int | None
    stream: ir.Value  # the gathered stream
    scores: ir.Value | None


def base_positions(ops: Ops, x: ir.Value) -> ir.Value:
    """``[B, N]``: 0..N-1 in every row."""
    zero, one = ops.const(np.array(0, dtype=np.int64)), ops.const(np.array(1, dtype=np.int64))
    line = ops.op("Range", zero, ops.op("Squeeze", ops.dim(x, 1), ops.i64(0)), one)
    return ops.op("Expand", ops.op("Unsqueeze", line, ops.i64(0)), ops.op("Shape", x, start=0, end=2))


def validity(ops: Ops, tokens: Tokens, positions: ir.Value, first: bool) -> ir.Value | None:
    if tokens.mask is None:
        return None
    mask = tokens.mask if first else ops.op("GatherElements", tokens.mask, positions, axis=1)
    return ops.op("Cast", mask, to=ir.DataType.BOOL)


def protection(ops: Ops, tokens: Tokens, positions: ir.Value, opts: Any) -> ir.Value | None:
    marks = ops.op("Less", positions, ops.const(np.array(opts.protect, dtype=np.int64))) if opts.protect else None
    if opts.protect_ids:
        if tokens.ids is None:
            raise PassError("protect_ids needs a token-id input, and this model has none (its tokens are not "
                            "text); drop protect_ids.")
        ids = ops.op("GatherElements", tokens.ids, positions, axis=1)
        for token_id in opts.protect_ids:
            hit = ops.op("Equal", ids, ops.const(np.array(token_id, dtype=np.int64)))
            marks = hit if marks is None else ops.op("Or", marks, hit)
    return marks


def prune_stage(ops: Ops, stage: Stage, tokens: Tokens, previous: ir.Value, first: bool, opts: Any,
                frame_state: ir.Value | None) -> Kept:
    """Score the tokens entering ``stage.block``, keep K of them, gather the stream."""
    x = stage.gather
    valid = validity(ops, tokens, previous, first)
    protected = protection(ops, tokens, previous, opts)
    count = sc.count_of(ops, tokens.first, stage.ratio, tokens.n)
    static = sc.static_count(tokens.n, stage.ratio)
    scores = None
    if opts.mode == "diverse":
        picks = diverse_picks(ops, x, count, valid, protected)
        relative = sc.sort_ascending(ops, picks, count)
    else:
        scores, passing = _scores(ops, stage, x, valid, opts, frame_state, tokens.source)
        adjusted = sc.adjust(ops, scores, valid, protected)
        if opts.threshold is not None:
            count, static = sc.threshold_count(ops, passing, protected), None
        relative = sc.select_static(ops, adjusted, count)
    positions = ops.op("GatherElements", previous, relative, axis=1)
    return Kept(relative, positions, count, static, gather_tokens(ops, x, relative), scores)


def _scores(ops: Ops, stage: Stage, x: ir.Value, valid, opts: Any, frame_state, source: str) -> tuple[ir.Value, Any]:
    """(score, passing-the-threshold flags or None)."""
    if opts.mode == "frames":
        change = sc.frame_change(ops, x, frame_state)
        passing = None if opts.threshold is None else ops.op("GreaterOrEqual", change, ops.f32(opts.threshold))
        if passing is not None:
            passing = ops.op("Or", passing, sc.first_call(ops, frame_state))
        if passing is not None and valid is not None:
            passing = ops.op("And", passing, valid)
        return change, passing
    if opts.mode == "pagerank":
        scores = sc.pagerank_scores(ops, stage.probs, valid, opts.iterations)
    elif source == "next":
        scores = next_block_scores(ops, x, *stage.next_qk, valid)
    else:
        scores = sc.attention_scores(ops, stage.probs, source)
    if opts.threshold is None:
        return scores, None
    passing = ops.op("GreaterOrEqual", sc.relative_to_mean(ops, scores, valid), ops.f32(opts.threshold))
    return scores, passing if valid is None else ops.op("And", passing, valid)


def frame_io(graph: ir.Graph, x: ir.Value, ops: Ops, output: bool = True) -> ir.Value:
    """Add the frame state pair: an input with the previous frame's features at the gather point,
    and an output with this frame's (feed one call's output to the next call's input; zeros first).
    ``fill=cache`` makes its own output after the stage (``prune_tokens_cache.frame_reference``)."""
    previous = ir.Value(name=FRAME_INPUT, type=ir.TensorType(x.dtype or ir.DataType.FLOAT), shape=x.shape)
    graph.inputs.append(previous)
    if not output:
        return previous
    current = ops.op("Identity", x)
    current.name, current.dtype, current.shape = FRAME_OUTPUT, x.dtype, x.shape
    graph.outputs.append(current)
    return previous
