"""Where the KV-cache rewrite acts, read from one attention site of the model map.

For each eager attention site (a Softmax between Q*K^T and P*V) this finds:
- the **cache points**: K and V as the cache stores them, ``[batch, kv_heads, tokens, head_dim]``,
  after RoPE and before grouped-query attention repeats them for every query head (the last
  value of that shape on the path from the projection to the MatMul);
- the **length-bound nodes** between a cache point and its MatMul (GQA's ``Expand`` and
  ``Reshape``), whose shape operands were computed from the query length and must follow the
  cached length instead;
- the **mask slot**: the input of the score chain (``Add`` of an additive mask, or ``Where``'s
  condition) that carries the padding/causal mask;
- the **position tables**: operands on the Q and K paths computed from shapes and constants
  only (RoPE's cos/sin for the positions ``0..n-1``), which become lookups by ``position_ids``.

Anything outside these forms is refused with the reason: fused attention ops, a score chain
with no mask, other ops reading the cached length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx_ir as ir

from optimizer.structure_types import AttentionSite
from passes.graph_util import ancestors
from runtime.errors import PassError

# Ops allowed between a cache point and the attention MatMul (GQA repeat and the K transpose).
_LAYOUT_OPS = {"Unsqueeze", "Expand", "Reshape", "Transpose", "Cast", "Identity", "Mul", "Div"}
_SHAPE_SOURCES = {"Shape", "Size"}


@dataclass
class SiteCache:
    """What the rewrite needs of one attention site."""

    layer: int
    key: ir.Value
    value: ir.Value
    length_bound: list[ir.Node]
    mask_node: ir.Node
    mask_slot: int
    mask_kind: str  # "additive" | "keep" (Where keeps scores where true) | "drop"
    tables: list[tuple[ir.Node, int]] = field(default_factory=list)
    changed: list[ir.Value] = field(default_factory=list)  # values whose length becomes the cached one
    probs: ir.Value | None = None


def shape_only(graph: ir.Graph) -> set[int]:
    """ids of the values computed from shapes and constants alone (no tensor data), that are
    not constants themselves: sequence-length-derived tables, ranges and shape vectors."""
    const = {id(v) for v in graph.initializers.values()}
    derived: set[int] = set()
    for node in graph:
        ins = [v for v in node.inputs if v is not None]
        if node.op_type in _SHAPE_SOURCES:
            derived.update(id(v) for v in node.outputs)
        elif node.op_type == "Constant" or all(id(v) in const for v in ins):
            const.update(id(v) for v in node.outputs)
        elif all(id(v) in const or id(v) in derived for v in ins):
            derived.update(id(v) for v in node.outputs)
    return derived


def find_site(graph: ir.Graph, values: dict[str, ir.Value], layer: int, site: AttentionSite,
              derived: set[int]) -> SiteCache:
    if site.softmax_node is None or site.probs is None:
        raise PassError(f"attention in block {layer} is one fused op ({site.core}); kv_cache rewrites eager attention "
                        "(Softmax between Q*K^T and P*V): trace the model with eager attention.")
    softmax = values[site.probs].producer()
    qk, pv = _qk_node(softmax), _pv_node(softmax)
    if qk is None or pv is None:
        raise PassError(f"block {layer}: the attention's Q*K^T or P*V MatMul was not found next to its Softmax.")
    node, slot, kind = _mask_slot(softmax, qk, derived, layer)
    if not _causal(node.inputs[slot]):
        raise PassError(f"block {layer}'s attention has no causal mask; a KV cache would change an encoder's "
                        "outputs, so kv_cache applies to decoders only.")
    order = {id(n): i for i, n in enumerate(graph)}
    key_path = _path(values[site.k], qk.inputs[1], order)
    value_path = _path(values[site.v], pv.inputs[1], order)
    key, value = _cache_point(key_path, site, layer, "key"), _cache_point(value_path, site, layer, "value")
    bound = _after(key_path, key) + _after(value_path, value)
    tables = _tables(_path(values[site.q], qk.inputs[0], order) + key_path, derived)
    changed = [v for n in bound for v in n.outputs] + _score_values(qk, pv)
    return SiteCache(layer, key, value, bound, node, slot, kind, tables, changed, softmax.outputs[0])


def _causal(mask: ir.Value) -> bool:
    """Whether the mask is built with a position comparison (a causal mask)."""
    stack, seen = [mask], set()
    while stack:
        value = stack.pop()
        node = value.producer() if value is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in {"LessOrEqual", "Less", "Greater", "GreaterOrEqual", "Trilu"}:
            return True
        stack.extend(node.inputs)
    return False


def _qk_node(softmax: ir.Node) -> ir.Node | None:
    queue = deque([softmax.inputs[0]])
    while queue:
        node = queue.popleft().producer()
        if node is None:
            continue
        if node.op_type == "MatMul" and all(v.producer() is not None for v in node.inputs):
            return node
        queue.extend(v for v in node.inputs if v is not None)
    return None


def _pv_node(softmax: ir.Node) -> ir.Node | None:
    queue = deque([softmax.outputs[0]])
    while queue:
        value = queue.popleft()
        for user, slot in value.uses():
            if user.op_type == "MatMul" and slot == 0:
                return user
            if user.op_type in {"Cast", "Where", "Identity", "Dropout"}:
                queue.extend(user.outputs)
    return None


def _path(start: ir.Value, end: ir.Value, order: dict[int, int]) -> list[ir.Value]:
    """Values on a producer chain from ``start`` down to ``end`` (both included), in graph order."""
    upstream = ancestors([end])
    if id(start) not in upstream:
        raise PassError(f"value {start.name} does not reach {end.name}; the attention site is not in a form kv_cache knows.")
    path, queue, seen = [], deque([start]), set()
    while queue:
        value = queue.popleft()
        if id(value) in seen or id(value) not in upstream:
            continue
        seen.add(id(value))
        path.append(value)
        for user, _ in value.uses():
            queue.extend(user.outputs)
    return sorted(path, key=lambda v: order.get(id(v.producer()), -1))




def _cache_point(path: list[ir.Value], site: AttentionSite, layer: int, what: str) -> ir.Value:
    """The last ``[batch, kv_heads, tokens, head_dim]`` value on the path to the MatMul."""
    for value in reversed(path):
        shape = value.shape
        if shape is not None and len(shape) == 4 and shape[1] == site.kv_heads and shape[3] == site.head_dim \
                and not isinstance(shape[2], int):
            return value
    raise PassError(f"block {layer}: no {what} tensor of shape [batch, {site.kv_heads}, tokens, {site.head_dim}] was "
                    f"found before the attention MatMul; kv_cache needs static head counts in the traced graph.")


def _after(path: list[ir.Value], point: ir.Value) -> list[ir.Node]:
    """The nodes between a cache point and the MatMul; each must be a layout op."""
    index = path.index(point)
    nodes = []
    for value in path[index + 1:]:
        node = value.producer()
        if node.op_type not in _LAYOUT_OPS:
            raise PassError(f"node {node.name} ({node.op_type}) sits between the cached tensor and the attention "
                            "MatMul; kv_cache only knows reshapes, transposes and grouped-query repeats there.")
        if node not in nodes:
            nodes.append(node)
    return nodes


def _mask_slot(softmax: ir.Node, qk: ir.Node, derived: set[int], layer: int) -> tuple[ir.Node, int, str]:
    """The score-chain node input that carries the mask, and how the mask acts there."""
    scores = _descendants(qk.outputs[0], softmax)
    node = softmax.inputs[0].producer()
    while node is not None and node is not qk:
        for slot, operand in enumerate(node.inputs):
            if operand is None or id(operand) in scores or operand.const_value is not None:
                continue
            if operand.shape is not None and len(operand.shape) == 4:
                return node, slot, _mask_kind(node, slot, scores)
        node = next((v.producer() for v in node.inputs if v is not None and id(v) in scores), None)
    raise PassError(f"block {layer}: the attention scores carry no mask; kv_cache needs the causal mask to place the "
                    "cached keys (trace the model with an attention_mask input).")


def _mask_kind(node: ir.Node, slot: int, scores: set[int]) -> str:
    if node.op_type == "Add":
        return "additive"
    if node.op_type == "Where" and slot == 0:
        return "keep" if id(node.inputs[1]) in scores else "drop"
    raise PassError(f"node {node.name} applies the attention mask with {node.op_type}; kv_cache knows an additive "
                    "mask (Add) or a Where on the scores.")


def _descendants(value: ir.Value, stop: ir.Node) -> set[int]:
    found, queue = {id(value)}, deque([value])
    while queue:
        for user, _ in queue.popleft().uses():
            if user is stop:
                continue
            for out in user.outputs:
                if id(out) not in found:
                    found.add(id(out))
                    queue.append(out)
    return found


def _tables(path: list[ir.Value], derived: set[int]) -> list[tuple[ir.Node, int]]:
    """(node, input slot) pairs where a shape-derived table enters the Q or K path: RoPE."""
    slots, on_path = [], {id(v) for v in path}
    for value in path:
        for user, _ in value.uses():
            for slot, operand in enumerate(user.inputs):
                if operand is not None and id(operand) in derived and id(operand) not in on_path \
                        and user.op_type in {"Mul", "Add"} and (user, slot) not in slots:
                    slots.append((user, slot))
    return slots


def _score_values(qk: ir.Node, pv: ir.Node) -> list[ir.Value]:
    """The score chain's values (Q*K^T up to the probabilities): their last axis is the cached length."""
    upstream = ancestors([pv.inputs[0]])
    return [v for v in _walk(qk.outputs[0], pv) if id(v) in upstream]


def _walk(value: ir.Value, stop: ir.Node) -> list[ir.Value]:
    out, queue, seen = [], deque([value]), set()
    while queue:
        current = queue.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        for user, _ in current.uses():
            if user is not stop:
                queue.extend(user.outputs)
    return out
