"""ONNX operators as torch functions: elementwise, logic, and tensor-shape operators.

Every function takes the node's inputs positionally (``None`` for an omitted optional input)
and its attributes as keywords with the ONNX defaults, and returns a tensor (or a tuple for
operators registered with several outputs). ``OPS`` maps ONNX op types (default domain) to
them; ``torch_ops_index``, ``torch_ops_nn`` and ``torch_ops_quant`` add the rest.

Shapes are computed at run time, so one module serves every batch and sequence length.
Shape arithmetic runs on Python ints (``optimizer.lower.torch_shapes``); inputs that ONNX
defines as shapes, axes or index lists (``Reshape``'s target, ``Slice``'s starts...) are read
with ``ints``, which takes those ints or a tensor. ``align`` moves a CPU operand (a shape
value made a tensor) to the other operand's device where an operator mixes the two.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch

from optimizer.lower.torch_dtypes import TORCH_DTYPES


def ints(value) -> list[int]:
    """An ONNX shape/axes/indices input (tensor, list, int, or None) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return list(value)  # shape values: ints, or symbolic ints under torch.compile (never int()-ed)
    return [value]


def align(*tensors):
    """Move CPU operands to the device of the first non-CPU one (0-d tensors need no move)."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "cpu"), None)
    if device is None:
        return tensors
    return tuple(t.to(device) if isinstance(t, torch.Tensor) and t.device != device and t.dim() > 0 else t
                 for t in tensors)


def _binary(fn):
    def op(a, b):
        return fn(*align(a, b))

    op.__name__ = f"onnx_{fn.__name__}"
    return op


def div(a, b):
    a, b = align(a, b)
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


def pow_(a, b):
    a, b = align(a, b)
    return torch.pow(a, b).to(a.dtype)  # ONNX: the result has the base's type


def mod(a, b, *, fmod=0):
    a, b = align(a, b)
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def variadic(fn):
    def op(*xs):
        return reduce(fn, align(*xs))

    op.__name__ = f"onnx_variadic_{fn.__name__}"
    return op


def mean(*xs):
    return variadic(torch.add)(*xs) / len(xs)


def where(cond, a, b):
    cond, a, b = align(cond, a, b)
    return torch.where(cond, a, b)


def clip(x, low=None, high=None):
    if low is not None:
        x = torch.maximum(x, low.to(x.device, x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.device, x.dtype))
    return x


def cast(x, *, to, saturate=1, round_mode="up"):
    return x.to(TORCH_DTYPES[to])


def cast_like(x, like, *, saturate=1, round_mode="up"):
    return x.to(like.dtype)


def identity(x):
    return x


def shape(x, *, start=0, end=None):
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def size(x):
    return torch.tensor(x.numel(), dtype=torch.int64)


def reshape(x, target, *, allowzero=0):
    dims = ints(target)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def expand(x, target):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(target))))


def flatten(x, *, axis=1):
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(reduce(operator.mul, x.shape[:axis], 1), -1)


def transpose(x, *, perm=None):
    return x.permute(*(perm if perm is not None else range(x.dim() - 1, -1, -1)))


def squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in ints(axes))) if ints(axes) else x.squeeze()


def unsqueeze(x, axes):
    rank = x.dim() + len(ints(axes))
    for axis in sorted(a % rank for a in ints(axes)):
        x = x.unsqueeze(axis)
    return x


def concat(*xs, axis):
    return torch.cat(align(*xs), dim=axis)


def split(x, sizes=None, *, axis=0, num_outputs=None):
    if sizes is not None and ints(sizes):
        return tuple(torch.split(x, ints(sizes), dim=axis))
    parts = num_outputs or 1
    chunk = -(-x.shape[axis] // parts)  # ONNX: equal parts, the last one smaller
    return tuple(torch.split(x, chunk, dim=axis))


def slice_(x, starts, ends, axes=None, steps=None):
    axes_list = ints(axes) if axes is not None else list(range(len(ints(starts))))
    steps_list = ints(steps) if steps is not None else [1] * len(axes_list)
    for start, end, axis, step in zip(ints(starts), ints(ends), axes_list, steps_list):
        axis %= x.dim()
        first, stop, stride = slice(start, end, step).indices(x.shape[axis])  # ONNX clamps as Python does
        if stride > 0:
            x = x.narrow(axis, first, max(0, stop - first))
            x = x[(slice(None),) * axis + (slice(None, None, stride),)] if stride > 1 else x
        else:
            index = torch.arange(first, stop, stride, device=x.device)
            x = x.index_select(axis, index)
    return x








def tile(x, repeats):
    return x.repeat(*ints(repeats))


def range_(start, limit, delta):
    if not isinstance(start, torch.Tensor):  # shape values: Python ints
        return torch.arange(start, limit, delta, dtype=torch.int64)
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in (start, limit, delta)]
    return torch.arange(*values, dtype=start.dtype)


def constant_of_shape(target, *, value=None):
    fill = value if value is not None else torch.zeros(1, dtype=torch.float32)
    return torch.full(ints(target), fill.reshape(-1)[0].item(), dtype=fill.dtype)


def trilu(x, k=None, *, upper=1):
    diagonal = ints(k)[0] if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


def cumsum(x, axis, *, exclusive=0, reverse=0):
    dim = ints(axis)[0]
    if reverse:
        x = x.flip(dim)
    out = torch.cumsum(x, dim)
    if exclusive:
        out = out - x
    return out.flip(dim) if reverse else out


def pad(x, pads, value=None, axes=None, *, mode="constant"):
    amounts = ints(pads)
    axes_list = [a % x.dim() for a in ints(axes)] if axes is not None else list(range(x.dim()))
    n = len(axes_list)
    by_axis = {axis: (amounts[i], amounts[i + n]) for i, axis in enumerate(axes_list)}
    torch_pads = []
    for axis in range(x.dim() - 1, -1, -1):  # torch lists pads from the last axis backwards
        torch_pads.extend(by_axis.get(axis, (0, 0)))
    fill = value.item() if value is not None and value.numel() else 0
    mode = {"edge": "replicate"}.get(mode, mode)
    if mode == "constant":
        return torch.nn.functional.pad(x, torch_pads, value=fill)
    return torch.nn.functional.pad(x, torch_pads, mode=mode)




def _unary(fn):
    def op(x):
        return fn(x)

    op.__name__ = f"onnx_{fn.__name__}"
    return op


UNARY = {name: _unary(fn) for name, fn in {
    "Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Exp": torch.exp,
    "Log": torch.log, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Tanh": torch.tanh, "Atan": torch.atan,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sign": torch.sign, "IsNaN": torch.isnan, "Not": torch.logical_not,
    "Softplus": torch.nn.functional.softplus, "Mish": torch.nn.functional.mish,
    "HardSwish": torch.nn.functional.hardswish,
}.items()}

OPS = {
    **UNARY,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": div, "Pow": pow_,
    "Mod": mod, "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Max": variadic(torch.maximum), "Min": variadic(torch.minimum), "Sum": variadic(torch.add), "Mean": mean,
    "Where": where, "Clip": clip, "Cast": cast, "CastLike": cast_like, "Identity": identity,
    "Shape": shape, "Size": size, "Reshape": reshape, "Expand": expand, "Flatten": flatten,
    "Transpose": transpose, "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Concat": concat, "Split": split,
    "Slice": slice_, "Tile": tile, "Range": range_, "ConstantOfShape": constant_of_shape, "Trilu": trilu,
    "CumSum": cumsum, "Pad": pad,
}

# Operators whose function returns a tuple, one entry per ONNX output.
MULTI_OUTPUT = {"Split"}
