"""GPTQ-style error compensation for weight-only formats (option ``gptq``).

Round to nearest quantizes every weight on its own. GPTQ (Frantar et al., 2022) quantizes the
input rows of a ``[K, N]`` weight one at a time and spreads each row's rounding error over the
rows not yet quantized, weighted by the inverse of the calibration Hessian ``H = X^T X`` (X: the
layer's input rows), which minimises ``|X W - X Q(W)|`` far better than rounding alone. This
module follows the published algorithm:

- ``H`` is damped by ``DAMP`` x its mean diagonal (few calibration rows leave it singular);
  input channels never seen (zero diagonal) get weight rows of 0;
- the upper Cholesky factor ``U`` of ``H^-1`` gives, for row i, the error scale ``U[i, i]`` and
  the update direction ``U[i, i+1:]``; updates are applied lazily per ``LAZY`` rows;
- block scales (block B) are fixed when the first row of a block is reached, from the weights
  as updated so far, with the same clipping search as round to nearest (per column of the
  block; importance = H's diagonal); per-channel scales (block 0) are fixed up front.

The result has the same format as ``passes.quantize_block.quantize``: (q int8 [K, N], scale).
"""

from __future__ import annotations

import numpy as np

from passes.quantize_block import Format, clip_ratios, quantize

DAMP = 0.01
LAZY = 128


def inverse_factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of the damped H^-1, mask of the dead input channels)."""
    h = np.array(gram, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += np.eye(len(h)) * DAMP * float(np.mean(np.diag(h)))
    inverse = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, with H = L L^T
    return np.linalg.cholesky(inverse.T @ inverse).T, dead


def gptq(w: np.ndarray, gram: np.ndarray, fmt: Format, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` [K, N] for inputs whose x^T x is ``gram`` [K, K] (module docstring)."""
    w = np.array(w, np.float32)
    k, n = w.shape
    u, dead = inverse_factor(gram)
    u = u.astype(np.float32)
    w[dead] = 0.0
    importance = np.diag(gram).astype(np.float32)
    q = np.zeros((k, n), np.int8)
    step = fmt.block or k
    scales = np.zeros((-(-k // step), n), np.float32)
    if not fmt.block:
        scales[0] = quantize(w.astype(np.float32), fmt, _ratios(w, fmt, importance, clip))[1]
    for start in range(0, k, LAZY):
        end = min(start + LAZY, k)
        errors = np.zeros((end - start, n), np.float32)
        for i in range(start, end):
            if fmt.block and i % fmt.block == 0:
                rows = slice(i, min(i + fmt.block, k))
                scales[i // fmt.block] = quantize(w[rows].astype(np.float32), Format(fmt.bits, 0),
                                                  _ratios(w[rows], fmt, importance[rows], clip))[1]
            scale = scales[i // step]
            q[i] = np.clip(np.rint(w[i] / scale), fmt.qmin, fmt.qmax)
            err = (w[i] - q[i] * scale) / u[i, i]
            w[i + 1:end] -= np.outer(u[i, i + 1:end], err)
            errors[i - start] = err
        w[end:] -= u[start:end, end:].T @ errors
    return q, (scales if fmt.block else scales[0])


def _ratios(w: np.ndarray, fmt: Format, importance: np.ndarray, clip: bool):
    return clip_ratios(w.astype(np.float32), Format(fmt.bits, 0), importance) if clip else 1.0
