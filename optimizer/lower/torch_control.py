"""ONNX control flow (``If``, ``Loop``) in the torch lowering.

Each branch or loop body is built into its own ``GraphModule`` (a submodule of the model, so
``.to(device)`` moves its constants too), whose placeholders are the subgraph's own inputs
followed by the outer values it reads (``captured``: ONNX subgraphs may read any value of an
enclosing graph by name). The operators below call those modules:

- ``if_``: runs one branch on the condition's value (a host sync on CUDA, and a graph break
  under ``torch.compile``: the branch taken depends on data);
- ``loop``: ONNX ``Loop`` with an optional trip count and condition; loop-carried values pass
  from one iteration to the next, scan outputs are stacked along a new first axis.
``Scan`` is refused by the builder.
"""

from __future__ import annotations

import onnx_ir as ir
import torch


def captured(graph: ir.Graph) -> list[ir.Value]:
    """Values ``graph`` (or a subgraph inside it) reads but does not define, in first-use order."""
    defined: set[int] = set()
    found: dict[int, ir.Value] = {}
    _scan(graph, defined, found)
    return list(found.values())


def _scan(graph: ir.Graph, defined: set[int], found: dict[int, ir.Value]) -> None:
    defined.update(id(v) for v in graph.inputs)
    defined.update(id(v) for v in graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined:
                found.setdefault(id(value), value)
        for attr in node.attributes.values():
            for sub in _subgraphs(attr):
                _scan(sub, defined, found)
        defined.update(id(v) for v in node.outputs)
    for value in graph.outputs:
        if id(value) not in defined:
            found.setdefault(id(value), value)


def _subgraphs(attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def if_(cond, then_branch, else_branch, then_args, else_args):
    if bool(cond.reshape(-1)[0]) if isinstance(cond, torch.Tensor) else bool(cond):
        return then_branch(*then_args)
    return else_branch(*else_args)


def loop(max_trip, cond, *state, body, body_args, scans):
    trips = None if max_trip is None else int(max_trip.reshape(-1)[0]) if isinstance(max_trip, torch.Tensor) else int(max_trip)
    keep = True if cond is None else bool(cond.reshape(-1)[0]) if isinstance(cond, torch.Tensor) else bool(cond)
    collected: list[tuple] = []
    i = 0
    while keep and (trips is None or i < trips):
        out = body(torch.tensor(i, dtype=torch.int64), torch.tensor(keep), *state, *body_args)
        keep = bool(out[0].reshape(-1)[0]) if isinstance(out[0], torch.Tensor) else bool(out[0])
        state = tuple(out[1:1 + len(state)])
        collected.append(tuple(out[1 + len(state):]))
        i += 1
    stacked = tuple(torch.stack([c[k] for c in collected]) if collected else torch.empty(0) for k in range(scans))
    return (*state, *stacked)
