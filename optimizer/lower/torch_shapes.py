"""Shape arithmetic of the torch lowering, done on Python ints instead of tensors.

Traced graphs compute dynamic shapes with tensor ops: ``Shape`` of a tensor, ``Gather`` of
one dim, ``Concat`` with constants, ``Reshape`` to the result. Run as tensor ops, every such
chain ends in a ``tolist()`` that stops ``torch.compile`` (a graph break per ``Reshape``) and
costs small tensor launches in eager mode. So the builder classifies values as *shape
values* (``shape_values``): outputs of ``Shape``/``Size``, small integer constants of rank 0
or 1, and the outputs of the integer operators below when all their inputs are shape values.
Those are computed as Python ints and lists of ints (symbolic ints under ``torch.compile``,
which traces them without a break), and handed to operators' shape inputs (``Reshape``'s
target, ``Slice``'s starts...) as they are. Where one feeds a data input, ``to_tensor`` makes
it a tensor once.

Operators on shape values: Shape, Size, Gather, Concat, Slice, Unsqueeze (0-d to 1-d),
Squeeze (to 0-d), Reshape (1-d), Identity, Cast (to an integer type), Add, Sub, Mul, Div
(truncating), Mod, Max, Min, Equal, Less, Greater, LessOrEqual, GreaterOrEqual, Where, Not,
And, Or, Abs, Neg, Range is not one of them: it makes data.
"""

from __future__ import annotations

import operator

import onnx_ir as ir
import torch

from optimizer.lower.torch_dtypes import TORCH_DTYPES

_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32}
_HOST_LIMIT = 64


def _map(fn):
    """Elementwise on ints or lists of ints, broadcasting a scalar (or a 1-list) against a list."""

    def op(*xs):
        lists = [x for x in xs if isinstance(x, list)]
        if not lists:
            return fn(*xs)
        n = max(len(x) for x in lists)
        cols = [x * n if isinstance(x, list) and len(x) == 1 else (x if isinstance(x, list) else [x] * n) for x in xs]
        return [fn(*row) for row in zip(*cols)]

    op.__name__ = f"shape_{fn.__name__}"
    return op


def _div(a, b):
    return a // b if (a >= 0) == (b >= 0) else -((-a) // b)  # ONNX integer division truncates


def _mod(a, b):
    return a % b


def _where(c, a, b):
    return a if c else b


def shape(x, *, start=0, end=None):
    dims = [len(x)] if isinstance(x, list) else ([] if isinstance(x, int) else list(x.shape))
    return dims[start:end]


def size(x):
    return x.numel() if isinstance(x, torch.Tensor) else (len(x) if isinstance(x, list) else 1)


def gather(x, indices, *, axis=0):
    n = len(x)
    if isinstance(indices, list):
        return [x[i + n if i < 0 else i] for i in indices]
    return x[indices + n if indices < 0 else indices]


def concat(*xs, axis=0):
    return [v for x in xs for v in (x if isinstance(x, list) else [x])]


def slice_(x, starts, ends, axes=None, steps=None):
    step = steps[0] if steps else 1
    return x[slice(starts[0], ends[0], step)]


def unsqueeze(x, axes=None):
    return [x]


def squeeze(x, axes=None):
    return x[0]


def reshape(x, target, *, allowzero=0):
    return x if isinstance(x, list) else [x]


def identity(x, **_):
    return x


def cast(x, *, to, saturate=1, round_mode="up"):
    return x


def to_tensor(value, dtype: int) -> torch.Tensor:
    return torch.tensor(value, dtype=TORCH_DTYPES[dtype])


SHAPE_OPS = {
    "Shape": shape, "Size": size, "Gather": gather, "Concat": concat, "Slice": slice_, "Unsqueeze": unsqueeze,
    "Squeeze": squeeze, "Reshape": reshape, "Identity": identity, "Cast": cast,
    "Add": _map(operator.add), "Sub": _map(operator.sub), "Mul": _map(operator.mul), "Div": _map(_div),
    "Mod": _map(_mod), "Max": _map(max), "Min": _map(min), "Equal": _map(operator.eq), "Less": _map(operator.lt),
    "Greater": _map(operator.gt), "LessOrEqual": _map(operator.le), "GreaterOrEqual": _map(operator.ge),
    "Where": _map(_where), "Not": _map(operator.not_), "And": _map(operator.and_), "Or": _map(operator.or_),
    "Abs": _map(abs), "Neg": _map(operator.neg),
}
_BOOL_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or"}

# Inputs that operators read as lists of ints (shapes, axes, starts...): shape values pass as they are.
SHAPE_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1}, "Tile": {1},
    "ConstantOfShape": {0}, "Pad": {1, 3}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL2": {1}, "ReduceL1": {1}, "ReduceSumSquare": {1}, "ReduceLogSumExp": {1},
    "TopK": {1}, "Split": {1}, "CumSum": {1}, "Trilu": {1}, "Resize": {3}, "Range": {0, 1, 2}, "OneHot": {1},
}


def shape_values(graph: ir.Graph) -> dict[int, int]:
    """id(value) -> rank (0 or 1) for every value of ``graph`` the module computes as Python ints."""
    ranks: dict[int, int] = {}
    for value in graph.initializers.values():
        _constant(value, value.const_value, ranks)
    for node in graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            _constant(node.outputs[0], node.attributes["value"].value, ranks)
            continue
        rank = _rank(node, ranks)
        if rank is not None and len(node.outputs) == 1:
            ranks[id(node.outputs[0])] = rank
    return ranks


def _constant(value: ir.Value, tensor, ranks: dict[int, int]) -> None:
    if tensor is not None and tensor.dtype in _INT_TYPES and len(tensor.shape) <= 1 and tensor.size <= _HOST_LIMIT:
        ranks[id(value)] = len(tensor.shape)


def _rank(node: ir.Node, ranks: dict[int, int]) -> int | None:
    """The output's rank if ``node`` computes a shape value, else None."""
    op = node.op_type
    if op not in SHAPE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    if op in ("Shape", "Size"):
        return 1 if op == "Shape" else 0
    inputs = [v for v in node.inputs if v is not None]
    if not inputs or any(id(v) not in ranks for v in inputs):
        return None
    in_ranks = [ranks[id(v)] for v in inputs]
    if op == "Cast" and node.attributes["to"].value not in _INT_TYPES:
        return None
    if op == "Gather":
        return in_ranks[1] if in_ranks[0] == 1 else None
    if op == "Unsqueeze":
        return 1 if in_ranks[0] == 0 else None
    if op == "Squeeze":
        return 0 if in_ranks[0] == 1 else None
    if op in ("Concat", "Slice", "Reshape"):
        return 1 if in_ranks[0] == 1 or op != "Slice" else None
    return max(in_ranks)


def tensor_dtype(value: ir.Value) -> int:
    """The ONNX element type code a shape value becomes when a data input reads it."""
    if value.dtype is not None:
        return int(value.dtype)
    producer = value.producer()
    return int(ir.DataType.BOOL if producer is not None and producer.op_type in _BOOL_OPS else ir.DataType.INT64)
