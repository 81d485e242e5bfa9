"""Layer skipping, part 1: the units a skip set is made of, and the static rewrite.

A *unit* is a stretch of the residual stream that can be bypassed: its output value is replaced
by its input value, so everything it computed becomes dead and is removed. Units come from the
model map (``optimizer.structure``):

- whole blocks (``sub=False``): unit ``i`` is block ``i``, from ``block.input`` to
  ``block.output``;
- sub-blocks (``sub=True``): unit ``2i`` is block ``i``'s attention, from ``block.input`` to
  ``block.mlp.input`` (the stream entering the MLP sub-block), and unit ``2i+1`` its MLP, from
  ``block.mlp.input`` to ``block.output``. In pre-norm blocks (Llama, ViT) dropping a sub-block
  drops ``x + f(norm(x))`` down to ``x``; in post-norm blocks (BERT) it drops ``norm(x + f(x))``
  down to ``x``, the sub-layer's own LayerNorm included.

Cases handled by ``apply_skip``: any subset of units, adjacent ones included (a run of adjacent
skipped units is bypassed as one span, from the first one's input to the last one's output);
with ``replace=linear`` each span goes through its fitted map (``passes.skip_layers_linear``);
a unit whose output is a graph output (an Identity from the input keeps the output's name); the
empty set (the model is left untouched, so it reproduces the original exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

from optimizer.structure import require_blocks
from passes.graph_util import values_by_name
from passes.skip_layers_linear import SpanMaps, insert_map, spans
from optimizer.structure_types import ModelMap
from runtime.errors import PassError


@dataclass(frozen=True)
class Unit:
    """One skippable stretch of the residual stream, by value names."""

    index: int
    name: str
    input: str
    output: str


def units_of(model_map: ModelMap, sub: bool) -> list[Unit]:
    """The units of a mapped model, in stream order (see the module docstring)."""
    require_blocks(model_map, "skip_layers")
    if not sub:
        return [Unit(b.index, b.name, b.input, b.output) for b in model_map.blocks]
    units: list[Unit] = []
    for block in model_map.blocks:
        if block.mlp is None:
            # Parallel attention+MLP blocks (GPT-J, Falcon) have no stream value between the two.
            raise PassError(f"sub=true needs an MLP site in every block, but block {block.index} ({block.name}) "
                            "has none (parallel attention and MLP); use sub=false to skip whole blocks.")
        units.append(Unit(len(units), f"{block.name}.attention", block.input, block.mlp.input))
        units.append(Unit(len(units), f"{block.name}.mlp", block.mlp.input, block.output))
    return units


def check_skip_set(skip: tuple[int, ...], units: list[Unit], what: str) -> tuple[int, ...]:
    """Validate explicit unit indices: in range, no repeats, fewer than all units."""
    n = len(units)
    for i in skip:
        if not 0 <= i < n:
            raise PassError(f"{what} index {i} is out of range; this model has {n} {what}s (0-{n - 1}).")
    if len(set(skip)) != len(skip):
        raise PassError(f"{what} indices {'+'.join(map(str, skip))} repeat an index; name each {what} once.")
    if len(skip) >= n:
        raise PassError(f"skipping {len(skip)} of {n} {what}s is a budget larger than the model; skip fewer than {n}.")
    return tuple(sorted(skip))


def apply_skip(model: ir.Model, units: list[Unit], skip: tuple[int, ...], maps: SpanMaps | None = None) -> int:
    """Bypass the units in ``skip`` in place, then remove dead nodes; returns nodes removed.

    Each span of adjacent skipped units is bypassed at once, from its first unit's input to its
    last unit's output; with ``maps`` (``replace=linear``) through the span's fitted linear map.
    """
    if not skip:
        return 0
    values = values_by_name(model.graph)
    before = model.graph.num_nodes()
    # Last span to first: bypassing a span moves its output's uses onto its input, which is an
    # output of the units before it; bypassing an earlier span later moves them again.
    for first, last in reversed(spans(skip)):
        start = values[units[first].input]
        if maps is not None:
            start = insert_map(model.graph, start, *maps.get(first, last), tag=f"linear_{first}_{last}")
        _bypass(model.graph, values[units[last].output], start)
    common.RemoveUnusedNodesPass()(model)
    return before - model.graph.num_nodes()


def _bypass(graph: ir.Graph, output: ir.Value, replacement: ir.Value) -> None:
    """Make every reader of ``output`` read ``replacement``; graph outputs keep their names."""
    if output.is_graph_output():
        # The graph's signature must not change: an Identity re-creates the output by name.
        name = output.name
        output.name = f"{name}__skipped"
        identity = ir.node("Identity", [replacement], name=f"skip_layers_identity_{name}")
        kept = identity.outputs[0]
        kept.name, kept.dtype, kept.shape = name, output.dtype, output.shape
        graph.append(identity)
        for i, value in enumerate(graph.outputs):
            if value is output:
                graph.outputs[i] = kept
    output.replace_all_uses_with(replacement)

