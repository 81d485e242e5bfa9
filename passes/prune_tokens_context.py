"""Token pruning, part 10: recomputed tokens attend to every token (``fill=cache,context=cached``).

With ``fill=cache`` the tokens that changed since the previous frame are recomputed. Gathered
like any pruning stage, they would attend to each other only (``context=kept``); on a frame
where a small object moved, that is a few dozen tokens without the scene around them, and their
outputs drift from the original's (ViT-S on the moving-object stream: saliency correlation 0.96
mean, 0.87 at worst). ``context=cached`` (the default) keeps the queries to the kept tokens but
gives every attention all N keys and values: per block from the gather point on, the kept
tokens' key and value projections (``[batch, K, hidden]``, the model map's ``k``/``v``) are
scattered into the previous call's, ``[batch, N, hidden]``, carried as a third state pair
(``prune_tokens_previous_keys_values`` in, ``prune_tokens_keys_values`` out,
``[batch, 2 * blocks, N, hidden]``: block ``i``'s keys at ``2i``, values at ``2i + 1``). A dropped
token thus contributes the keys and values it had when it was last computed, as in Eventful
Transformers' token-wise reuse.

Side values added to the scores with the token dim on the key axis (ViT-S's all-zero additive
mask ``[batch, 1, N, N]``) are gathered on the query axis only (``query_side_values``), before the
stage's region is rerouted, so the scores are ``[batch, heads, K, N]``. The first call keeps
every token, so the scattered keys and values are the original ones and the output is exact.

Refused with a reason: a block without an attention site or with one projection for queries,
keys and values (the keys could not be scattered apart from the queries), or whose keys or
values reach the attention MatMul through anything but constant reshapes, transposes and
scalings (a view built from the token count, RoPE: text models traced with a symbolic length).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from passes.prune_tokens_ops import Ops, scatter_tokens, take
from passes.prune_tokens_side import TokenDim
from runtime.errors import PassError

KV_INPUT, KV_OUTPUT = "prune_tokens_previous_keys_values", "prune_tokens_keys_values"
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where"}
_PLAIN = {"Reshape", "Transpose", "Mul", "Div", "Cast", "Identity"}  # with constant second inputs


def attention_sites(model_map: Any, values: dict[str, ir.Value], first: int) -> list[Any]:
    """The attention sites of the blocks from ``first`` on, checked (module docstring)."""
    sites = []
    for block in model_map.blocks[first:]:
        site = block.attention
        if site is None or site.k is None or site.v is None:
            raise PassError(f"prune_tokens context=cached reuses each block's keys and values, and block {block.index} "
                            "has no attention projections in the model map; use context=kept.")
        if site.k == site.v or site.k == site.q:
            raise PassError(f"block {block.index} computes queries, keys and values in one projection, so the cached "
                            "keys cannot be scattered apart from the queries; use context=kept.")
        for name in (site.k, site.v):
            if not _plain_path(values[name]):
                raise PassError(f"prune_tokens context=cached gives block {block.index} all N keys, but its keys or "
                                "values are reshaped or rotated with values built from the token count (a shape-built "
                                "view, RoPE); it needs a model traced with a static token count (a ViT): use "
                                "context=kept.")
        sites.append(site)
    return sites


def _plain_path(value: ir.Value) -> bool:
    """Whether ``value`` reaches its attention MatMul through constant reshapes, transposes and
    scalings only (so all N rows can pass where K did)."""
    frontier = [value]
    while frontier:
        current = frontier.pop()
        for node, _ in current.uses():
            if node.op_type == "MatMul":
                continue
            others = [x for x in node.inputs if x is not None and x is not current]
            if node.op_type not in _PLAIN or any(x.const_value is None for x in others):
                return False
            frontier.extend(node.outputs)
    return True


def query_side_values(ops: Ops, values: dict[str, ir.Value], sites: list[Any], region: list[ir.Node],
                      positions: ir.Value, token: TokenDim) -> int:
    """Gather the key-axis side inputs of every block's scores on their other token axes only;
    returns how many were rewritten (call before the region is rerouted: they count as new)."""
    inside = {id(n) for n in region}
    done = 0
    for site in sites:
        if site.scores is None:
            continue
        frontier = [values[site.scores].producer()]
        while frontier:
            node = frontier.pop()
            if node is None or id(node) not in inside or node.op_type not in _ELEMENTWISE:
                continue
            for index, value in enumerate(node.inputs):
                if value is None:
                    continue
                producer = value.producer()
                if producer is not None and id(producer) in inside:
                    frontier.append(producer)
                elif _on_key_axis(value, token):
                    axes = [a for a in token.axes(value) if a != len(value.shape) - 1]
                    # a new value either way, so that the region's reroute leaves its key axis alone
                    new = take(ops, value, positions, axes) if axes else ops.op("Identity", value)
                    node.replace_input_with(index, new)
                    done += 1
    return done


def _on_key_axis(value: ir.Value, token: TokenDim) -> bool:
    return value.shape is not None and len(value.shape) >= 2 and token.matches(value.shape[-1])


def cached_keys_values(graph: ir.Graph, ops: Ops, values: dict[str, ir.Value], sites: list[Any],
                       positions: ir.Value, token: TokenDim) -> None:
    """Scatter each block's kept keys and values into the cached ones (module docstring); add the
    state pair. Call after the region is rerouted (``values`` then hold ``[batch, K, hidden]``)."""
    first = values[sites[0].k]
    known = first.shape is not None and len(first.shape) == 3
    batch, hidden = (first.shape[0], first.shape[2]) if known else (None, None)
    shape = ir.Shape([batch, 2 * len(sites), token.dim(), hidden])
    state = ir.Value(name=KV_INPUT, type=ir.TensorType(first.dtype or ir.DataType.FLOAT), shape=shape)
    graph.inputs.append(state)
    fulls = []
    for i, site in enumerate(sites):
        for j, name in enumerate((site.k, site.v)):
            kept = values[name]
            readers = list(kept.uses())
            cached = ops.op("Gather", state, ops.const(np.array(2 * i + j, dtype=np.int64)), axis=1)
            full = scatter_tokens(ops, cached, positions, kept)
            full.dtype, full.shape = kept.dtype, ir.Shape([batch, token.dim(), hidden])
            for node, index in readers:
                node.replace_input_with(index, full)
            _untag_downstream(full, values.get(site.probs) if site.probs else None)
            fulls.append(ops.op("Unsqueeze", full, ops.i64(1)))
    out = ops.op("Concat", *fulls, axis=1)
    out.name, out.dtype, out.shape = KV_OUTPUT, state.dtype, shape
    graph.outputs.append(out)


def _untag_downstream(full: ir.Value, probs: ir.Value | None) -> None:
    """The values between the scattered keys or values and the attention's ``probs @ V`` were
    retagged to the kept count on every token axis; their key axis now has N: clear their shapes
    and let ONNX Runtime infer them (``probs @ V`` has K rows again, as tagged)."""
    if probs is None:
        return
    frontier = [full]
    while frontier:
        for node, _ in frontier.pop().uses():
            if probs in node.inputs:
                continue
            for value in node.outputs:
                if value.shape is not None and not value.is_graph_output():
                    value.shape = None
                    frontier.append(value)
