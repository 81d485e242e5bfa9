"""Token pruning, part 8: putting the stages into the graph, in order.

For the pruning modes (``build_prune``):
1. place the stages (``passes.prune_tokens_plan``) and decide whether to restore;
2. before any new node exists, cut the graph into regions: the nodes downstream of each stage's
   gather point and not of the next one's (nor past the last block when restoring);
3. per stage: score and gather (``passes.prune_tokens_stage``), rewire the region onto the kept
   tokens (``passes.prune_tokens_side.reroute``), retag its value shapes;
4. restore the full token set after the last block when the outputs need it.
``build_merge`` does the same with one merge stage per block (``passes.prune_tokens_merge``).
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from passes.graph_util import values_by_name
from passes import prune_tokens_plan as plan
from passes.prune_tokens_cache import (CACHE_INPUT, CACHE_OUTPUT, SAVED_OUTPUT, frame_reference, require_per_token,
                                       restore_from_cache, saved_counter)
from passes.prune_tokens_context import KV_INPUT, KV_OUTPUT, attention_sites, cached_keys_values, query_side_values
from passes.prune_tokens_ops import Ops
from passes.prune_tokens_restore import (nearest_kept, needs_restore, proportional_attention, represented,
                                         reroute_readers, scatter_back, take_representatives)
from passes.prune_tokens_side import Region, TokenDim, downstream, reroute, retag
from passes.prune_tokens_stage import FRAME_INPUT, FRAME_OUTPUT, base_positions, frame_io, prune_stage
from runtime.errors import PassError




def taken_names(graph: ir.Graph) -> set[str]:
    names = set(values_by_name(graph))
    names.update(n.name for n in ir.traversal.RecursiveGraphIterator(graph) if n.name)
    return names


def decide_restore(opts: Any, last_output: ir.Value, protect: int) -> tuple[bool, str]:
    needed, why = needs_restore(last_output, 1, protect)
    if opts.restore == "always":
        return True, "restore=always"
    if opts.restore == "never":
        if needed:
            raise PassError(f"prune_tokens restore=never would change the model's outputs: {why}; use restore=auto.")
        return False, "restore=never"
    return needed, why


def regions(graph: ir.Graph, gathers: list[ir.Value], stop: ir.Value | None) -> list[list[ir.Node]]:
    """Per gather point, the nodes downstream of it and not of the next one (see module doc)."""
    out = []
    for i, start in enumerate(gathers):
        later = {id(n) for n in downstream(graph, [gathers[i + 1]])} if i + 1 < len(gathers) else set()
        out.append([n for n in downstream(graph, [start], stop) if id(n) not in later])
    return out


def kept_dim(tokens_dim: TokenDim, static: int | None, index: int) -> TokenDim:
    if static is not None:
        return TokenDim(None, static)
    base = tokens_dim.symbol or str(tokens_dim.size)
    return TokenDim(f"{base}_kept{index}", None)


def build_prune(model: ir.Model, model_map: Any, opts: Any, target: str) -> dict[str, Any]:
    graph = model.graph
    values = values_by_name(graph)
    stages = plan.stages(model_map, values, opts)
    if not stages:  # a schedule of ratios 1.0: nothing to drop
        return {"mode": opts.mode, "stages": [], "restored": False, "restore_reason": "nothing dropped",
                "tokens_per_block": [(1.0, 1.0)] * len(model_map.blocks)}
    tokens = plan.tokens_of(graph, model_map, stages[0].gather, target)
    tokens.source = opts.source if opts.source != "auto" else ("cls" if opts.protect else "mean")
    last = values[model_map.blocks[-1].output]
    restore, why = decide_restore(opts, last, opts.protect)
    if opts.fill == "cache":
        require_per_token(*needs_restore(last, 1, opts.protect))
    cut = regions(graph, [s.gather for s in stages], last if restore else None)
    # kept tokens stand for the dropped ones they will fill: give them their attention share
    proportional = opts.proportional if opts.proportional is not None else restore and opts.fill == "nearest"
    readers, last_shape = list(last.uses()), last.shape
    ops = Ops(graph, "prune_tokens", taken_names(graph))
    frame_state = frame_io(graph, stages[0].gather, ops, opts.fill != "cache") if opts.mode == "frames" else None
    positions = base_positions(ops, stages[0].gather)
    # fill=cache's recomputed tokens attend to every token, through the cached keys and values
    sites = attention_sites(model_map, values, stages[0].block) if opts.fill == "cache" and opts.context != "kept" else None
    token_map = positions  # fill=nearest: each original token's representative in the current set
    previous_dim, previous_nodes, steps, records = tokens.dim, set(), [], []
    for i, (stage, nodes) in enumerate(zip(stages, cut)):
        kept = prune_stage(ops, stage, tokens, positions, i == 0, opts, frame_state)
        if frame_state is not None:
            _frame_outputs(graph, ops, opts, stage, kept, frame_state, len(model_map.blocks))
        if sites:
            query_side_values(ops, values, sites, nodes, kept.positions, tokens.dim)
        dim = kept_dim(tokens.dim, kept.static, i)
        fresh = {id(v) for n in ops.nodes for v in n.outputs}
        region = Region(nodes, stage.gather, kept.stream, kept.positions, kept.relative, kept.count, dim,
                        previous_dim, previous_nodes)
        rewritten = reroute(ops, region, tokens.dim, fresh)
        retag(nodes, tokens.dim, dim)
        if sites:
            cached_keys_values(graph, ops, values, sites, kept.positions, tokens.dim)
        kept.stream.dtype = stage.gather.dtype
        kept.stream.shape = ir.Shape([stage.gather.shape[0], dim.dim(), stage.gather.shape[2]])
        if i > 0:
            steps.append((positions, stage.gather))  # the tokens this stage drops keep these values
        if opts.fill == "nearest" or proportional:
            token_map = ops.op("GatherElements", nearest_kept(ops, stage.gather, kept.stream), token_map, axis=1)
        if proportional:
            size = represented(ops, token_map, _weights(ops, tokens), kept.relative)
            end = stages[i + 1].block if i + 1 < len(stages) else len(model_map.blocks)
            proportional_attention(ops, model_map, {b: size for b in range(stage.block, end)})
        positions, previous_dim, previous_nodes = kept.positions, dim, {id(n) for n in nodes}
        records.append(_record(model_map, stage, kept.static, opts, rewritten) | {"indices": kept.relative.name})
    if restore and opts.fill == "cache":
        restore_from_cache(graph, ops, last, positions, readers, last_shape)
    elif restore and opts.fill == "nearest":
        full = take_representatives(ops, last, token_map)
        reroute_readers(graph, last, full, readers, last_shape)
    elif restore:
        full = scatter_back(ops, stages[0].gather, steps + [(positions, last)])
        reroute_readers(graph, last, full, readers, last_shape)
    details = _details(opts, records, restore, why, tokens)
    details["proportional_attention"] = proportional
    details["tokens_per_block"] = _ratios(stages, len(model_map.blocks), opts)
    return details


def _frame_outputs(graph: ir.Graph, ops: Ops, opts: Any, stage, kept, frame_state: ir.Value, blocks: int) -> None:
    """``fill=cache``'s frame state output; the saved-work counter of a data-dependent K."""
    if opts.fill == "cache":
        frame_reference(graph, ops, frame_state, kept.positions, kept.stream)
    if opts.threshold is not None:
        saved_counter(graph, ops, stage.gather, kept.count, blocks - stage.block)


def _weights(ops: Ops, tokens) -> ir.Value:
    """Each original token's weight in a count: 1, or 0 for padding."""
    if tokens.mask is not None:
        return ops.op("Cast", tokens.mask, to=ir.DataType.FLOAT)
    return ops.op("Cast", ops.op("GreaterOrEqual", base_positions(ops, tokens.first), ops.i64(0)), to=ir.DataType.FLOAT)


def _record(model_map: Any, stage, static: int | None, opts: Any, rewritten: int) -> dict[str, Any]:
    kept = static if static is not None else ("threshold" if opts.threshold is not None else f"ceil({stage.ratio:g} * N)")
    return {"block": stage.block, "name": model_map.blocks[stage.block].name, "keep": stage.ratio,
            "tokens": kept, "side_values_rewritten": rewritten}


def _ratios(stages: list, blocks: int, opts: Any) -> list[tuple[float, float]] | None:
    if opts.threshold is not None:
        return None  # data-dependent
    ratio, out, by_block = 1.0, [], {s.block: s.ratio for s in stages}
    for b in range(blocks):
        ratio = by_block.get(b, ratio)
        out.append((ratio, ratio))
    return out


def _details(opts: Any, records: list, restore: bool, why: str, tokens) -> dict[str, Any]:
    details: dict[str, Any] = {
        "mode": opts.mode, "stages": records, "restored": restore, "restore_reason": why,
        "static_shapes": opts.threshold is None and tokens.n is not None,
        "padding": tokens.mask.name if tokens.mask is not None else None,
        "protected": {"leading": opts.protect, "ids": list(opts.protect_ids)},
        "fill": opts.fill if restore else None,
    }
    if opts.mode in ("attention", "pagerank"):
        details["source"] = tokens.source if opts.mode == "attention" else "pagerank"
    if opts.mode == "frames":
        details["state"] = {"input": FRAME_INPUT, "output": FRAME_OUTPUT, "first_call": "zeros",
                            "contract": f"feed each call's {FRAME_OUTPUT} as the next call's {FRAME_INPUT}"}
        if opts.fill == "cache":
            details["state"]["cache"] = {"input": CACHE_INPUT, "output": CACHE_OUTPUT}
            details["context"] = opts.context or "cached"
        if opts.fill == "cache" and details["context"] == "cached":
            details["state"]["keys_values"] = {"input": KV_INPUT, "output": KV_OUTPUT}
        if opts.threshold is not None:
            details["state"]["counter"] = SAVED_OUTPUT
    return details


def build_merge(model: ir.Model, model_map: Any, opts: Any, target: str) -> dict[str, Any]:
    from passes.prune_tokens_merge import merge_blocks

    return merge_blocks(model, model_map, opts, target)
