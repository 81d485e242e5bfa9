"""Small numpy helpers shared by the metrics: input checks, ranks, correlation, cosine."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import CarveError


class MetricInputError(CarveError):
    """Arrays given to a metric have the wrong shape or are empty."""


def as_rows(*arrays: Any) -> np.ndarray | tuple[np.ndarray, ...]:
    """Each array as float64 ``[rows, features]`` (leading axes flattened); shapes must agree."""
    out = []
    for a in arrays:
        x = np.asarray(a, dtype=np.float64)
        if x.ndim < 2 or x.size == 0:
            raise MetricInputError(f"Expected a non-empty [N, D] array, got shape {x.shape}; "
                                   "pass one row per input.")
        out.append(x.reshape(-1, x.shape[-1]))
    if any(x.shape != out[0].shape for x in out):
        raise MetricInputError(f"Arrays of shapes {[np.shape(a) for a in arrays]} cannot be "
                               "compared row by row; pass outputs of the same inputs.")
    return out[0] if len(out) == 1 else tuple(out)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (like scipy's "average")."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ordinal = np.empty(len(x), dtype=np.float64)
    ordinal[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ordinal)
    counts = np.bincount(inverse)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; 1 if both are constant, 0 if only one is."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb == 0 else 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def pairwise_cosine(x: np.ndarray) -> np.ndarray:
    """``[N, N]`` cosine similarities of the rows of ``x`` (zero rows have similarity 0)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T
