"""Token pruning, part 2: making everything after a gather point see the kept tokens only.

A *region* is the set of nodes that run on one token set: everything downstream of a stage's
gathered stream, up to the next stage (or up to the restore point). After the stream itself is
replaced by its gathered form, a region node may still read *side values* computed from the full
sequence elsewhere in the graph. Each one is rewritten once (memoised), by what it is:

- a constant or initializer: kept;
- a value with the token dim on some axes (the ``[batch, 1, N, N]`` additive mask, the
  ``[batch, N, 1]`` pooling weights of a mean pool, a rotary table): gathered on those axes with
  the stage's original token positions (``prune_tokens_ops.take``); a value made inside the
  previous region (already indexed by that stage's tokens) is gathered with the relative indices;
- a ``Shape`` of such a value (the sequence length that ``view``/``Reshape`` targets are built
  from): the same shape with the kept count on the token axes (no data is gathered);
- anything else computed from those (the mean pool's token count, a Reshape target, a Concat of
  sizes): its producer is cloned over the rewritten inputs, recursively;
- a graph input without the token dim: kept.

Static graphs (ViT-S: 257 tokens written into Reshape targets as constants) get those constants
rewritten: the token count becomes the kept count when it is static, else ``0`` with
``allowzero=0`` (copy the input's dim). Value shapes in the region are retagged: the token dim
becomes the kept count (static) or a new symbolic dim, so that ONNX Runtime's shape checks and
later passes read the right sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes.prune_tokens_ops import Ops, take
from runtime.errors import PassError


@dataclass
class TokenDim:
    """The token dim as it appears in value shapes: a symbol name, or a static size."""

    symbol: str | None
    size: int | None

    def matches(self, dim) -> bool:
        if self.size is not None:
            return isinstance(dim, int) and dim == self.size
        return isinstance(dim, ir.SymbolicDim) and dim.value == self.symbol

    def axes(self, value: ir.Value) -> list[int]:
        shape = value.shape
        return [] if shape is None else [i for i, d in enumerate(shape) if self.matches(d)]

    def dim(self):
        return self.size if self.size is not None else ir.SymbolicDim(self.symbol)


@dataclass
class Region:
    """One token set's nodes and how its tokens relate to the original and previous sets."""

    nodes: list[ir.Node]
    stream_in: ir.Value  # the stream value at the gather point (previous token set)
    stream_new: ir.Value  # its gathered (or merged) form
    positions: ir.Value  # [batch, K] original positions of the kept tokens (side values use these)
    relative: ir.Value  # [batch, K] indices into the previous token set
    count: ir.Value  # int64 [1]: K
    dim: TokenDim  # how the region's token dim is written after the rewrite
    previous: TokenDim  # how the previous token set's dim is written
    previous_nodes: set[int] = field(default_factory=set)


def downstream(graph: ir.Graph, starts: list[ir.Value], stop: ir.Value | None = None) -> list[ir.Node]:
    """Nodes reachable from ``starts`` through uses, in graph order; nothing past ``stop``'s readers."""
    seen: set[int] = set()
    frontier = list(starts)
    while frontier:
        value = frontier.pop()
        if stop is not None and value is stop:
            continue
        for node, _ in value.uses():
            if id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.outputs)
    return [n for n in graph if id(n) in seen]


def reroute(ops: Ops, region: Region, original: TokenDim, fresh: set[int]) -> int:
    """Point every region node at the gathered stream and the rewritten side values; returns
    how many side values were rewritten."""
    produced = {id(v) for n in region.nodes for v in n.outputs}
    memo: dict[int, ir.Value] = {}
    for node in region.nodes:
        for i, value in enumerate(node.inputs):
            if value is None or id(value) in produced or id(value) in fresh:
                continue
            new = region.stream_new if value is region.stream_in else _side(ops, region, original, value, memo)
            if new is not value:
                node.replace_input_with(i, new)
    _reshape_constants(ops, region, original)
    return sum(1 for key, new in memo.items() if id(new) != key)


def _side(ops: Ops, region: Region, original: TokenDim, value: ir.Value, memo: dict[int, ir.Value]) -> ir.Value:
    if id(value) in memo:
        return memo[id(value)]
    memo[id(value)] = value  # a guard against cycles through the same value
    memo[id(value)] = result = _rewrite(ops, region, original, value, memo)
    return result


def _rewrite(ops: Ops, region: Region, original: TokenDim, value: ir.Value, memo) -> ir.Value:
    if value.const_value is not None or value.is_initializer():
        return value
    producer = value.producer()
    from_previous = producer is not None and id(producer) in region.previous_nodes
    axes = (region.previous if from_previous else original).axes(value)
    if axes:
        return take(ops, value, region.relative if from_previous else region.positions, axes)
    if producer is None:
        return value
    if producer.op_type == "Shape":
        return _shape(ops, region, original, producer, value, memo)
    inputs = [_side(ops, region, original, x, memo) if x is not None else None for x in producer.inputs]
    if all(a is b for a, b in zip(inputs, producer.inputs)):
        return value
    return ops.clone(producer, inputs).outputs[list(producer.outputs).index(value)]


def _shape(ops: Ops, region: Region, original: TokenDim, node: ir.Node, value: ir.Value, memo) -> ir.Value:
    """The Shape of a token-indexed value, with the kept count on its token axes."""
    source = node.inputs[0]
    axes = original.axes(source)
    if not axes or source.shape is None:
        new_source = _side(ops, region, original, source, memo)
        return value if new_source is source else ops.clone(node, [new_source]).outputs[0]
    rank = len(source.shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", rank)
    start, end = (start + rank if start < 0 else start), min(end + rank if end < 0 else end, rank)
    hits = [a - start for a in axes if start <= a < end]
    if not hits:
        return value
    pieces, done = [], 0
    for hit in hits:
        if hit > done:
            pieces.append(ops.op("Slice", value, ops.i64(done), ops.i64(hit)))
        pieces.append(region.count)
        done = hit + 1
    if done < end - start:
        pieces.append(ops.op("Slice", value, ops.i64(done), ops.i64(end - start)))
    return pieces[0] if len(pieces) == 1 else ops.op("Concat", *pieces, axis=0)


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _reshape_constants(ops: Ops, region: Region, original: TokenDim) -> None:
    """Static token counts written into Reshape targets (see the module docstring)."""
    size = original.size
    if size is None:
        return
    for node in region.nodes:
        if node.op_type != "Reshape" or node.inputs[1] is None or node.inputs[1].const_value is None:
            continue
        target = node.inputs[1].const_value.numpy()
        if size not in target.tolist():
            continue
        new = target.copy()
        if region.dim.size is not None:
            new[new == size] = region.dim.size
        elif 0 in target.tolist():
            raise PassError(f"prune_tokens cannot rewrite the Reshape {node.name!r} (target {target.tolist()}) for a "
                            "data-dependent token count; use a static keep ratio (no threshold) on this model.")
        else:
            new[new == size] = 0
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        node.replace_input_with(1, ops.const(new.astype(np.int64), "reshape_target"))


def retag(nodes: list[ir.Node], old: TokenDim, new: TokenDim) -> None:
    """Rewrite the token dim in the shapes of the values ``nodes`` produce (graph outputs too)."""
    for node in nodes:
        for value in node.outputs:
            shape = value.shape
            if shape is not None and any(old.matches(d) for d in shape):
                value.shape = ir.Shape([new.dim() if old.matches(d) else d for d in shape])
