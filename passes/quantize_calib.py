"""Where the quantize pass's calibration data comes from, and when it is needed.

``statistics(model, ctx, opts, names)`` returns the calibration statistics of the values
``names`` (``optimizer.calibrate.collect``), a note saying where the data came from, and the
batches (for the budget and KV steps), or no statistics when nothing needs them: the modes'
accuracy aids (smoothing, outlier channels, clipping) want them when data is at hand; ``w8a8``,
``budget`` and ``kv`` cannot work without.

Sources (``calib``): ``auto`` uses ``ctx.calibration`` when the caller set it (a built-in name
or spec, or feeds), else the example inputs the model came with (``w8a8`` refuses those: static
scales from a few random rows do not carry over to real data); a built-in model name uses that
model's calibration split; ``example`` forces the example inputs; ``none`` turns the aids off.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizer.pipeline import PassContext
from passes import quantize_wonly as wonly
from runtime.errors import PassError

SAMPLE_ROWS = 256


def clip_on(opts, fmt) -> bool:
    """Clipping search: as asked, else on for 4-bit formats (int8 steps are fine enough)."""
    return fmt is not None and (opts.clip if opts.clip is not None else fmt.bits == 4)


def statistics(model: ir.Model, ctx: PassContext, opts, names: list[str], gram: list[str] = ()):
    """(statistics by value name, note, calibration batches or None)."""
    weight_only = opts.mode in wonly.BITS
    aids = opts.smooth or (opts.outliers and not weight_only) or (weight_only and clip_on(opts, wonly.weight_format(opts)))
    must = opts.mode == "w8a8" or opts.budget is not None or opts.kv != "none" or opts.gptq
    if not must and (opts.calib == "none" or not aids):
        return {}, "no calibration (smoothing and clipping off)", None
    from optimizer.calibrate import collect

    if opts.calib == "auto" and not must and getattr(ctx, "calibration", None) is None and not ctx.example_feeds:
        return {}, "no calibration data (no example inputs): smoothing and float outlier channels off", None
    if opts.calib == "none":
        raise PassError("budget=, kv= and gptq= need calibration data; drop calib=none.")
    batches, where = _calibration(ctx, opts)
    stats = collect(model, names, batches, progress=ctx.progress, keep_rows=SAMPLE_ROWS, gram=gram)
    return stats, f"calibration: {where}", batches


def _calibration(ctx: PassContext, opts) -> tuple[list[dict[str, np.ndarray]], str]:
    from optimizer.calibrate import calibration_feeds

    source = opts.calib
    if source == "auto":
        given = getattr(ctx, "calibration", None)
        source = given if given is not None else "example"
    if isinstance(source, str) and source == "example":
        if opts.mode == "w8a8" and opts.calib == "auto":
            # Measured: MiniLM's static scales from its two random-token example rows gave an
            # embedding cosine of 0.936 on real text (0.994 with its news calibration split).
            raise PassError("mode w8a8 fixes activation scales from calibration data but only the model's example "
                            "inputs are at hand; give calib=NAME (a built-in model's calibration data) or calib=example.")
        if not ctx.example_feeds:
            raise PassError("quantize needs calibration data but the model came with no example inputs; "
                            "set calib=NAME (a built-in model's data) or calib=none.")
        feeds = calibration_feeds(ctx.example_feeds, opts.calib_samples)
        return feeds, f"the example inputs ({_describe(feeds)})"
    feeds = calibration_feeds(source, opts.calib_samples)
    label = source if isinstance(source, str) else getattr(source, "name", type(source).__name__)
    return feeds, f"{label} calibration data ({_describe(feeds)})"


def _describe(feeds: list[dict[str, np.ndarray]]) -> str:
    first = next(iter(feeds[0].values()))
    rows = sum(len(next(iter(b.values()))) for b in feeds)
    return f"{rows} samples of shape {list(first.shape[1:])}"
