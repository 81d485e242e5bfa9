"""``skip_layers:mode=positional``: SkipDecode's per-position skipping of blocks in a KV-cached
decoder (lossy; needs ``kv_cache:layer_masks=true`` before it).

A new graph input ``skip_layers.count`` (int64 scalar, the same for the whole batch) says how many
blocks this step bypasses, counted upwards from block ``first`` (0, the lowest blocks, is
SkipDecode proper; a higher ``first`` skips a middle stretch, which a model not trained for
skipping tolerates better). Each of blocks ``first .. first+max-1`` becomes an ``If`` on
``count > i - first``:

- then (skipped): the block's hidden output is its hidden input and ``present.{i}.key|value`` is
  the past unchanged (nothing appended), so the block costs two copies instead of its matmuls;
- else (computed): the block's own nodes, moved into the branch unchanged (they keep reading
  weights, rotary tables and the layer's mask from the outer graph, as ONNX scoping allows).

The runtime (``runtime.kv_skip``, through ``runtime.kv_step.Stepper``) feeds the count from the
schedule recorded here: 0 for a prefill, ``min`` rising linearly to ``max`` between positions
``start`` and ``end`` for decode steps. Since the count never decreases along the sequence, the
set of skipped blocks only grows: a block skipped once stays skipped, every block a token computes
holds the KV of every earlier token, and a skipped block's cache is a prefix of the sequence
(hence one attention mask per layer).

Why ``layer_masks``: a skipped layer holds fewer tokens than the others, so it needs its own mask
length; the shared-mask cache cannot express that. ``kv_cache`` must run first because it rewrites
attention inside the blocks, which this pass moves into subgraphs.

Cases handled: any ``first + max`` up to the number of blocks, leaving at least one; ``max=0``
(untouched). ``PassError`` (one sentence) for: no KV cache (an encoder, or a decoder without
``kv_cache``), a cache without per-layer masks, attention-score outputs (``kv_cache:scores=true``),
``max`` >= the number of blocks or ``first + max`` beyond the last block, a model already skipping
positionally, a block whose inner values are read outside it; option errors (a decreasing
schedule, ``start > end``, a negative ``first``, static-mode options) are raised before anything
runs.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optimizer.pipeline import PassContext, PassResult
from optimizer.structure import require_blocks
from passes.graph_util import values_by_name
from runtime.errors import PassError
from runtime.kv_skip import COUNT, SkipSchedule


def validate(opts: Any) -> None:
    """Option checks for mode=positional (static-mode options are refused)."""
    given = [key for key in ("count", "blocks") if getattr(opts, key) is not None]
    if given or opts.sub or opts.replace != "none":
        what = given[0] if given else ("sub" if opts.sub else "replace")
        raise PassError(f"skip_layers mode=positional skips blocks by a schedule (min, max, start, end, first); "
                        f"drop {what}, which belongs to mode=static.")
    if opts.max is None:
        raise PassError("skip_layers mode=positional needs max=N, the most blocks a late position skips.")
    if not 0 <= opts.min <= opts.max:
        raise PassError(f"skip_layers positional schedule must not decrease: need 0 <= min <= max, got min={opts.min}, "
                        f"max={opts.max}.")
    if opts.first < 0:
        raise PassError(f"skip_layers first must be >= 0 (the lowest block to skip), got {opts.first}.")
    if not 0 <= opts.start <= opts.end:
        raise PassError(f"skip_layers positional schedule needs 0 <= start <= end, got start={opts.start}, end={opts.end}.")


def schedule_of(opts: Any) -> SkipSchedule:
    return SkipSchedule(opts.min, opts.max, opts.start, opts.end, opts.first)


def run(model: ir.Model, ctx: PassContext, opts: Any) -> PassResult:
    graph = model.graph
    schedule = schedule_of(opts)
    _require_layer_cache(graph)
    blocks = require_blocks(ctx.model_map(model), "skip_layers mode=positional").blocks
    if opts.max >= len(blocks):
        raise PassError(f"skip_layers max={opts.max} would skip every block of this model, which has {len(blocks)}; "
                        f"give max < {len(blocks)}.")
    if opts.first + opts.max > len(blocks):
        raise PassError(f"skip_layers first={opts.first} with max={opts.max} reaches past the last block (this model "
                        f"has {len(blocks)}, 0-{len(blocks) - 1}); lower first or max.")
    details: dict[str, Any] = {"mode": "positional", "unit": "block", "units": len(blocks),
                               "schedule": schedule.to_json(), "input": COUNT, "layers": []}
    if opts.max == 0:
        return PassResult(model=model, sites=0, details=details)
    count = ir.Value(name=COUNT, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(count)
    for block in blocks[opts.first:opts.first + opts.max]:
        moved = _wrap_block(graph, block, count, block.index - opts.first)
        details["layers"].append({"index": block.index, "name": block.name, "nodes_in_branch": moved})
    RemoveUnusedNodesPass()(model)
    graph.sort()
    return PassResult(model=model, sites=opts.max, details=details)


def _require_layer_cache(graph: ir.Graph) -> None:
    names = {v.name for v in graph.inputs}
    if not any(n.startswith("past_key_values.") for n in names):
        raise PassError("skip_layers mode=positional needs a decoder with a KV cache (no past_key_values inputs here; "
                        "an encoder has none): run kv_cache:layer_masks=true before it.")
    if not any(n.startswith("attention_mask.") for n in names):
        raise PassError("skip_layers mode=positional needs one attention mask per layer, since skipped layers hold "
                        "fewer tokens: make the cache with kv_cache:layer_masks=true.")
    if any(v.name.startswith("attention.") for v in graph.outputs):
        raise PassError("skip_layers mode=positional does not combine with attention-score outputs (eviction "
                        "policies): make the cache without kv_cache:scores=true.")
    if COUNT in names:
        raise PassError("this model already skips layers positionally (it has a skip_layers.count input); "
                        "apply mode=positional once.")


def _wrap_block(graph: ir.Graph, block: Any, count: ir.Value, rank: int) -> int:
    """Move the block's nodes into an If's compute branch, bypassed when ``count > rank``;
    returns how many nodes moved."""
    values = values_by_name(graph)
    start = values[block.input]
    ends = [values[block.output]] + [values[f"present.{block.index}.{kind}"] for kind in ("key", "value")]
    pasts = [values[f"past_key_values.{block.index}.{kind}"] for kind in ("key", "value")]
    body = _body(graph, start, ends)
    _check_self_contained(body, ends, block)
    inside = {id(n) for n in body}
    readers = [[(user, slot) for user, slot in v.uses() if id(user) not in inside] for v in ends]
    slots = [[i for i, out in enumerate(graph.outputs) if out is v] for v in ends]
    for i in sorted((i for s in slots for i in s), reverse=True):
        graph.outputs.pop(i)  # they become the compute branch's outputs
    graph.remove(body, safe=False)
    skip = _skip_condition(graph, count, block.index, rank)
    results = _if(graph, skip, body, ends, [start] + pasts, block.index)
    _rewire(graph, readers, slots, results)
    return len(body)


def _rewire(graph: ir.Graph, readers: list[list], slots: list[list[int]], results: list[ir.Value]) -> None:
    """The If's results replace the block's outputs for readers outside it and as graph outputs."""
    for users, result in zip(readers, results):
        for user, slot in users:
            user.replace_input_with(slot, result)
    placed = sorted(((i, r) for positions, r in zip(slots, results) for i in positions), key=lambda pair: pair[0])
    for i, result in placed:  # ascending, so every earlier position is filled again first
        graph.outputs.insert(i, result)


def _body(graph: ir.Graph, start: ir.Value, ends: list[ir.Value]) -> list[ir.Node]:
    """Top-level nodes downstream of the block's input and upstream of its outputs."""
    downstream: set[int] = set()
    queue = deque([start])
    while queue:
        for user, _ in queue.popleft().uses():
            if user.graph is graph and id(user) not in downstream:
                downstream.add(id(user))
                queue.extend(user.outputs)
    upstream: set[int] = set()
    stack = [v.producer() for v in ends]
    while stack:
        node = stack.pop()
        if node is None or id(node) in upstream or id(node) not in downstream:
            continue
        upstream.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return [node for node in graph if id(node) in upstream]


def _check_self_contained(body: list[ir.Node], ends: list[ir.Value], block: Any) -> None:
    """Only the block's outputs may be read outside it: anything else would vanish when skipped."""
    inside = {id(n) for n in body}
    boundary = {id(v) for v in ends}
    for node in body:
        for value in node.outputs:
            if id(value) in boundary:
                continue
            outside = [user for user, _ in value.uses() if id(user) not in inside]
            if outside or value.is_graph_output():
                reader = outside[0].name if outside else "a graph output"
                raise PassError(f"block {block.index} ({block.name}) computes {value.name}, which {reader} reads outside "
                                "the block; positional skipping can only bypass self-contained blocks.")


def _skip_condition(graph: ir.Graph, count: ir.Value, index: int, rank: int) -> ir.Value:
    threshold = ir.Value(name=f"skip_layers_layer_{index}", const_value=ir.tensor(np.array(rank, np.int64)),
                         shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
    graph.register_initializer(threshold)
    node = ir.node("Greater", [count, threshold], name=f"skip_layers_skip_{index}")
    skip = node.outputs[0]
    skip.name, skip.shape, skip.type = f"skip_layers.skip_{index}", ir.Shape([]), ir.TensorType(ir.DataType.BOOL)
    graph.append(node)
    return skip


def _if(graph: ir.Graph, skip: ir.Value, body: list[ir.Node], ends: list[ir.Value], passed: list[ir.Value],
        index: int) -> list[ir.Value]:
    """``If(skip, then=pass the input and pasts through, else=the block)``; outputs keep the names."""
    names = [v.name for v in ends]
    for value in ends:
        value.name = f"{value.name}.computed"
    compute = ir.Graph([], ends, nodes=body, name=f"skip_layers_compute_{index}")
    copies = [ir.node("Identity", [v], name=f"skip_layers_pass_{index}_{i}") for i, v in enumerate(passed)]
    for copy, name, end in zip(copies, names, ends):
        copy.outputs[0].name, copy.outputs[0].type = f"{name}.skipped", end.type
    bypass = ir.Graph([], [c.outputs[0] for c in copies], nodes=copies, name=f"skip_layers_bypass_{index}")
    node = ir.Node("", "If", [skip], attributes=[ir.AttrGraph("then_branch", bypass), ir.AttrGraph("else_branch", compute)],
                   num_outputs=len(ends), name=f"skip_layers_if_{index}")
    for result, name, end in zip(node.outputs, names, ends):
        result.name, result.type, result.shape = name, end.type, _result_shape(name, end, index)
    graph.append(node)
    return list(node.outputs)


def _result_shape(name: str, end: ir.Value, index: int) -> ir.Shape | None:
    """A present's token axis is the layer's past length when skipped, past + new otherwise: its
    own symbol, so no one reads it as the mask's length."""
    if end.shape is None or not name.startswith("present."):
        return end.shape
    dims = list(end.shape)
    dims[2] = ir.SymbolicDim(f"present_sequence_{index}")
    return ir.Shape(dims)
