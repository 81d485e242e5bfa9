"""The numbers behind the quantize pass: weight scales, SmoothQuant factors, simulated error.

- ``quantize_weight``: symmetric int8 (zero point 0, range [-127, 127]) per output channel
  (one scale per column of a ``[K, N]`` MatMul weight) or per tensor; all-zero columns get
  scale 1 so that dequantizing never divides by zero.
- ``smooth_factors``: SmoothQuant's per-input-channel s_j = max|X_j|^a / max|W_j|^(1-a),
  divided by their median and floored at 1, so only channels above the typical one are
  scaled down and no channel is ever amplified: a channel that was near zero on the
  calibration data (a Gelu output that rarely fires) would otherwise be multiplied up and, on
  new data, set the whole tensor's dynamic range (measured: MiniLM's cosine fell to 0.82).
  Channels that are zero on either side get s_j = 1; factors are capped at 1e3.
- ``activation_error``: how far ``x @ w`` moves when x is quantized the way a mode quantizes
  it at run time (dynamic: per-tensor asymmetric uint8 from the tensor's own min and max, as
  ONNX ``DynamicQuantizeLinear`` does; static: per-tensor symmetric int8 with a fixed scale)
  and w per channel; relative Frobenius error on sample rows.
- ``best_alpha``: the migration strength from a grid with the smallest such error; 0 (no
  smoothing) wins unless the error drops by ``min_gain`` (a fraction), so smoothing is only
  added where it measurably helps.
"""

from __future__ import annotations

import numpy as np

QMAX = 127
ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9)
# Smoothing must cut the simulated error by at least this fraction to be worth its extra work.
MIN_GAIN = 0.05


def quantize_weight(w: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [K, N] float -> (int8 [K, N], float32 scales [N] or scalar [])."""
    w = np.asarray(w, dtype=np.float32)
    peak = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max(), np.float32)
    scale = np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def smooth_factors(x_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel factors s (divide x by s, multiply w's rows by s)."""
    w_absmax = np.abs(np.asarray(w, np.float32)).max(axis=1)
    x_absmax = np.asarray(x_absmax, np.float32)
    usable = (x_absmax > 0) & (w_absmax > 0)
    safe_x, safe_w = np.where(usable, x_absmax, 1.0), np.where(usable, w_absmax, 1.0)
    s = np.where(usable, safe_x ** alpha / safe_w ** (1.0 - alpha), 1.0)
    typical = float(np.median(s[usable])) if usable.any() else 1.0
    return np.clip(s / typical, 1.0, 1e3).astype(np.float32)


def fake_dynamic(x: np.ndarray) -> np.ndarray:
    """x after ``DynamicQuantizeLinear`` and back: uint8 over [min(x, 0), max(x, 0)]."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0 or 1.0)
    zero = np.float32(np.clip(np.rint(-lo / scale), 0, 255))
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def fake_static(x: np.ndarray, scale: float) -> np.ndarray:
    """x after symmetric int8 ``QuantizeLinear`` with ``scale`` and back."""
    scale = np.float32(scale)
    return np.clip(np.rint(x / scale), -QMAX - 1, QMAX) * scale


def activation_error(x: np.ndarray, w: np.ndarray, mode: str, per_channel: bool = True,
                     act_scale: float | None = None, exact: np.ndarray | None = None) -> float:
    """Relative error of ``x @ w`` (or ``exact``) with int8 weights and x quantized as ``mode`` does."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    exact = x @ w if exact is None else exact
    wq = dequantize_weight(*quantize_weight(w, per_channel))
    if mode == "dynamic":
        xq = fake_dynamic(x)
    elif mode == "w8a8":
        xq = fake_static(x, act_scale if act_scale else float(np.abs(x).max()) / QMAX or 1.0)
    else:
        xq = x
    denom = float(np.linalg.norm(exact)) or 1.0
    return float(np.linalg.norm(xq @ wq - exact)) / denom


def best_alpha(sample: np.ndarray, x_absmax: np.ndarray, w: np.ndarray, mode: str,
               per_channel: bool = True, alphas=ALPHAS, min_gain: float = MIN_GAIN) -> tuple[float, float, float]:
    """(alpha, error with it, error without smoothing) for one weight read by ``sample`` rows."""
    exact = np.asarray(sample, np.float32) @ np.asarray(w, np.float32)
    base = activation_error(sample, w, mode, per_channel, exact=exact)
    best, best_err = 0.0, base
    for alpha in alphas:
        if alpha == 0.0:
            continue
        s = smooth_factors(x_absmax, w, alpha)
        err = activation_error(sample / s, w * s[:, None], mode, per_channel, exact=exact)
        if err < best_err:
            best, best_err = alpha, err
    if best_err > base * (1.0 - min_gain):
        return 0.0, base, base
    return best, best_err, base
