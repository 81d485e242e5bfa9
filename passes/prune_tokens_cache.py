"""Token pruning, part 9: per-token feature reuse across frames (``mode=frames,fill=cache``).

``mode=frames`` drops the tokens whose features at the gather point barely changed since the
previous frame. With ``fill=cache`` a dropped token's final value (the last block's output)
is the one the previous call produced for it, carried as a second state pair, so a token that
did not change reuses its own cached output, while changed tokens are recomputed (attending to
every token through cached keys and values, ``passes.prune_tokens_context``, or with
``context=kept`` to the other kept tokens only). Three things make that consistent:

- **what is cached**: the last block's output for every token, ``[batch, N, hidden]``
  (``prune_tokens_previous_output`` in, ``prune_tokens_output_features`` out): the restore
  scatters the recomputed tokens into the previous call's value, and everything after the
  blocks (norm, head, saliency decoder) runs on the result;
- **what the criterion compares with**: the frame state output holds, per token, the features of
  the frame its cached output was computed from (kept tokens: this frame; dropped tokens: the
  state they came in with), so slow drift accumulates until the token is recomputed instead of
  creeping past the threshold one small step at a time;
- **the first call**: a batch row whose frame state is all zeros keeps every token, so the first
  call of a stream (and a plain ``Session.run``, which feeds zeros) computes the original model.

``fill=cache`` needs ``threshold`` (a data-dependent K: with a static K the first call would drop
tokens that have no cache yet, and a changed token could be dropped), so it is for ONNX
Runtime only, and a per-token output (a model whose outputs pool the tokens has nothing per
token to reuse; ``feature_cache`` reuses whole outputs). Every threshold-frames artifact also
returns ``prune_tokens_token_blocks_saved`` (int64 ``[1]``: dropped tokens times the blocks
they skip, summed over the batch), which ``runtime.stream.StreamSession`` adds up.
"""

from __future__ import annotations

import onnx_ir as ir

from passes.prune_tokens_ops import Ops, scatter_tokens
from passes.prune_tokens_restore import reroute_readers
from passes.prune_tokens_stage import FRAME_OUTPUT
from runtime.errors import PassError

CACHE_INPUT, CACHE_OUTPUT = "prune_tokens_previous_output", "prune_tokens_output_features"
SAVED_OUTPUT = "prune_tokens_token_blocks_saved"


def check_cache_options(opts) -> None:
    """Option checks for ``fill=cache`` (see the module docstring for why each holds)."""
    if opts.fill != "cache":
        if opts.context is not None:
            raise PassError(f"prune_tokens context says what recomputed tokens attend to under fill=cache; "
                            f"fill={opts.fill} has no cache, drop context.")
        return
    if opts.mode != "frames":
        raise PassError(f"prune_tokens fill=cache reuses each token's output from the previous frame, which needs "
                        f"mode=frames (got mode={opts.mode}); use fill=nearest or fill=last.")
    if opts.threshold is None:
        raise PassError("prune_tokens fill=cache needs threshold=t (tokens whose change is below t reuse their cached "
                        "output): a fixed keep ratio would drop tokens on the first frame, which has no cache yet.")
    if opts.restore == "never":
        raise PassError("prune_tokens fill=cache restores every token from the cache; restore=never contradicts it, "
                        "use restore=auto.")


def require_per_token(restore_needed: bool, why: str) -> None:
    if not restore_needed:
        raise PassError(f"prune_tokens fill=cache reuses per-token outputs, but {why}: there is nothing per token to "
                        "reuse; use feature_cache to reuse whole outputs, or fill=nearest.")


def frame_reference(graph: ir.Graph, ops: Ops, previous_frame: ir.Value, positions: ir.Value,
                    kept_stream: ir.Value) -> None:
    """The frame state output: this frame's features where tokens were recomputed, the incoming
    state where they were reused (the features their cached outputs belong to)."""
    out = ops.op("Identity", scatter_tokens(ops, previous_frame, positions, kept_stream))
    out.name, out.dtype, out.shape = FRAME_OUTPUT, previous_frame.dtype, previous_frame.shape
    graph.outputs.append(out)


def restore_from_cache(graph: ir.Graph, ops: Ops, last: ir.Value, positions: ir.Value,
                       readers: list[tuple[ir.Node, int]], shape: ir.Shape | None) -> None:
    """Scatter the recomputed tokens' final values into the previous call's, reroute the readers
    of the last block's output to the result, and add the cache state pair."""
    cached = ir.Value(name=CACHE_INPUT, type=ir.TensorType(last.dtype or ir.DataType.FLOAT), shape=shape)
    graph.inputs.append(cached)
    full = scatter_tokens(ops, cached, positions, last)
    reroute_readers(graph, last, full, readers, shape)
    out = ops.op("Identity", full)
    out.name, out.dtype, out.shape = CACHE_OUTPUT, cached.dtype, shape
    graph.outputs.append(out)


def saved_counter(graph: ir.Graph, ops: Ops, stream: ir.Value, count: ir.Value, blocks_skipped: int) -> None:
    """``prune_tokens_token_blocks_saved``: (N - K) * blocks from the stage on * batch."""
    dropped = ops.op("Sub", ops.dim(stream, 1), count)
    per_row = ops.op("Mul", dropped, ops.i64(blocks_skipped))
    out = ops.op("Mul", per_row, ops.dim(stream, 0))
    out.name, out.dtype, out.shape = SAVED_OUTPUT, ir.DataType.INT64, ir.Shape([1])
    graph.outputs.append(out)
