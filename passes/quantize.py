"""The ``quantize`` pass: int8 weights for every MatMul/Gemm with a constant weight.

Modes:
- ``dynamic``: int8 weights per output channel; activations are quantized at run time per
  tensor (the lowering picks the kernel; on ``ort-cpu`` DynamicQuantizeMatMul);
- ``w8``: weight-only int8 per channel; activations stay float;
- ``w8a8``: int8 weights and static per-tensor symmetric int8 activations, the activation
  scale from calibration (the ``percentile`` of |x|, or of |x/s| after smoothing).

Accuracy aids, both decided per group of sites reading the same activation from calibration
statistics (``optimizer.calibrate``):
- ``outliers``: input channels whose calibrated maximum passes ``outliers`` x the median
  channel's stay in float when an upstream matmul makes that free (``passes.quantize_split``);
  not in ``w8``, whose activations are float anyway;
- ``smooth``: SmoothQuant scaling (AWQ-style for ``w8``) with the migration strength that
  minimises the simulated error on calibration rows, only where it helps
  (``passes.quantize_math``).
Which sites: all of ``passes.quantize_sites`` except the ``skip`` words (head, embeddings,
first, last, attention, mlp, outside, blockN; several joined by +).

The pass writes the target-neutral decision (``passes.quantize_rewrite``); the lowering for
the target turns it into kernels (``optimizer.lower.ort_quant`` for ``ort-cpu``).

Calibration data (``calib``): ``auto`` uses ``ctx.calibration`` when the caller set it (a
built-in name or spec, or feeds), else the example inputs the model came with (``w8a8``
refuses those: static scales from a few random rows do not carry over to real data), else
none (no smoothing or outlier channels); a built-in model name uses that model's calibration
split (news articles or image crops); ``example`` forces the example inputs; ``none`` turns
both aids off (not allowed for ``w8a8``). ``calib_samples`` caps the samples.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer.calibrate import zero_channels
from optimizer.pipeline import Pass, PassContext, PassResult, register
from passes import quantize_math as qm
from passes.quantize_rewrite import activation_qdq, foldable, quantize_weight, scaled_input
from passes.quantize_sites import Site, find_sites, select, skip_words
from passes.quantize_split import outlier_channels, producer_chain, split
from runtime.errors import PassError

MODES = ("dynamic", "w8", "w8a8")
SAMPLE_ROWS = 256
# Smoothing that needs a Mul (it cannot fold into a norm or an upstream matmul) runs on every call:
# on MiniLM at two threads 24 such Muls cost ~5% of the model. It must then cut the simulated
# error by this fraction (MiniLM: 16 Muls instead of 24, embedding cosine 0.99863 against 0.99838).
MUL_MIN_GAIN = 0.3
# Weight-only int8 per channel loses little, so AWQ-style scaling must gain at least this much.
W8_MIN_GAIN = 0.2


@register
class Quantize(Pass):
    name = "quantize"
    summary = "int8 MatMul weights per channel; dynamic, weight-only or static int8 activations (lossy)"
    exact = False

    @dataclass
    class Options:
        mode: str = "dynamic"
        skip: tuple[str, ...] = ()
        per_channel: bool = True
        smooth: bool = True
        calib: str = "auto"
        calib_samples: int = 32
        percentile: float = 99.99
        outliers: float = 8.0

        def validate(self) -> None:
            if self.mode not in MODES:
                raise PassError(f"quantize has no mode {self.mode!r}; the modes are: {', '.join(MODES)}.")
            skip_words(self.skip)
            if self.calib_samples < 1:
                raise PassError(f"quantize needs calib_samples >= 1, got {self.calib_samples}.")
            if self.outliers < 0:
                raise PassError(f"quantize needs outliers >= 0 (0 turns the float outlier channels off), got {self.outliers}.")
            if not 50.0 < self.percentile <= 100.0:
                raise PassError(f"quantize needs 50 < percentile <= 100, got {self.percentile}.")
            if self.mode == "w8a8" and self.calib == "none":
                raise PassError("mode w8a8 needs calibration data for its activation scales; drop calib=none.")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = self.options
        if model.opset_imports.get("", 0) < 13:
            raise PassError(f"quantize needs ONNX opset 13 or newer (per-channel DequantizeLinear) but the model "
                            f"has opset {model.opset_imports.get('', 0)}; export it with a newer opset.")
        sites, skipped, notes = _sites(model, ctx, opts.skip)
        groups = _groups(sites)
        stats, calib_note = _statistics(model, ctx, opts, groups)
        splits = _split_outliers(model.graph, groups, sites, stats, opts)
        # Plan every group before changing weights: a smoothing factor may fold into the columns
        # of an earlier site (the up projection of a gated MLP), which must not be quantized yet.
        plans = [_plan(x, members, stats.get(x.name), opts) for x, members in groups]
        upstream = {id(s.node): s for s in sites}
        for plan in plans:
            if plan.factors is not None:
                plan.how = scaled_input(model.graph, plan.x, plan.sites, plan.factors, upstream)
        records = [_apply(model.graph, plan, opts) for plan in plans]
        for record in records:
            record["float_channels"] = splits.get(record["input"], [])
        details = _details(opts, records, skipped, notes + [calib_note])
        return PassResult(model=model, sites=len(sites), details=details)


def _sites(model: ir.Model, ctx: PassContext, skip: tuple[str, ...]):
    model_map, notes = _map(model, ctx)
    every = find_sites(model, model_map)
    if not every:
        raise PassError("there is no MatMul with constant weights to quantize in this model; quantize only applies "
                        "to models with linear layers.")
    blocks = len(getattr(model_map, "blocks", None) or [])
    kept, skipped, more = select(every, skip, blocks)
    if not kept:
        raise PassError(f"skip={'+'.join(skip)} leaves no MatMul to quantize; skip fewer sites.")
    return kept, skipped, notes + more


def _map(model: ir.Model, ctx: PassContext):
    """The model map, or None (with a note) when it cannot be built: sites are then found by op."""
    try:
        model_map = ctx.model_map(model)
    except Exception as exc:  # the map is an aid here; quantization works without it
        return None, [f"model map unavailable ({type(exc).__name__}: {exc}); sites found by op type"]
    if not getattr(model_map, "blocks", None):
        return model_map, ["the model map found no blocks; every MatMul/Gemm with a constant weight is a site"]
    return model_map, []


def _groups(sites: list[Site]) -> list[tuple[ir.Value, list[Site]]]:
    """Sites grouped by the activation they read (Q/K/V share one), in graph order."""
    by_input: dict[int, tuple[ir.Value, list[Site]]] = {}
    for site in sites:
        by_input.setdefault(id(site.input), (site.input, []))[1].append(site)
    return list(by_input.values())


def _statistics(model: ir.Model, ctx: PassContext, opts, groups) -> tuple[dict[str, Any], str]:
    needed = opts.mode == "w8a8" or (opts.calib != "none" and (opts.smooth or (opts.outliers and opts.mode != "w8")))
    if not needed:
        return {}, "no calibration (smoothing off)"
    from optimizer.calibrate import collect

    if opts.calib == "auto" and opts.mode != "w8a8" and getattr(ctx, "calibration", None) is None \
            and not ctx.example_feeds:
        return {}, "no calibration data (no example inputs): smoothing and float outlier channels off"
    batches, where = _calibration(ctx, opts)
    names = [x.name for x, _ in groups]
    stats = collect(model, names, batches, progress=ctx.progress, keep_rows=SAMPLE_ROWS)
    return stats, f"calibration: {where}"


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


def _split_outliers(graph: ir.Graph, groups, sites: list[Site], stats: dict, opts) -> dict[str, list[int]]:
    """Keep outlier input channels in float where an upstream matmul makes that free (quantize_split)."""
    if opts.mode == "w8" or not opts.outliers:
        return {}
    by_node = {id(s.node): s for s in sites}
    done: dict[str, list[int]] = {}
    for x, members in groups:
        st = stats.get(x.name)
        chain = producer_chain(x, members) if st is not None else None
        out = outlier_channels(st.channel_absmax, opts.outliers) if chain else []
        if len(out):
            split(graph, chain, members, out, by_node.get(id(chain[0])))
            stats[x.name] = zero_channels(st, out)
            done[x.name] = [int(i) for i in out]
    return done


@dataclass
class _Plan:
    """What one group of sites (one activation) gets: smoothing factors and activation scale."""

    x: ir.Value
    sites: list[Site]
    alpha: float
    error: float
    error_unsmoothed: float
    factors: np.ndarray | None = None
    act_scale: float | None = None
    how: str | None = None


def _plan(x: ir.Value, sites: list[Site], stats, opts) -> _Plan:
    joint = np.concatenate([s.weight for s in sites], axis=1)
    # A factor that cannot be folded costs a Mul on every run; it must earn more.
    min_gain = qm.MIN_GAIN if foldable(x, sites) else MUL_MIN_GAIN
    plan = _Plan(x, sites, *_alpha(stats, joint, opts, min_gain))
    if plan.alpha > 0:
        plan.factors = _factors(stats, joint, plan.alpha, opts.mode)
    if opts.mode == "w8a8":
        plan.act_scale = _act_scale(stats, plan.factors, opts)
    return plan


def _apply(graph: ir.Graph, plan: _Plan, opts) -> dict[str, Any]:
    """Quantize the group's weights (rows scaled by its factors) and, for w8a8, its activation."""
    for site in plan.sites:
        weight = site.weight if plan.factors is None else site.weight * plan.factors[:, None]
        q, scale = qm.quantize_weight(weight, opts.per_channel)
        info = {"mode": opts.mode, "site": site.name, "role": site.role, "block": site.block,
                "per_channel": opts.per_channel, "smooth_alpha": plan.alpha}
        quantize_weight(graph, site, q, scale, info)
    if plan.act_scale is not None:
        activation_qdq(graph, plan.sites[0].input, plan.sites, plan.act_scale)
    return {"input": plan.x.name, "sites": [s.name for s in plan.sites], "smooth_alpha": plan.alpha,
            "smoothing": plan.how, "simulated_error": round(plan.error, 5),
            "simulated_error_unsmoothed": round(plan.error_unsmoothed, 5),
            **({"activation_scale": plan.act_scale} if plan.act_scale is not None else {})}


def _alpha(stats, joint: np.ndarray, opts, min_gain: float) -> tuple[float, float, float]:
    if stats is None or stats.sample is None or not opts.smooth:
        return 0.0, float("nan"), float("nan")
    if opts.mode == "w8":
        return _awq_alpha(stats, joint, opts, max(min_gain, W8_MIN_GAIN))
    return qm.best_alpha(stats.sample, stats.channel_absmax, joint, opts.mode, opts.per_channel, min_gain=min_gain)


def _awq_alpha(stats, joint: np.ndarray, opts, min_gain: float) -> tuple[float, float, float]:
    exact = stats.sample @ joint
    base = qm.activation_error(stats.sample, joint, "w8", opts.per_channel, exact=exact)
    best = (0.0, base, base)
    for alpha in qm.ALPHAS[1:]:
        s = _factors(stats, joint, alpha, "w8")
        err = qm.activation_error(stats.sample / s, joint * s[:, None], "w8", opts.per_channel, exact=exact)
        if err < base * (1.0 - min_gain) and err < best[1]:
            best = (alpha, err, base)
    return best


def _factors(stats, joint: np.ndarray, alpha: float, mode: str) -> np.ndarray:
    if mode == "w8":  # AWQ: scale salient channels by mean |x|, normalized around 1
        s = np.maximum(stats.channel_mean_abs.astype(np.float32), 1e-8) ** alpha
        return np.clip(s / np.sqrt(s.max() * s.min()), 1e-3, 1e3).astype(np.float32)
    return qm.smooth_factors(stats.channel_absmax, joint, alpha)


def _act_scale(stats, factors, opts) -> float:
    if factors is None:
        peak = stats.percentile(opts.percentile)
    else:
        peak = float(np.percentile(np.abs(stats.sample / factors), opts.percentile))
    return float(max(peak, 1e-8) / qm.QMAX)


def _details(opts, records: list[dict], skipped: list[Site], notes: list[str]) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for name in record["sites"]:
            counts[name.split(":")[0].split(".")[-1]] += 1
    return {"mode": opts.mode, "per_channel": opts.per_channel, "quantized": sum(len(r["sites"]) for r in records),
            "by_role": dict(counts), "skipped": [s.name for s in skipped],
            "smoothed_groups": sum(1 for r in records if r["smooth_alpha"] > 0),
            "groups": records, "notes": [n for n in notes if n]}
