"""Building the fx graph of one ONNX graph (the model's, or an ``If`` branch / ``Loop`` body).

``GraphBuilder(graph, substitutes, captured).build()`` returns a ``GraphModule`` whose
placeholders are the graph's inputs, then the ``captured`` outer values (subgraphs only).
See ``optimizer.lower.torch`` for what is lowered and refused.
"""

from __future__ import annotations

import inspect
import operator
import re
from typing import Any

import onnx_ir as ir
import torch

from optimizer.lower import torch_control, torch_ops, torch_ops_index, torch_ops_nn, torch_ops_quant, torch_shapes
from optimizer.lower.torch_dtypes import to_torch
from runtime.errors import PassError

OPS = {**torch_ops.OPS, **torch_ops_index.OPS, **torch_ops_nn.OPS, **torch_ops_quant.OPS}
MULTI_OUTPUT = torch_ops.MULTI_OUTPUT | torch_ops_nn.MULTI_OUTPUT | torch_ops_quant.MULTI_OUTPUT
VALIDATORS = torch_ops_nn.VALIDATORS
# Folded once when all their inputs are constants (or folded): the asymmetric int4 weight form
# (passes.quantize_asym_graph: Cast, DequantizeLinear, Reshape, Add, Slice) would otherwise
# dequantize every weight on every call.
FOLDED_OPS = {"Cast", "Reshape", "Add", "Slice"}


class GraphBuilder:
    def __init__(self, graph: ir.Graph, substitutes: dict, captured: list[ir.Value] = ()):
        self.source, self.substitutes, self.captured = graph, substitutes, list(captured)
        self.graph = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[int, Any] = {}  # id(value) -> fx node (a tensor, or a shape value's ints) or literal
        self.shape_ranks = torch_shapes.shape_values(graph)
        self.as_tensor: dict[int, torch.fx.Node] = {}  # shape values that data inputs read, made tensors once
        self.deferred: dict[int, ir.Node] = {}  # DequantizeLinear of constants (and FOLDED_OPS): folded when first read
        self.names: set[str] = set()

    def build(self) -> torch.fx.GraphModule:
        for value in list(self.source.inputs) + self.captured:
            self.env[id(value)] = self.graph.placeholder(self._name(value.name or "input"))
        for node in self.source:
            self._node(node)
        self.graph.output(tuple(self._data(v, "graph output") for v in self.source.outputs))
        self.graph.eliminate_dead_code()
        return torch.fx.GraphModule(self.root, self.graph, class_name="CarveModule").eval()

    def _control(self, node: ir.Node, where: str) -> None:
        """If / Loop: each subgraph becomes a submodule called by ``torch_control``."""
        if node.op_type not in ("If", "Loop") or node.domain not in ("", "ai.onnx"):
            raise PassError(f"{where}: control flow operator {node.op_type} is not supported by the torch lowering; "
                            "run this graph with --target ort-cpu.")
        branches = {}
        for name in ("then_branch", "else_branch", "body"):
            if name in node.attributes:
                sub = node.attributes[name].value
                outer = torch_control.captured(sub)
                module = GraphBuilder(sub, self.substitutes, outer).build()
                attr = self._name(f"{node.name}_{name}")
                self.root.add_module(attr, module)
                branches[name] = (self.graph.get_attr(attr), [self._data(v, where) for v in outer])
        if node.op_type == "If":
            (then_m, then_a), (else_m, else_a) = branches["then_branch"], branches["else_branch"]
            args = (self._data(node.inputs[0], where), then_m, else_m, then_a, else_a)
            call = self._call(torch_control.if_, args, {}, node.name)
        else:
            body, body_args = branches["body"]
            state = [self._data(v, where) if v is not None else None for v in node.inputs]
            scans = len(node.attributes["body"].value.outputs) - 1 - (len(node.inputs) - 2)
            call = self._call(torch_control.loop, tuple(state + [None] * (2 - len(state))),
                              {"body": body, "body_args": body_args, "scans": scans}, node.name)
        for i, out in enumerate(node.outputs):
            self.env[id(out)] = self.graph.call_function(operator.getitem, (call, i))

    def _node(self, node: ir.Node) -> None:
        where = f"node {node.name or '(unnamed)'} ({node.op_type})"
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            self._constant(node.outputs[0], _constant_value(node, where), node.outputs[0].name or node.name)
            return
        if _constant_dequantize(node, self.deferred) or self._foldable(node):  # evaluated once, if and when read
            self.deferred[id(node.outputs[0])] = node
            return
        substitute = self.substitutes.get(id(node))
        if substitute is not None:
            args = tuple(self._data(v, where) if isinstance(v, ir.Value) else self._tensor(v, f"{node.name}_w")
                         for v in substitute.inputs)
            self.env[id(node.outputs[0])] = self._call(substitute.kernel, args, {}, node.name)
            return
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            self._control(node, where)
            return
        is_shape = id(node.outputs[0]) in self.shape_ranks
        fn = torch_shapes.SHAPE_OPS[node.op_type] if is_shape else _implementation(node, where)
        raw = torch_shapes.SHAPE_INPUTS.get(node.op_type, set()) if not is_shape else range(len(node.inputs))
        args = [None if v is None else self._ints(v) if i in raw and id(v) in self.shape_ranks else self._data(v, where)
                for i, v in enumerate(node.inputs)]
        while args and args[-1] is None:
            args.pop()
        attrs = _attributes(node, where)
        _check_signature(fn, node, args, attrs, where)
        attrs = {k: self._tensor(v, f"{node.name}_{k}") if isinstance(v, torch.Tensor) else v for k, v in attrs.items()}
        call = self._call(fn, tuple(args), attrs, node.name)
        self._outputs(node, call, where)

    def _outputs(self, node: ir.Node, call: torch.fx.Node, where: str) -> None:
        if node.op_type in MULTI_OUTPUT:
            for i, out in enumerate(node.outputs):
                if out is not None:
                    self.env[id(out)] = self.graph.call_function(operator.getitem, (call, i))
            return
        self.env[id(node.outputs[0])] = call
        unused = [o for o in node.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())]
        if unused:
            raise PassError(f"{where}: its output {unused[0].name!r} is read, but the torch lowering computes only "
                            f"the first output of {node.op_type}; remove that use or run the model with --target ort-cpu.")

    def _ints(self, value: ir.Value):
        """A shape value as Python ints: a literal for constants, else the fx node computing it."""
        if id(value) not in self.env:
            self.env[id(value)] = ir.convenience.get_const_tensor(value).numpy().tolist()
        return self.env[id(value)]

    def _data(self, value: ir.Value, where: str) -> torch.fx.Node:
        """``value`` as a tensor (shape values are converted once)."""
        if id(value) in self.shape_ranks:
            if id(value) not in self.as_tensor:
                const = ir.convenience.get_const_tensor(value)
                self.as_tensor[id(value)] = self._tensor(_torch_tensor(const, where), value.name) if const is not None \
                    else self._call(torch_shapes.to_tensor, (self._ints(value), torch_shapes.tensor_dtype(value)), {},
                                    f"{value.name}_tensor")
            return self.as_tensor[id(value)]
        found = self.env.get(id(value))
        if found is not None:
            return found
        if id(value) in self.deferred:
            self.env[id(value)] = self._tensor(self._folded(value, where), value.name or self.deferred[id(value)].name)
            return self.env[id(value)]
        if value.const_value is not None:
            self.env[id(value)] = self._tensor(_torch_tensor(value.const_value, where), value.name)
            return self.env[id(value)]
        raise PassError(f"{where}: value {value.name!r} has no producer, initializer or input; "
                        "the graph is malformed, re-run `carve optimize`.")

    def _foldable(self, node: ir.Node) -> bool:
        return (node.op_type in FOLDED_OPS and node.domain in ("", "ai.onnx") and id(node.outputs[0]) not in self.shape_ranks
                and all(v is None or id(v) in self.deferred or ir.convenience.get_const_tensor(v) is not None
                        for v in node.inputs))

    def _folded(self, value: ir.Value, where: str) -> torch.Tensor:
        """The tensor a deferred node computes from its constant (or deferred) inputs."""
        node = self.deferred[id(value)]
        args = [None if v is None else self._folded(v, where) if id(v) in self.deferred
                else _torch_tensor(ir.convenience.get_const_tensor(v), where) for v in node.inputs]
        fn = torch_ops_quant.dequantize_linear if node.op_type == "DequantizeLinear" else _implementation(node, where)
        return fn(*args, **_attributes(node, where))

    def _constant(self, value: ir.Value, tensor: torch.Tensor, hint: str | None) -> None:
        if id(value) in self.shape_ranks:
            self.env[id(value)] = tensor.tolist()
        else:
            self.env[id(value)] = self._tensor(tensor, hint)

    def _tensor(self, tensor: torch.Tensor, hint: str | None) -> torch.fx.Node:
        name = self._name(f"c_{hint or 'const'}")
        self.root.register_buffer(name, tensor)
        return self.graph.get_attr(name)

    def _call(self, fn, args: tuple, kwargs: dict, hint: str | None) -> torch.fx.Node:
        return self.graph.create_node("call_function", fn, args, kwargs, name=self._name(hint or fn.__name__))

    def _name(self, text: str) -> str:
        base = re.sub(r"\W", "_", text).strip("_") or "v"
        base = f"v_{base}" if base[0].isdigit() else base
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name


def _constant_dequantize(node: ir.Node, deferred: dict) -> bool:
    """A DequantizeLinear of constant weights: the module holds its float result instead of
    recomputing it every call (the same numbers; weights then take float memory)."""
    return node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and all(
        v is None or id(v) in deferred or ir.convenience.get_const_tensor(v) is not None for v in node.inputs)


def _implementation(node: ir.Node, where: str):
    if node.domain not in ("", "ai.onnx"):
        raise PassError(f"{where}: operator {node.domain}.{node.op_type} has no torch implementation (operators of the "
                        f"{node.domain} domain come from ONNX Runtime's lowering); optimize the source model with --target torch.")
    fn = OPS.get(node.op_type)
    if fn is None:
        raise PassError(f"{where}: operator {node.op_type} has no torch implementation in carve; "
                        f"run this graph with --target ort-cpu, or replace the operator.")
    problem = VALIDATORS[node.op_type](_attributes(node, where)) if node.op_type in VALIDATORS else None
    if problem:
        raise PassError(f"{where}: {problem} by the torch lowering; run this graph with --target ort-cpu.")
    return fn


def _attributes(node: ir.Node, where: str) -> dict:
    out = {}
    for name, attr in node.attributes.items():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise PassError(f"{where}: attribute {name!r} holds a subgraph, which the torch lowering does not support.")
        value = attr.value
        if attr.type == ir.AttributeType.TENSOR:
            value = _torch_tensor(value, where)
        elif isinstance(value, (tuple, list)) or attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS,
                                                               ir.AttributeType.STRINGS):
            value = list(value)
        out[name] = value
    return out


def _check_signature(fn, node: ir.Node, args: list, attrs: dict, where: str) -> None:
    try:
        inspect.signature(fn).bind(*args, **attrs)
    except TypeError as exc:
        raise PassError(f"{where}: the torch implementation of {node.op_type} cannot take these inputs/attributes "
                        f"({exc}); run this graph with --target ort-cpu.") from None


def _constant_value(node: ir.Node, where: str) -> torch.Tensor:
    attrs = _attributes(node, where)
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise PassError(f"{where}: Constant with attributes {sorted(attrs)} is not supported by the torch lowering.")


def _torch_tensor(tensor, where: str | None) -> torch.Tensor:
    try:
        return to_torch(tensor)
    except KeyError as exc:
        raise PassError(f"{where or 'initializer'}: {exc.args[0]}; the torch lowering cannot hold it.") from None
