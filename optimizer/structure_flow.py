"""Dataflow analysis for the model map: node keys, weights, post-dominators, the residual chain.

The residual stream of a transformer is found without looking at names: take the tensor
dataflow from the token input (``input_ids``, ``pixel_values``, ``inputs_embeds``) to the
model's main output. The nodes that lie on *every* path between them are exactly the residual
stream's merge points: the embedding output, each residual ``Add`` (and, for post-norm models,
each ``LayerNormalization`` after it), the final norm and the head. They are the token input's
chain of immediate post-dominators (networkx ``immediate_dominators`` on the reversed graph).
Masks, position ids and rotary tables enter from other inputs and so never break the chain.

Cases handled:
- edges into ``Shape``/``Size`` are dropped: they read only metadata, and a mask built from
  ``Shape(hidden)`` would otherwise look like a path that skips every block;
- graphs with several outputs (pooler, KV-cache ``present.*``, all hidden states): the chain
  runs to the one output that depends on the most attention cores (then the deepest one), so
  side outputs do not cut it short;
- nodes without names or with repeated names get a unique key (``OpType#position``).
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import onnx_ir as ir

SINK = "<sink>"
_METADATA_OPS = {"Shape", "Size"}


def input_key(value: ir.Value) -> str:
    """The dataflow graph's node for a graph input."""
    return f"<input:{value.name}>"


class Flow:
    """The top-level graph as a networkx DiGraph of node keys (producer -> consumer)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.nodes: dict[str, ir.Node] = {}
        self._key_of: dict[int, str] = {}
        for position, node in enumerate(graph):
            key = node.name if node.name and node.name not in self.nodes else f"{node.op_type}#{position}"
            self.nodes[key] = node
            self._key_of[id(node)] = key
        self.order = {key: i for i, key in enumerate(self.nodes)}
        self.inputs = {input_key(v): v for v in graph.inputs}
        self.weights = self._weight_values()
        self.g = self._dataflow()
        self._pdom: dict[str, str] | None = None
        self.sink_output: ir.Value | None = None

    # -- lookups -------------------------------------------------------------------------
    def key(self, node: ir.Node | None) -> str | None:
        return None if node is None else self._key_of.get(id(node))

    def producer(self, value: ir.Value | None) -> str | None:
        return None if value is None else self.key(value.producer())

    def consumers(self, value: ir.Value) -> list[str]:
        keys = (self.key(user) for user, _ in value.uses())
        return sorted({k for k in keys if k is not None}, key=self.order.__getitem__)

    def is_weight(self, value: ir.Value | None) -> bool:
        return value is not None and id(value) in self.weights

    def activations(self, node: ir.Node) -> list[ir.Value]:
        """The node's inputs that carry data computed from graph inputs (not weights)."""
        return [v for v in node.inputs if v is not None and not self.is_weight(v)]

    def sorted_keys(self, keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=lambda k: self.order.get(k, -1))

    # -- construction --------------------------------------------------------------------
    def _weight_values(self) -> set[int]:
        """Values computed from initializers and constants alone (Transpose(W), DQ(W), ...)."""
        # An initializer that is also a graph input (old exporters' keep_initializers_as_inputs)
        # still counts as a weight. Shape(x) never does: Range(0, Shape(x)) follows x.
        weights = {id(v) for v in self.graph.initializers.values()}
        for node in self.graph:
            if node.op_type in _METADATA_OPS:
                continue
            if all(id(v) in weights for v in node.inputs if v is not None):  # Constant: no inputs
                weights.update(id(v) for v in node.outputs)
        return weights

    def _dataflow(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for key, node in self.nodes.items():
            if node.op_type in _METADATA_OPS:
                continue
            for value in node.inputs:
                if value is None or self.is_weight(value):
                    continue
                source = self.producer(value)
                if source is None and value.is_graph_input():
                    source = input_key(value)
                if source is not None:
                    g.add_edge(source, key)
        return g

    # -- post-dominators and the chain ---------------------------------------------------
    def set_sink(self, output: ir.Value) -> None:
        """Post-dominance is taken towards this graph output."""
        self.sink_output = output
        self.g.remove_edges_from(list(self.g.in_edges(SINK)))
        source = self.producer(output) or input_key(output)
        self.g.add_edge(source, SINK)
        self._pdom = None

    @property
    def pdom(self) -> dict[str, str]:
        if self._pdom is None:
            self._pdom = nx.immediate_dominators(self.g.reverse(copy=False), SINK) if SINK in self.g else {}
        return self._pdom

    def chain_from(self, start: str) -> list[str]:
        """The immediate post-dominators of ``start`` in order, up to (not including) the sink."""
        chain, key = [], start
        while key in self.pdom and self.pdom[key] != key:
            key = self.pdom[key]
            if key == SINK:
                break
            chain.append(key)
        return chain

    def token_chain(self, cores: list[str]) -> tuple[ir.Value | None, list[str]]:
        """The graph input that feeds the residual stream, and its chain.

        Every input's chain ends on the stream; the token input's chain is the one that reaches
        the most attention cores without passing through one (a past-KV input's chain runs
        through its own layer's core), then the longest (a mask or rotary input only joins
        the stream in the last block).
        """
        best: tuple[ir.Value | None, list[str]] = (None, [])
        best_score = (0, 0)
        for value in self.graph.inputs:
            key = input_key(value)
            if key not in self.g:
                continue
            chain = self.chain_from(key)
            reached = set(cores) & nx.descendants(self.g, key)
            score = (len(reached - set(chain)), len(chain))
            if score > best_score:
                best, best_score = (value, chain), score
        return best

    def choose_sink(self, cores: list[str]) -> None:
        """Point post-dominance at the output that depends on the most attention cores."""
        core_set = set(cores)
        best, best_score = None, (-1, -1)
        for output in self.graph.outputs:
            source = self.producer(output)
            if source is None:
                continue
            ancestors = nx.ancestors(self.g, source) | {source}
            score = (len(ancestors & core_set), len(ancestors))
            if score > best_score:
                best, best_score = output, score
        if best is not None:
            self.set_sink(best)

    def stream_value(self, key: str) -> ir.Value:
        """The output of a chain node that carries the stream (its first output in use), or
        the graph input itself for an input's key."""
        if key in self.inputs:
            return self.inputs[key]
        node = self.nodes[key]
        for value in node.outputs:
            if value.uses() or value.is_graph_output():
                return value
        return node.outputs[0]

    def segments(self, chain: list[str], reachable: set[str]) -> dict[str, int]:
        """For nodes fed by the stream: the chain position of their first post-dominator on it.

        A node with segment ``i`` lies between ``chain[i-1]`` and ``chain[i]`` (attention,
        MLP or norm internals); chain nodes map to their own position.
        """
        position = {key: i for i, key in enumerate(chain)}
        found: dict[str, int] = dict(position)
        for key in reachable:
            path = []
            while key not in found and key in self.pdom and key != SINK:
                path.append(key)
                key = self.pdom[key]
            segment = found.get(key, len(chain))
            for visited in path:
                found[visited] = segment
        return found
