"""ONNX indexing operators as torch functions: gathers, scatters, one-hot, non-zero.

Conventions as in ``optimizer.lower.torch_ops``. ONNX allows negative indices everywhere
(counted from the end of the axis); torch's indexing functions do not, so indices are made
positive first. ``GatherND`` takes ``batch_dims`` (the leading dims data and indices share).
"""

from __future__ import annotations

import torch

from optimizer.lower.torch_ops import align, ints


def _positive(indices, size):
    return torch.where(indices < 0, indices + size, indices)


def gather(x, indices, *, axis=0):
    x, indices = align(x, indices)
    axis %= x.dim()
    flat = _positive(indices.reshape(-1), x.shape[axis])
    out = x.index_select(axis, flat)
    return out.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


def gather_elements(x, indices, *, axis=0):
    x, indices = align(x, indices)
    return torch.gather(x, axis, _positive(indices, x.shape[axis]))


def gather_nd(x, indices, *, batch_dims=0):
    x, indices = align(x, indices)
    lead = x.shape[:batch_dims]
    x = x.reshape(-1, *x.shape[batch_dims:])  # the batch dims as one leading axis (a single 1 when none)
    indices = indices.reshape(-1, *indices.shape[batch_dims:])
    n, depth = x.shape[0], indices.shape[-1]
    rows = torch.arange(n, device=x.device).reshape(n, *[1] * (indices.dim() - 2)).expand(indices.shape[:-1])
    index = (rows,) + tuple(_positive(indices[..., i], x.shape[1 + i]) for i in range(depth))
    out = x[index]
    return out.reshape(*lead, *out.shape[1:]) if batch_dims else out[0]


def scatter_nd(x, indices, updates, *, reduction="none"):
    x, indices, updates = align(x, indices, updates)
    out = x.clone()
    index = tuple(indices[..., i] for i in range(indices.shape[-1]))
    if reduction == "add":
        out.index_put_(index, updates, accumulate=True)
    else:
        out[index] = updates
    return out


def scatter_elements(x, indices, updates, *, axis=0, reduction="none"):
    x, indices, updates = align(x, indices, updates)
    indices = _positive(indices, x.shape[axis])
    if reduction == "none":
        return x.scatter(axis, indices, updates)
    return x.scatter_reduce(axis, indices, updates, reduce={"add": "sum", "mul": "prod"}.get(reduction, reduction))


def one_hot(indices, depth, values, *, axis=-1):
    n = int(ints(depth)[0])
    hot = torch.nn.functional.one_hot(_positive(indices, n).long(), n)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    out = torch.where(hot.bool(), on, off)
    return out.movedim(-1, axis) if axis != -1 else out


def non_zero(x):
    return torch.stack(torch.nonzero(x, as_tuple=True)) if x.dim() else torch.nonzero(x).T


OPS = {
    "Gather": gather, "GatherElements": gather_elements, "GatherND": gather_nd, "ScatterND": scatter_nd,
    "ScatterElements": scatter_elements, "OneHot": one_hot, "NonZero": non_zero,
}
