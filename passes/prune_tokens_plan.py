"""Token pruning, part 7: option checks and placement (which blocks get a stage, at what ratio).

``stages`` turns ``after``/``keep`` or a ``schedule`` into stages at block boundaries, each
reading the model map: the gather point is the block's residual-stream input, and the attention
criteria read the previous block's probabilities (``source=next``: the pruned block's own query
and key projections, ``passes.prune_tokens_lookahead``). ``tokens_of`` reads the token dim, the static
token count, the attention-mask input and the token-id input off the graph.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from passes.prune_tokens_cache import check_cache_options
from passes.prune_tokens_lookahead import check_site
from passes.prune_tokens_scores import TOPK_LIMIT
from passes.prune_tokens_side import TokenDim
from passes.prune_tokens_stage import Stage, Tokens
from runtime.errors import PassError


def validate(opts: Any) -> None:
    if not 0.0 < opts.keep <= 1.0:
        raise PassError(f"prune_tokens keep={opts.keep} is not a keep ratio; give 0 < keep <= 1 (0.5 keeps half the tokens).")
    if opts.schedule is not None:
        if any(not 0.0 < r <= 1.0 for r in opts.schedule):
            raise PassError("every prune_tokens schedule entry must be a keep ratio in (0, 1]; e.g. schedule=1+1+0.5+0.5.")
        if any(b > a for a, b in zip(opts.schedule, opts.schedule[1:])):
            raise PassError("a prune_tokens schedule must not grow from one block to the next (dropped tokens do not come "
                            "back); make it non-increasing.")
    if opts.schedule is not None and opts.after is not None:
        raise PassError("prune_tokens takes a schedule (one ratio per block) or after=k with keep=r, not both; drop one.")
    if opts.after is not None and opts.after < 0:
        raise PassError(f"prune_tokens after={opts.after} is not a block index; give after >= 0.")
    if opts.threshold is not None and (opts.mode in ("diverse", "merge") or opts.threshold <= 0):
        raise PassError(f"prune_tokens threshold needs mode attention, pagerank or frames and a value > 0 "
                        f"(got mode={opts.mode}, threshold={opts.threshold}).")
    if opts.mode == "merge" and opts.r < 1:
        raise PassError("prune_tokens mode=merge needs r >= 1 (token pairs merged per block), e.g. r=16.")
    if opts.mode != "merge" and opts.r:
        raise PassError(f"prune_tokens r is the merge count of mode=merge; mode={opts.mode} uses keep or schedule.")
    if opts.mode == "frames" and opts.schedule is not None:
        raise PassError("prune_tokens mode=frames compares one point with the previous frame; use after=k, not a schedule.")
    check_cache_options(opts)
    if opts.iterations < 1 or opts.protect < 0:
        raise PassError("prune_tokens needs iterations >= 1 and protect >= 0.")


def check_target(opts: Any, target: str) -> None:
    if opts.threshold is not None and target != "ort-cpu":
        raise PassError(f"prune_tokens threshold gives a data-dependent token count, which only ONNX Runtime runs; "
                        f"the target is {target}: use keep=r instead.")


def default_after(opts: Any) -> int:
    if opts.after is not None:
        return opts.after
    return 1 if opts.mode in ("attention", "pagerank") else 0


def stages(model_map: Any, graph_values: dict[str, ir.Value], opts: Any) -> list[Stage]:
    """The prune stages (not merge), in block order."""
    blocks = model_map.blocks
    if opts.schedule is not None:
        if len(opts.schedule) != len(blocks):
            raise PassError(f"the prune_tokens schedule has {len(opts.schedule)} entries but the model has "
                            f"{len(blocks)} blocks; give one keep ratio per block.")
        ratios = list(opts.schedule)
    else:
        after = default_after(opts)
        model_map.block(after)  # a PassError naming the valid range
        ratios = [1.0] * after + [opts.keep] * (len(blocks) - after)
    out, current = [], 1.0
    for index, ratio in enumerate(ratios):
        if ratio < current or (opts.schedule is None and index == default_after(opts)):
            out.append(Stage(index, ratio, graph_values[blocks[index].input], _probs(model_map, graph_values, index, opts),
                             _next_qk(model_map, graph_values, index, opts)))
            current = ratio
    return out


def _probs(model_map: Any, values: dict[str, ir.Value], index: int, opts: Any) -> ir.Value | None:
    if opts.mode not in ("attention", "pagerank") or opts.source == "next":
        return None
    if index == 0:
        raise PassError(f"prune_tokens mode={opts.mode} ranks tokens by the attention of the block before the gather "
                        "point, and block 0 has none; give after >= 1 (or use mode=diverse).")
    site = model_map.blocks[index - 1].attention
    if site is None or site.probs is None:
        raise PassError(f"prune_tokens mode={opts.mode} needs attention probabilities, but block {index - 1} has no "
                        "Softmax (fused or no attention); use mode=diverse, which needs none.")
    return values[site.probs]


def _next_qk(model_map: Any, values: dict[str, ir.Value], index: int, opts: Any) -> tuple | None:
    """``source=next``: (q, k, heads, head_dim) of the pruned block itself (``prune_tokens_lookahead``)."""
    if opts.source != "next":
        return None
    site = model_map.blocks[index].attention
    check_site(site, index, opts)
    return values[site.q], values[site.k], site.heads, site.head_dim


def tokens_of(graph: ir.Graph, model_map: Any, first: ir.Value, target: str) -> Tokens:
    if model_map.token_axis != 1 or first.shape is None or len(first.shape) != 3:
        raise PassError("prune_tokens needs a [batch, tokens, hidden] residual stream, and this model's map has "
                        f"token axis {model_map.token_axis}; it supports batch-first transformers only.")
    dim = first.shape[1]
    token = TokenDim(None, dim) if isinstance(dim, int) else TokenDim(dim.value, None)
    if target == "tensorrt" and token.size is None:
        raise PassError(f"TensorRT's TopK needs a constant K, and this model's token count is symbolic "
                        f"({token.symbol}); trace it with a static sequence length, or prune for ort-cpu.")
    if target == "tensorrt" and token.size is not None and token.size > TOPK_LIMIT:
        raise PassError(f"TensorRT's TopK takes K <= {TOPK_LIMIT}, and this model has {token.size} tokens; prune it "
                        "for another target, or give it fewer tokens.")
    inputs = {v.name: v for v in graph.inputs}
    ids = inputs.get(model_map.token_input)
    if ids is not None and (ids.dtype != ir.DataType.INT64 or len(ids.shape or ()) != 2):
        ids = None
    mask = next((v for v in graph.inputs if v is not ids and v.name != model_map.token_input and _is_mask(v, token)), None)
    return Tokens(token, token.size, mask, ids, first)


def _is_mask(value: ir.Value, token: TokenDim) -> bool:
    shape = value.shape
    return (shape is not None and len(shape) == 2 and token.matches(shape[1])
            and value.dtype in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.FLOAT))
