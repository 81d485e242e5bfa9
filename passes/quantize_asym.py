"""Asymmetric (affine) int4 weights: per block a step d and a float offset m, w ~ m + d q, q in 0..15.

The layout is ``passes.quantize_block``'s (blocks of B input rows of each output column of a
``[K, N]`` weight, or one block spanning K per column); what changes is the grid. A symmetric
grid is centred on zero; this one starts at the block's own low end, so 16 levels cover a
block whose values are not centred (Q4_1 in GGUF files stores weights this way: d and m in
float16 per block of 32). Cases handled:

- **float16 step and offset**, as Q4_1 stores them: d and m are rounded to float16 before q is
  chosen, so the grid searched is the grid stored. A tensor whose steps leave float16's normal
  range (a block narrower than 15 x 2^-14, or values beyond 65504) keeps float32 ones; the
  returned arrays' dtype says which;
- **candidates per block**: min-max (the lowest value at q = 0, the highest at q = 15), the same
  range shrunk toward its centre by each clipping ratio asked for, and, when searching, grids
  whose step is the smallest gap between the block's distinct values or its half or third (a
  block already on a 16-level grid that does not reach both ends of it: min-max would put a
  finer, wrong grid through it), moved down by whole steps to the offset float16 stores best;
- **each candidate refined**: q rounded on its grid, then (d, m) refitted by least squares for
  those q (weighted by each input row's importance, the calibrated mean x^2), then q rounded
  again: each step can only lower the block's weighted error, and values already on a grid
  come back exactly. The candidate with the least weighted error wins, block by block;
- **constant blocks** (and the rows padding a short last block, which repeat its last row and
  weigh nothing): d = 1, q = 0, m the value;
- memory stays bounded: columns are processed in chunks (a tied [49152, 576] table is 28 M values).
"""

from __future__ import annotations

import numpy as np

LEVELS = 15  # q in 0..15
FP16_MIN_STEP = 2.0 ** -14  # float16's smallest normal number
FP16_MAX = 65504.0
CHUNK = 4096  # output columns per chunk
GAP_PARTS = (1, 2, 3)  # the grid step tried: the smallest gap, its half, its third


def quantize(w: np.ndarray, block: int, importance: np.ndarray | None = None, ratios=(1.0,),
             gap_search: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [K, N] in 0..15, step, offset), steps/offsets [ceil(K/B), N] or [N] (block 0)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    rows = block or k
    weight = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    half = _fits_float16(w, rows)
    q = np.zeros((k, n), np.uint8)
    nb = -(-k // rows)
    step, offset = np.zeros((nb, n), np.float32), np.zeros((nb, n), np.float32)
    for start in range(0, n, CHUNK):
        cols = slice(start, min(start + CHUNK, n))
        q[:, cols], step[:, cols], offset[:, cols] = _quantize_chunk(w[:, cols], rows, weight, ratios, gap_search, half)
    dtype = np.float16 if half else np.float32
    step, offset = step.astype(dtype), offset.astype(dtype)
    return (q, step, offset) if block else (q, step[0], offset[0])


def dequantize(q: np.ndarray, step: np.ndarray, offset: np.ndarray, block: int) -> np.ndarray:
    """m + d q in float32, ``step``/``offset`` per block of ``block`` rows (or per column)."""
    step, offset = np.asarray(step, np.float32), np.asarray(offset, np.float32)
    if block:
        step = np.repeat(step, block, axis=0)[: q.shape[0]]
        offset = np.repeat(offset, block, axis=0)[: q.shape[0]]
    return q.astype(np.float32) * step + offset


def _fits_float16(w: np.ndarray, rows: int) -> bool:
    """Whether every non-constant block's min-max step and every value fit float16's normal range."""
    blocks = _edge_blocks(w, rows)
    spread = blocks.max(axis=1) - blocks.min(axis=1)
    steps = spread[spread > 0] / LEVELS
    return bool(np.abs(w).max(initial=0.0) < FP16_MAX / 2 and (steps.size == 0 or steps.min() >= FP16_MIN_STEP))


def _edge_blocks(w: np.ndarray, rows: int) -> np.ndarray:
    """``w`` [K, N] as [nb, rows, N], a short last block padded by repeating its last row."""
    k, n = w.shape
    nb = -(-k // rows)
    if nb * rows != k:
        w = np.concatenate([w, np.repeat(w[-1:], nb * rows - k, axis=0)])
    return w.reshape(nb, rows, n)


def _quantize_chunk(w, rows, importance, ratios, gap_search, half):
    blocks = _edge_blocks(w, rows)
    k = w.shape[0]
    weight = np.zeros(blocks.shape[0] * rows, np.float32)
    weight[:k] = importance
    weight = weight.reshape(-1, rows, 1)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    candidates = [_shrunk(lo, hi, r) for r in ratios]
    if gap_search:
        candidates += [_gap_grid(blocks, lo, hi, half, parts) for parts in GAP_PARTS]
    best = None
    for step, offset in candidates:
        q, step, offset = _refine(blocks, weight, step, offset, half)
        err = (weight * (blocks - (offset[:, None] + step[:, None] * q)) ** 2).sum(axis=1)
        if best is None:
            best = [err, q, step, offset]
            continue
        better = err < best[0]
        best = [np.where(better, err, best[0]), np.where(better[:, None], q, best[1]),
                np.where(better, step, best[2]), np.where(better, offset, best[3])]
    q = best[1].reshape(-1, w.shape[1])[:k].astype(np.uint8)
    return q, best[2], best[3]


def _shrunk(lo: np.ndarray, hi: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Min-max grid of the range shrunk toward its centre by ``ratio`` (1: plain min-max)."""
    centre, half_range = (hi + lo) / 2, (hi - lo) / 2 * ratio
    return 2 * half_range / LEVELS, centre - half_range


def _gap_grid(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, half: bool,
              parts: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid of the smallest gap between distinct values (values a hair apart count as one)
    divided by ``parts`` (few values in a block may use no two neighbouring levels), widened to
    min-max when 16 levels of that step would not reach the block's highest value.
    Its lowest level need not be the grid's first: with float16 offsets, the grid is moved down
    by the whole steps that make its offset closest to a float16 number (the stored one)."""
    gaps = np.diff(np.sort(blocks, axis=1), axis=1)
    tiny = 1e-4 * (hi - lo)[:, None]
    smallest = np.where(gaps > tiny, gaps, np.inf).min(axis=1)
    step = np.maximum(np.where(np.isfinite(smallest), smallest / parts, 0.0), (hi - lo) / LEVELS)
    if not half:
        return step, lo
    spare = LEVELS - np.rint((hi - lo) / np.where(step > 0, step, 1.0))  # levels free below the lowest value
    shifts = np.arange(LEVELS + 1, dtype=np.float32)[:, None, None]
    offsets = lo[None] - shifts * step[None]
    miss = np.abs(offsets.astype(np.float16).astype(np.float32) - offsets)
    miss = np.where(shifts <= spare[None], miss, np.inf)
    return step, np.take_along_axis(offsets, miss.argmin(axis=0)[None], axis=0)[0]


def _refine(blocks, weight, step, offset, half):
    """Round q on the grid, refit (d, m) by weighted least squares for those q, round q again."""
    step, offset = _stored(step, offset, half)
    q = _round(blocks, step, offset)
    step, offset = _stored(*_least_squares(blocks, weight, q, step, offset), half)
    return _round(blocks, step, offset), step, offset


def _stored(step: np.ndarray, offset: np.ndarray, half: bool) -> tuple[np.ndarray, np.ndarray]:
    """The step and offset as they will be stored (float16 when ``half``); constant blocks get d = 1."""
    step = np.where(step > 0, step, 1.0).astype(np.float32)
    if half:
        step = np.maximum(step.astype(np.float16), np.float16(FP16_MIN_STEP)).astype(np.float32)
        offset = offset.astype(np.float16)
    return step, offset.astype(np.float32)


def _round(blocks: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((blocks - offset[:, None]) / step[:, None]), 0, LEVELS)


def _least_squares(blocks, weight, q, step, offset):
    """Per block, the (d > 0, m) minimising sum weight (w - m - d q)^2 for fixed q; blocks where
    that is undetermined (one level used, no weight) keep their step and refit only the offset."""
    s = weight.sum(axis=1)
    sq, sy = (weight * q).sum(axis=1), (weight * blocks).sum(axis=1)
    sqq, sqy = (weight * q * q).sum(axis=1), (weight * q * blocks).sum(axis=1)
    det = s * sqq - sq * sq
    with np.errstate(divide="ignore", invalid="ignore"):
        fitted = (s * sqy - sq * sy) / det
        ok = (det > 1e-6 * np.maximum(s * s, 1e-30)) & (fitted > 0)
        new_step = np.where(ok, fitted, step)
        new_offset = np.where(s > 0, (sy - new_step * sq) / s, offset)
    return new_step, new_offset
