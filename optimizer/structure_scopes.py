"""Module scopes of nodes, and the repeated numbered container that holds the blocks.

Two sources of scopes:
- ``pkg.torch.onnx.name_scopes`` metadata, written by torch's dynamo exporter on every node: a
  Python-repr list of module paths from the root, ending with the op's own name, e.g.
  ``['', 'model', 'model.layers.3', 'model.layers.3.self_attn', 'linear_7']``;
- node-name paths of other exporters (torch's legacy exporter, Optimum):
  ``/encoder/layer.0/attention/self/Softmax`` gives ``/encoder``, ``/encoder/layer.0``, ...

The block container is found generically, not from a list of known names: every scope path
ending in a number (``encoder.layer.0``, ``model.layers.12``, ``blocks.3``, ``h.0``,
``/decoder/layers.5``, a bare ``0`` of a top-level Sequential) is an entry of the container
named by what precedes it. The container whose entries hold the most attention cores wins
(``layers.N`` beats ``layers.N.mlp.experts.M``); ties go to the container met first.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from optimizer.structure_flow import Flow

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_NUMBERED = re.compile(r"^(?:(?P<container>.*)[./])?(?P<index>\d+)$")

ScopeReader = Callable[[ir.Node], list[str]]


def metadata_scopes(node: ir.Node) -> list[str]:
    """Module paths from the dynamo exporter's metadata (the op's own name dropped)."""
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return []
    try:
        items = ast.literal_eval(raw)  # a repr of a list of str; literal_eval runs no code
    except (ValueError, SyntaxError):
        return []
    if not isinstance(items, list):
        return []
    # "_empty_nn_module_stack..." marks nodes the exporter could not place in a module.
    return [s for s in items[:-1] if isinstance(s, str) and s and not s.startswith("_")]


def name_scopes(node: ir.Node) -> list[str]:
    """Cumulative paths of a ``/a/b.0/c/Op`` style node name (the op's own name dropped)."""
    name = node.name or ""
    if "/" not in name:
        return []
    parts = [p for p in name.split("/") if p][:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def has_scopes(flow: Flow, reader: ScopeReader) -> bool:
    return any(reader(node) for node in flow.nodes.values())


@dataclass
class ScopedBlock:
    """One entry of the block container: its number, full scope path and node keys."""

    index: int
    name: str
    nodes: list[str] = field(default_factory=list)


def numbered_blocks(flow: Flow, reader: ScopeReader, cores: list[str]) -> list[ScopedBlock]:
    """The entries of the container holding the most attention cores, in numeric order.

    Returns [] when no numbered scope holds an attention core (an MLP, a CNN, no scopes).
    """
    containers: dict[str, dict[int, ScopedBlock]] = {}
    for key, node in flow.nodes.items():
        for path in reader(node):
            match = _NUMBERED.match(path)
            if match is None:
                continue
            entries = containers.setdefault(match["container"] or "", {})
            entry = entries.setdefault(int(match["index"]), ScopedBlock(int(match["index"]), path))
            entry.nodes.append(key)
    core_set = set(cores)
    best, best_score = None, 0
    for entries in containers.values():  # insertion order: the container met first wins ties
        score = sum(1 for entry in entries.values() if core_set.intersection(entry.nodes))
        if score > best_score:
            best, best_score = entries, score
    if best is None:
        return []
    return [best[i] for i in sorted(best)]
