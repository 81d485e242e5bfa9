"""Small graph lookups the passes share: values by name, and what a value is computed from."""

from __future__ import annotations

import onnx_ir as ir


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the top-level graph: inputs, initializers and node outputs."""
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values


def ancestors(values: list[ir.Value]) -> set[int]:
    """ids of ``values`` and of every value they are computed from."""
    found, stack = set(), list(values)
    while stack:
        current = stack.pop()
        if id(current) in found:
            continue
        found.add(id(current))
        node = current.producer()
        if node is not None:
            stack.extend(v for v in node.inputs if v is not None)
    return found
