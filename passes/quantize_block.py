"""Weight-only formats of the quantize pass: bits, blocks, clipping and the activation-aware search.

A format is ``Format(bits, block)``: ``bits`` 8 or 4; ``block`` 0 is one scale per output
channel (per column of a ``[K, N]`` MatMul weight), ``B`` (32, 64 or 128) is one scale per
``B`` consecutive input rows of each column (blocks along K; the last block is shorter when B
does not divide K, as ONNX ``DequantizeLinear`` with ``block_size`` reads it). Symmetric, zero
point 0, round to nearest: int8 in [-127, 127]; int4 in [-8, 7] with the step absmax / 7, so
both signs of the block's largest value are representable and -8 is reached only after clipping
shrinks the step. ``Format(4, block, sym=False)`` is asymmetric instead: q in 0..15 with a step
and a float offset per scale (``passes.quantize_asym``). Cases handled:

- ``quantize(w, fmt, ratio)``: ``(q, scale, offset)``: the integers (held as int8; uint8 in
  0..15 when asymmetric), the scales, ``[N]`` per channel or ``[ceil(K/B), N]`` per block, and
  the offsets (None when symmetric); ``ratio`` (scalar or one per scale) shrinks the step below
  absmax / qmax, clipping the largest values (asymmetric: one ratio, the range shrunk toward
  its centre); all-zero blocks get scale 1;
- ``quantize_clipped(w, fmt, importance, clip)``: ``quantize`` with the clipping search below,
  or for asymmetric formats ``passes.quantize_asym``'s search (clipping ratios and exact grids);
- ``clip_ratios(w, fmt, importance)``: per scale, the ratio of ``CLIP_RATIOS`` with the least
  squared weight error weighted by ``importance`` (the calibrated mean x^2 of each input
  channel: the diagonal of the output error; uniform without calibration);
- ``awq_alpha(sample, mean_abs, w, fmt, min_gain)``: AWQ-style per-input-channel factors
  s = mean|x|^alpha (normalised around 1); the alpha of ``AWQ_ALPHAS`` with the smallest
  relative output error ``|x w - (x / s) Q(w s)|`` on the calibration rows, kept only if it
  lowers the error by ``min_gain`` (a fraction) against no scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes import quantize_asym as asym
from runtime.errors import PassError

BLOCKS = (0, 32, 64, 128)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
AWQ_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class Format:
    bits: int = 8
    block: int = 0
    sym: bool = True  # False: asymmetric int4, q in 0..15 with a float offset per scale

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7 if self.sym else asym.LEVELS

    @property
    def qmin(self) -> int:
        return -127 if self.bits == 8 else -8 if self.sym else 0

    def describe(self) -> str:
        kind = f"int{self.bits} " if self.sym else f"uint{self.bits} asymmetric "
        return kind + (f"blocks of {self.block}" if self.block else "per channel")


def check_block(block: int) -> None:
    if block not in BLOCKS:
        raise PassError(f"quantize has no block size {block}; block takes 0 (per channel) or 32, 64, 128 "
                        "(input rows per scale).")


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` [K, N] as [nb, B, N] (zero-padded at the end of K), or [1, K, N] per channel."""
    k = w.shape[0]
    if not block:
        return w[None]
    nb = -(-k // block)
    padded = np.zeros((nb * block, w.shape[1]), np.float32)
    padded[:k] = w
    return padded.reshape(nb, block, w.shape[1])


def quantize(w: np.ndarray, fmt: Format, ratio=1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q [K, N], scale [N] or [nb, N], offset or None) of ``w`` [K, N]; see the module docstring."""
    w = np.asarray(w, np.float32)
    if not fmt.sym:
        return asym.quantize(w, fmt.block, ratios=(float(ratio),))
    blocks = _blocks(w, fmt.block)
    peak = np.abs(blocks).max(axis=1)  # [nb, N]
    scale = np.where(peak > 0, peak * np.asarray(ratio, np.float32) / fmt.qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), fmt.qmin, fmt.qmax).astype(np.int8)
    q = q.reshape(-1, w.shape[1])[: w.shape[0]]
    return q, (scale if fmt.block else scale[0]), None


def dequantize(q: np.ndarray, scale: np.ndarray, fmt: Format, offset: np.ndarray | None = None) -> np.ndarray:
    if offset is not None:
        return asym.dequantize(q, scale, offset, fmt.block)
    if not fmt.block:
        return q.astype(np.float32) * scale
    return q.astype(np.float32) * np.repeat(scale, fmt.block, axis=0)[: q.shape[0]]


def clip_ratios(w: np.ndarray, fmt: Format, importance: np.ndarray | None = None) -> np.ndarray:
    """Per scale ([N] or [nb, N]), the clipping ratio with the least importance-weighted error."""
    w = np.asarray(w, np.float32)
    weight = np.ones(w.shape[0], np.float32) if importance is None else np.asarray(importance, np.float32)
    weight = _blocks(np.broadcast_to(weight[:, None], w.shape).astype(np.float32), fmt.block)
    blocks = _blocks(w, fmt.block)
    best_err, best = None, None
    for r in CLIP_RATIOS:
        q, scale, _ = quantize(w, fmt, r)
        err = (weight * (blocks - _blocks(dequantize(q, scale, fmt), fmt.block)) ** 2).sum(axis=1)  # [nb, N]
        if best_err is None:
            best_err, best = err, np.full(err.shape, r, np.float32)
        else:
            better = err < best_err
            best_err, best = np.where(better, err, best_err), np.where(better, r, best)
    return best if fmt.block else best[0]


def quantize_clipped(w: np.ndarray, fmt: Format, importance: np.ndarray | None, clip: bool):
    """``quantize`` with the searched clipping ratios (``clip``) or none; asymmetric formats
    search clipping ratios and exact grids block by block (``passes.quantize_asym``)."""
    if not fmt.sym:
        return asym.quantize(w, fmt.block, importance, CLIP_RATIOS if clip else (1.0,), gap_search=True)
    return quantize(w, fmt, clip_ratios(w, fmt, importance) if clip else 1.0)


def output_error(x: np.ndarray, w: np.ndarray, fmt: Format, exact: np.ndarray | None = None) -> float:
    """Relative Frobenius error of ``x @ w`` with ``w`` quantized to ``fmt`` (round to nearest)."""
    exact = x @ w if exact is None else exact
    q, scale, offset = quantize(w, fmt)
    approx = x @ dequantize(q, scale, fmt, offset)
    return float(np.linalg.norm(approx - exact)) / (float(np.linalg.norm(exact)) or 1.0)


def awq_factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x|^alpha, normalised so that its geometric middle is 1 (divide x, multiply w rows)."""
    s = np.maximum(np.asarray(mean_abs, np.float32), 1e-8) ** alpha
    return np.clip(s / np.sqrt(s.max() * s.min()), 1e-3, 1e3).astype(np.float32)


def awq_alpha(sample: np.ndarray, mean_abs: np.ndarray, w: np.ndarray, fmt: Format,
              min_gain: float) -> tuple[float, float, float]:
    """(alpha, error with it, error without scaling); alpha 0 unless it gains ``min_gain``."""
    sample = np.asarray(sample, np.float32)
    exact = sample @ w
    base = output_error(sample, w, fmt, exact)
    best = (0.0, base, base)
    for alpha in AWQ_ALPHAS[1:]:
        s = awq_factors(mean_abs, alpha)
        err = output_error(sample / s, w * s[:, None], fmt, exact)
        if err < base * (1.0 - min_gain) and err < best[1]:
            best = (alpha, err, base)
    return best
