"""Verification after every pass: the ONNX checker plus carve's own invariants.

Invariants checked:
- every node input is a graph input, an initializer, or produced by an earlier node
  (the graph is topologically sorted and has no dangling values);
- value names are unique and every graph output is produced;
- the signature (input and output names, dtypes and ranks) is unchanged, unless the pass
  declares that it changes it (the KV-cache rewrite adds inputs and outputs).
A failure is a bug in the pass, reported as a ``VerificationError`` that names the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from runtime.errors import VerificationError

_CHECKER_LIMIT = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph itself


@dataclass(frozen=True)
class Signature:
    inputs: tuple[tuple[str, str, int | None], ...]
    outputs: tuple[tuple[str, str, int | None], ...]

    @classmethod
    def of(cls, model: ir.Model) -> "Signature":
        return cls(_describe(model.graph.inputs), _describe(model.graph.outputs))


def _describe(values) -> tuple[tuple[str, str, int | None], ...]:
    return tuple((v.name, str(v.dtype), None if v.shape is None else v.shape.rank()) for v in values)


def check(model: ir.Model, before: Signature, label: str, allow_signature_change: bool = False) -> None:
    problem = graph_problem(model.graph)
    if problem is None and not allow_signature_change:
        after = Signature.of(model)
        if after != before:
            problem = f"the model's inputs or outputs changed from {before} to {after}"
    if problem is None:
        problem = checker_problem(model)
    if problem:
        raise VerificationError(f"{label} produced an invalid graph: {problem}; this is a bug in the pass, please report it.")


def graph_problem(graph: ir.Graph) -> str | None:
    """The first broken invariant of ``graph`` (see module docstring), or None."""
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    names: set[str] = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in known and not _from_outer_scope(value, graph):
                return f"node {node.name!r} ({node.op_type}) reads {value.name!r} before it is produced"
        for value in node.outputs:
            if value.name in names and value.name:
                return f"value name {value.name!r} is defined twice"
            names.add(value.name)
            known.add(id(value))
    for value in graph.outputs:
        if id(value) not in known:
            return f"graph output {value.name!r} is not produced by any node"
    return None


def _from_outer_scope(value: ir.Value, graph: ir.Graph) -> bool:
    return value.graph is not None and value.graph is not graph


def checker_problem(model: ir.Model) -> str | None:
    proto = ir.serde.serialize_model(model)
    if proto.ByteSize() > _CHECKER_LIMIT:
        return None  # too large for the in-memory checker; the invariants above still ran
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0]
    return None
