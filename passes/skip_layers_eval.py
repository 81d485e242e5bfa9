"""Layer skipping, part 4: scoring many skip sets quickly.

A search scores hundreds of skip sets; building a rewritten graph and an ORT session for each
costs seconds on a 135M-parameter model. ``StreamEvaluator`` instead cuts the graph once along
the residual stream:

- one ORT run of the original graph per calibration batch records every unit's input and
  output and every *side value* the units read (masks, rotary tables, shapes);
- each unit becomes its own small ORT session (``onnx_ir.convenience.extract``) from its input
  value and side values to its output value; the tail after the last unit (final norm, head,
  pooling) becomes one more;
- a skip set is scored by running the unit sessions in order, passing the stream through the
  skipped ones unchanged, then the tail. The state after unit ``u`` depends only on which units
  up to ``u`` are skipped, so states are cached by that prefix (LRU, ``CACHE_BYTES``) and a
  candidate reruns only the units after the first place it differs from one already seen; the
  empty prefix is the original run itself. With ``replace=linear`` a skipped span's state is
  kept unmapped in the cache and mapped (``SpanMaps``, numpy) where the span ends.

This is exact (it computes what the rewritten graph computes) when side values do not depend on
the stream's numbers. ``plan`` checks that: a value is *stream-dependent* when it is reachable
from the first unit's input other than through ``Shape``/``Size`` (whose outputs depend on
shapes only, which skipping keeps), and every stream-dependent node a unit needs must lie
downstream of that unit's own input. Graphs that break this (a stream value read by a later
block directly, as in DenseNet-style skips) or whose main output is not on the stream get
``GraphEvaluator`` instead: a rewritten graph and a session per skip set.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from passes.graph_util import values_by_name
from passes.skip_layers_linear import SpanMaps
from passes.skip_layers_rewrite import Unit, apply_skip
from passes.skip_layers_score import Metric, block_influence, reference_run, session, token_mask

CACHE_BYTES = 512 * 2**20
_SHAPE_OPS = {"Shape", "Size"}


@dataclass
class Segment:
    """One extracted piece: the stream value in, the side values it reads, the value out."""

    input: str
    side: list[str]
    output: str


def plan(model: ir.Model, units: list[Unit], main_output: str) -> list[Segment] | None:
    """Segments for every unit and the tail, or None when the stream cut is not exact."""
    graph = model.graph
    values = values_by_name(graph)
    if units[0].input not in values or main_output not in values:
        return None
    stream = _forward(values[units[0].input])
    pieces = [(u.input, u.output) for u in units] + [(units[-1].output, main_output)]
    segments = []
    for start, end in pieces:
        if start == end:
            segments.append(Segment(start, [], end))  # e.g. the main output is the last block's output
            continue
        segment = _segment(values[start], values[end], stream)
        if segment is None:
            return None
        segments.append(segment)
    return segments




def _forward(start: ir.Value) -> set[ir.Value]:
    """Values whose numbers depend on ``start`` (Shape and Size outputs excepted)."""
    seen, stack = {start}, [start]
    while stack:
        for node, _ in stack.pop().uses():
            if node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx"):
                continue
            for out in node.outputs:
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


def _segment(start: ir.Value, end: ir.Value, stream: set[ir.Value]) -> Segment | None:
    """Walk back from ``end`` to ``start``; side values are the non-stream leaves met on the way."""
    if end not in stream:
        return None
    reachable = _forward(start)
    side: dict[str, None] = {}
    seen, stack = {start}, [end]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value not in stream:
            if not _is_constant(value):
                side[value.name] = None
            continue
        if value not in reachable:
            return None  # the piece reads the stream somewhere other than through its input
        stack.extend(v for v in value.producer().inputs if v is not None)
    return Segment(start.name, list(side), end.name)


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant")


class StreamEvaluator:
    """Scores skip sets with per-unit sessions and a prefix cache (see the module docstring)."""

    name = "stream segments: one session per unit, states cached by skipped prefix"

    def __init__(self, model: ir.Model, units: list[Unit], segments: list[Segment], batches, metric_kind: str,
                 linear: bool = False):
        self.units, self.segments, self.batches = units, segments, batches
        side = [s for seg in segments for s in seg.side if s not in batches[0]]
        bounds = [u.input for u in units] + [units[-1].output]
        self.runs = reference_run(model, bounds + side, batches)
        self.sessions = [_piece_session(model, seg) for seg in segments]
        self.metric = _metric(metric_kind, self.runs, batches, segments[-1].output)
        self.bi, self.maps = _influences_and_maps(self.runs, batches, units, linear)
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0

    def score(self, skip: frozenset[int], nbatches: int) -> float:
        total, count = 0.0, 0
        for b in range(nbatches):
            s, c = self.metric.terms(b, self._run_piece(b, len(self.units), self._stream(b, skip)))
            total, count = total + s, count + c
        return total / max(count, 1)

    def _stream(self, b: int, skip: frozenset[int]) -> np.ndarray:
        """The stream after the last unit, resuming from the longest cached prefix."""
        prefixes = [frozenset(i for i in skip if i <= u) for u in range(len(self.units))]
        start, x = 0, self.runs[b][self.units[0].input]
        for u in range(len(self.units) - 1, -1, -1):
            if not prefixes[u]:
                start, x = u + 1, self.runs[b][self.units[u].output]
                break
            if (b, u, prefixes[u]) in self._cache:
                self._cache.move_to_end((b, u, prefixes[u]))
                start, x = u + 1, self._cache[(b, u, prefixes[u])]
                break
        for u in range(start, len(self.units)):
            if u not in skip:
                x = self._run_piece(b, u, self._close_span(skip, u, x))
            # A skipped unit's state is the span's input, not yet mapped: whether the span ends
            # here depends on units after u, which the prefix key does not cover.
            self._remember((b, u, prefixes[u]), x)
        return self._close_span(skip, len(self.units), x)

    def _close_span(self, skip: frozenset[int], u: int, x: np.ndarray) -> np.ndarray:
        """With replace=linear, map the stream through the skipped span that ends before unit u."""
        if self.maps is None or u - 1 not in skip:
            return x
        first = u - 1
        while first - 1 in skip:
            first -= 1
        return self.maps.apply(first, u - 1, x)

    def _run_piece(self, b: int, piece: int, x: np.ndarray) -> np.ndarray:
        seg = self.segments[piece]
        if seg.input == seg.output:
            return x
        feeds = {seg.input: x, **{s: self.batches[b][s] if s in self.batches[b] else self.runs[b][s] for s in seg.side}}
        return self.sessions[piece].run([seg.output], feeds)[0]

    def _remember(self, key, x: np.ndarray) -> None:
        if key in self._cache:
            self._cached_bytes -= self._cache.pop(key).nbytes
        self._cache[key] = x
        self._cached_bytes += x.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes


class GraphEvaluator:
    """Scores a skip set by rewriting a copy of the graph and running it (the general fallback)."""

    name = "rewritten graph and ORT session per skip set"

    def __init__(self, model: ir.Model, units: list[Unit], main_output: str, batches, metric_kind: str,
                 linear: bool = False):
        self.units, self.batches, self.main = units, batches, main_output
        self.proto = ir.serde.serialize_model(model)
        bounds = [u.input for u in units] + [units[-1].output]
        self.runs = reference_run(model, bounds, batches)
        self.metric = _metric(metric_kind, self.runs, batches, main_output)
        self.bi, self.maps = _influences_and_maps(self.runs, batches, units, linear)

    def score(self, skip: frozenset[int], nbatches: int) -> float:
        model = ir.serde.deserialize_model(self.proto)
        apply_skip(model, self.units, tuple(sorted(skip)), self.maps)
        sess = session(ir.serde.serialize_model(model).SerializeToString())
        total, count = 0.0, 0
        for b in range(nbatches):
            s, c = self.metric.terms(b, sess.run([self.main], self.batches[b])[0])
            total, count = total + s, count + c
        return total / max(count, 1)


def evaluator(model: ir.Model, units: list[Unit], main_output: str, batches, metric_kind: str, linear: bool = False):
    """The fast evaluator when the stream cut is exact, else the per-candidate one."""
    segments = plan(model, units, main_output)
    if segments is None:
        return GraphEvaluator(model, units, main_output, batches, metric_kind, linear)
    return StreamEvaluator(model, units, segments, batches, metric_kind, linear)


def _piece_session(model: ir.Model, seg: Segment):
    if seg.input == seg.output:
        return None
    graph = ir.convenience.extract(model.graph, [seg.input, *seg.side], [seg.output])
    piece = ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))
    return session(ir.serde.serialize_model(piece).SerializeToString())


def _metric(kind: str, runs, batches, main_output: str) -> Metric:
    refs = [run[main_output] for run in runs]
    return Metric(kind, refs, [token_mask(batch, ref.shape) for batch, ref in zip(batches, refs)])


def _influences_and_maps(runs, batches, units: list[Unit], linear: bool) -> tuple[list[float], SpanMaps | None]:
    """Every unit's Block Influence, and the span-map fitter when replace=linear."""
    masks = [token_mask(batch, run[units[0].input].shape) for batch, run in zip(batches, runs)]
    influence = [block_influence(runs, masks, u.input, u.output) for u in units]
    return influence, SpanMaps(runs, masks, units) if linear else None
