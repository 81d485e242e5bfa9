"""Blocks as spans of the residual chain, from scopes or from attention cores alone.

A block is a span ``(in_pos, out_pos]`` of the residual chain (see ``structure_flow``): its input
is the stream value of ``chain[in_pos]``, its output that of ``chain[out_pos]``, and it owns the
chain nodes in between with everything that hangs off them.

- With scopes (metadata or node-name paths): a block's chain nodes are the chain nodes inside
  its scope; its input is the chain node just before the first of them, its output the last.
  So the block output of ``layers.N`` is exactly the input of ``layers.N+1`` whenever no node
  outside any block sits on the stream between them.
- Without scopes: each attention core post-dominates into the chain at its residual merge; the
  chain node before that merge starts a block, and the next block starts where the next core's
  does. The last block ends one period (the chain length of one block) later; for a single
  block, after its first MLP (plus the norm after it, if the model is post-norm).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from optimizer.structure_flow import Flow
from optimizer.structure_scopes import ScopedBlock
from optimizer.structure_sites import is_weight_matmul

NORM_OPS = {
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNormalization",
}
_NOOPS = {"Cast", "Identity", "Dropout"}


@dataclass
class Span:
    """A block before its sites are read: chain positions, node keys and attention cores."""

    name: str
    in_pos: int
    out_pos: int
    nodes: list[str] = field(default_factory=list)
    cores: list[str] = field(default_factory=list)


class Chain:
    """The residual chain with each stream-fed node's segment (see ``Flow.segments``).

    ``keys[0]`` is the token input itself, so a model fed embeddings directly (no embedding
    nodes before its first block) still has a block input."""

    def __init__(self, flow: Flow, keys: list[str], reachable: set[str], cores: list[str]):
        self.flow, self.keys, self.cores = flow, keys, set(cores)
        self.pos = {k: i for i, k in enumerate(keys)}
        self.segment = flow.segments(keys, reachable)
        self.members: dict[int, list[str]] = {}
        for key in flow.sorted_keys(self.segment):
            if key not in self.pos:
                self.members.setdefault(self.segment[key], []).append(key)

    def value(self, pos: int) -> ir.Value:
        return self.flow.stream_value(self.keys[pos])

    def skip_noops(self, pos: int) -> int:
        """Step back over chain nodes that only recast the stream (a norm's leading Cast), so a
        block or MLP starts at the residual Add itself."""
        while pos > 0 and self.flow.nodes[self.keys[pos]].op_type in _NOOPS and not self.members.get(pos):
            pos -= 1
        return pos

    def merge_pos(self, core: str) -> int | None:
        """Chain position where the core's branch rejoins the stream (its residual Add)."""
        pos = self.segment.get(core)
        return pos if pos is not None and 0 < pos < len(self.keys) else None

    def branch_output(self, pos: int) -> ir.Value | None:
        """The non-stream input of the merge node at ``pos``: the sub-block's output."""
        node = self.flow.nodes[self.keys[pos]]
        stream = self.value(pos - 1)
        for value in self.flow.activations(node):
            if value is not stream and self.segment.get(self.flow.producer(value) or "") == pos:
                return value
        return next((v for v in self.flow.activations(node) if v is not stream), None)

    def has_projection(self, pos: int) -> bool:
        return any(is_weight_matmul(self.flow, self.flow.nodes[k]) for k in self.members.get(pos, []))


def scoped_spans(chain: Chain, scoped: list[ScopedBlock], cores: list[str]) -> list[Span] | None:
    """Spans from scope membership; None when the chain does not run through every block."""
    spans = []
    for entry in scoped:
        members = set(entry.nodes)
        positions = sorted(chain.pos[k] for k in members if k in chain.pos)
        if not positions or positions[0] == 0:
            return None
        block_cores = [c for c in cores if c in members]
        spans.append(Span(entry.name, positions[0] - 1, positions[-1], chain.flow.sorted_keys(members), block_cores))
    if any(a.out_pos > b.in_pos for a, b in zip(spans, spans[1:])):
        return None  # blocks out of order along the stream: scopes do not describe it
    return spans


def graph_spans(chain: Chain, cores: list[str]) -> list[Span]:
    """Spans from attention cores alone (one block per residual merge that has a core)."""
    starts: dict[int, list[str]] = {}
    for core in cores:
        merge = chain.merge_pos(core)
        if merge is not None:
            starts.setdefault(chain.skip_noops(merge - 1), []).append(core)
    slots = sorted(starts)
    if not slots:
        return []
    ends = slots[1:] + [_last_end(chain, slots, chain.merge_pos(starts[slots[-1]][0]) or slots[-1] + 1)]
    spans = [Span(f"block.{i}", start, end, cores=starts[start]) for i, (start, end) in enumerate(zip(slots, ends))]
    _assign_nodes(chain, spans)
    return spans


def _last_end(chain: Chain, slots: list[int], merge: int) -> int:
    """Where the last block ends: one period after it starts, or for a lone block after its
    first MLP (and the norm after that, when a norm also follows its attention: post-norm)."""
    last = len(chain.keys) - 1
    if len(slots) > 1:
        period = Counter(b - a for a, b in zip(slots, slots[1:])).most_common(1)[0][0]
        return min(slots[-1] + period, last)
    end = merge
    for pos in range(merge + 1, last + 1):
        if chain.has_projection(pos):
            end = pos
            break
    post_norm = merge + 1 <= last and _is_norm(chain, merge + 1)
    return min(end + 1, last) if post_norm and end > merge else end


def _is_norm(chain: Chain, pos: int) -> bool:
    node = chain.flow.nodes[chain.keys[pos]]
    return node.op_type in NORM_OPS or node.op_type == "Sub"  # Sub: x - mean of a decomposed LN


def _assign_nodes(chain: Chain, spans: list[Span]) -> None:
    """Give each span the stream-fed nodes in its chain range, then the helper nodes
    (constants, shape arithmetic) whose every consumer is in that one span."""
    flow = chain.flow
    owner: dict[str, int] = {}
    for index, span in enumerate(spans):
        for key, segment in chain.segment.items():
            if span.in_pos < segment <= span.out_pos and key not in owner:
                owner[key] = index
    for key in reversed(list(flow.nodes)):
        if key in owner or key in chain.segment:  # stream-fed nodes outside every span stay out
            continue
        users = {owner.get(u) for out in flow.nodes[key].outputs for u in flow.consumers(out)}
        if len(users) == 1 and None not in users:
            owner[key] = users.pop()
    for key in flow.nodes:
        if key in owner:
            spans[owner[key]].nodes.append(key)
