"""The ``quantize`` pass: int8 or int4 weights for every MatMul/Gemm with a constant weight.

Modes:
- ``dynamic``: int8 weights per output channel; activations are quantized at run time per
  tensor (the lowering picks the kernel; on ``ort-cpu`` DynamicQuantizeMatMul);
- ``w8``, ``w4``: weight-only int8 / int4, per output channel (``block=0``) or per block of
  32/64/128 input rows (``block``), with an AWQ-style activation-aware scale search and, for
  ``w4``, a search of each block's clipping ratio (``clip``), optionally GPTQ error
  compensation (``gptq``, ``passes.quantize_gptq``); ``w4`` with ``sym=false`` is asymmetric
  (a float offset per block, ``passes.quantize_asym``); activations stay float
  (``passes.quantize_wonly``, ``passes.quantize_block``);
- ``w8a8``: int8 weights and static per-tensor symmetric int8 activations, the activation
  scale from calibration (the ``percentile`` of |x|, or of |x/s| after smoothing); 2-D
  ``Conv``/``ConvTranspose`` nodes are sites too in this mode (``passes.quantize_conv``).

Accuracy aids, both decided per group of sites reading the same activation from calibration
statistics (``optimizer.calibrate``):
- ``outliers``: input channels whose calibrated maximum passes ``outliers`` x the median
  channel's stay in float when an upstream matmul makes that free (``passes.quantize_split``);
  not in ``w8``/``w4``, whose activations are float anyway;
- ``smooth``: SmoothQuant scaling (AWQ-style for ``w8``/``w4``) with the migration strength that
  minimises the simulated error on calibration rows, only where it helps
  (``passes.quantize_math``).
Which sites: all of ``passes.quantize_sites`` except the ``skip`` words (head, embeddings,
first, last, attention, mlp, outside, blockN; several joined by +) and, with ``budget``, the
blocks kept float to stay within that accuracy budget (``passes.quantize_budget``). Embedding
tables (a Gather's table, and the tied head that reads the same table through a Transpose) are
stored quantized once when ``embed`` says so (``passes.quantize_embed``; by default in the
weight-only modes). ``kv`` computes KV-cache scales (``passes.quantize_kv``).

The pass writes the target-neutral decision (``passes.quantize_rewrite``); the lowering for
the target turns it into kernels (``optimizer.lower.ort_quant`` for ``ort-cpu``).

Calibration data (``calib``, ``calib_samples``): see ``passes.quantize_calib``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer.calibrate import zero_channels
from optimizer.pipeline import Pass, PassContext, PassResult, register
from passes import quantize_asym_graph as asym_graph
from passes import quantize_conv
from passes import quantize_extras as extras
from passes import quantize_math as qm
from passes import quantize_wonly as wonly
from passes.quantize_calib import clip_on, statistics
from passes.quantize_block import awq_factors, check_block, quantize_clipped
from passes.quantize_rewrite import activation_qdq, as_matmul, constant, foldable, quantize_weight, scaled_input
from passes.quantize_conv import find_conv_sites
from passes.quantize_sites import Site, find_sites, read_weight, select, skip_words
from passes.quantize_split import outlier_channels, producer_chain, split
from runtime.errors import PassError

MODES = ("dynamic", "w8", "w4", "w8a8")
# Smoothing that needs a Mul (it cannot fold into a norm or an upstream matmul) runs on every call:
# on MiniLM at two threads 24 such Muls cost ~5% of the model. It must then cut the simulated
# error by this fraction (MiniLM: 16 Muls instead of 24, embedding cosine 0.99863 against 0.99838).
MUL_MIN_GAIN = 0.3
# Weight-only int8 per channel loses little, so AWQ-style scaling must gain at least this much.
W8_MIN_GAIN = 0.2


@register
class Quantize(Pass):
    name = "quantize"
    summary = ("int8/int4 MatMul weights (per channel or block-wise) and embedding tables; dynamic, weight-only "
               "or static int8 activations (w8a8 also quantizes convolutions); budget-driven mixed precision; "
               "KV-cache scales (lossy)")
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
        block: int = 0  # w8/w4: 0 per output channel, else input rows per scale (32, 64, 128)
        clip: bool | None = None  # w8/w4: search each scale's clipping ratio (default: on for w4)
        embed: str = "auto"  # embedding tables: auto, float, 8, 4 (auto: the weight-only modes' bits)
        embed_block: int | None = None  # tables' block: 0 per row, 16, 32, 64, 128 (default: block)
        kv: str = "none"  # KV-cache scales to compute: none, int8, fp8
        budget: float | None = None  # keep the most sensitive blocks float within this degradation
        gptq: bool = False  # w8/w4: GPTQ error compensation from the calibration Hessian
        sym: bool = True  # w4: false gives asymmetric int4 (q in 0..15, a float offset per block)

        def validate(self) -> None:
            if self.mode not in MODES:
                raise PassError(f"quantize has no mode {self.mode!r}; the modes are: {', '.join(MODES)}.")
            check_block(self.block)
            if self.block and self.mode not in wonly.BITS:
                raise PassError(f"block={self.block} applies to the weight-only modes w8 and w4; drop it for mode {self.mode}.")
            if self.mode == "w4" and not self.per_channel:
                raise PassError("mode w4 needs per-channel or block-wise scales; drop per_channel=false.")
            wonly.check_sym(self)
            extras.validate(self)
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
        fmt = wonly.weight_format(opts)
        model_map, sites, convs, skipped, notes = _sites(model, ctx, opts)
        tables = extras.Tables.find(model, model_map, opts, fmt)
        notes += tables.notes + extras.lift_opset(model, fmt, tables.fmt)
        groups = _groups(sites)
        stats, calib_note, batches = statistics(model, ctx, opts, [x.name for x, _ in groups] + tables.head_inputs()
                                                 + [c.input.name for c in convs],
                                                 gram=[x.name for x, _ in groups] if opts.gptq else [])
        kv = extras.kv_scales(model, model_map, batches, opts.kv)
        splits = _split_outliers(model.graph, groups, sites, stats, opts)
        # Plan every group before changing weights: a smoothing factor may fold into the columns
        # of an earlier site (the up projection of a gated MLP), which must not be quantized yet.
        plans = [_plan(x, members, stats.get(x.name), opts, fmt) for x, members in groups]
        upstream = {id(s.node): s for s in sites}
        for plan in plans:
            if plan.factors is not None:
                plan.how = scaled_input(model.graph, plan.x, plan.sites, plan.factors, upstream)
        for plan in plans:
            plan.quantized = _quantize_group(plan, opts, fmt)
        tables.prepare(stats, clip_on(opts, tables.fmt))
        float_blocks, budget = extras.budget(model, plans, tables, batches, opts, ctx)
        records = [_apply(model.graph, plan, opts, fmt, float_blocks) for plan in plans]
        for record in records:
            record["float_channels"] = splits.get(record["input"], [])
        records += quantize_conv.apply(model.graph, convs, stats, opts.percentile)
        details = _details(opts, fmt, records, skipped, notes + [calib_note])
        details.update(tables.apply(model.graph))
        details.update({k: v for k, v in (("budget", budget), ("kv_scales", kv)) if v is not None})
        if kv is not None:
            extras.record_kv(model, kv)
        quantized = sum(len(r["sites"]) for r in records if not r.get("kept_float"))
        return PassResult(model=model, sites=quantized + len(tables.tables), details=details)


def _sites(model: ir.Model, ctx: PassContext, opts):
    """(model map, matmul sites kept, convolution sites kept (w8a8 only), sites skipped, notes)."""
    model_map, notes = _map(model, ctx)
    every = find_sites(model, model_map)
    convs = find_conv_sites(model, model_map) if opts.mode == "w8a8" else []
    if not every and not convs:
        raise PassError("there is no MatMul with constant weights to quantize in this model; quantize only applies "
                        "to models with linear layers (and, in mode w8a8, convolutions).")
    blocks = len(getattr(model_map, "blocks", None) or [])
    kept, skipped, more = select(every, opts.skip, blocks)
    kept_convs, skipped_convs, _ = select(convs, opts.skip, 0)
    if not kept and not kept_convs:
        raise PassError(f"skip={'+'.join(opts.skip)} leaves no MatMul to quantize; skip fewer sites.")
    return model_map, kept, kept_convs, skipped + skipped_convs, notes + more


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


def _split_outliers(graph: ir.Graph, groups, sites: list[Site], stats: dict, opts) -> dict[str, list[int]]:
    """Keep outlier input channels in float where an upstream matmul makes that free (quantize_split)."""
    if opts.mode in wonly.BITS or not opts.outliers:
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
    stats: Any = None
    quantized: list[tuple] | None = None  # (q, scale, offset or None) per site


def _plan(x: ir.Value, sites: list[Site], stats, opts, fmt) -> _Plan:
    joint = np.concatenate([s.weight for s in sites], axis=1)
    # A factor that cannot be folded costs a Mul on every run; it must earn more.
    min_gain = qm.MIN_GAIN if foldable(x, sites) else MUL_MIN_GAIN
    plan = _Plan(x, sites, *_alpha(stats, joint, opts, fmt, min_gain), stats=stats)
    if plan.alpha > 0:
        plan.factors = _factors(stats, joint, plan.alpha, fmt)
    if opts.mode == "w8a8":
        plan.act_scale = _act_scale(stats, plan.factors, opts)
    return plan


def scaled_weight(site: Site, plan: _Plan) -> np.ndarray:
    return site.weight if plan.factors is None else site.weight * plan.factors[:, None]


def _quantize_group(plan: _Plan, opts, fmt) -> list[tuple[np.ndarray, np.ndarray]]:
    """(q, scale, offset) per site: GPTQ on the group's joint weight when asked and possible, else each alone."""
    gram = getattr(plan.stats, "gram", None)
    if not (opts.gptq and fmt is not None and opts.per_channel and gram is not None):
        return [_quantized(site, plan, opts, fmt) for site in plan.sites]
    from passes.quantize_gptq import gptq

    if plan.factors is not None:  # the sites read x / s
        gram = gram / np.outer(plan.factors, plan.factors)
    joint = np.concatenate([scaled_weight(site, plan) for site in plan.sites], axis=1)
    q, scale = gptq(joint, gram, fmt, clip_on(opts, fmt))
    edges = np.cumsum([0] + [site.weight.shape[1] for site in plan.sites])
    return [(q[:, a:b], scale[..., a:b], None) for a, b in zip(edges[:-1], edges[1:])]


def _quantized(site: Site, plan: _Plan, opts, fmt) -> tuple:
    weight = scaled_weight(site, plan)
    if fmt is None or not opts.per_channel:
        return (*qm.quantize_weight(weight, opts.per_channel), None)
    return quantize_clipped(weight, fmt, wonly.importance(plan.stats) if plan.factors is None
                            else _scaled_importance(plan), clip_on(opts, fmt))


def _scaled_importance(plan: _Plan) -> np.ndarray | None:
    """The input channels' mean x^2 after the smoothing division (x / s)."""
    base = wonly.importance(plan.stats)
    return None if base is None else base / plan.factors ** 2


def _apply(graph: ir.Graph, plan: _Plan, opts, fmt, float_blocks: set[int]) -> dict[str, Any]:
    """Quantize the group's weights (rows scaled by its factors) and, for w8a8, its activation;
    a group in a block the budget keeps float gets its scaled float weights back instead."""
    keep = bool(float_blocks) and all(site.block in float_blocks for site in plan.sites)
    bits, block = (fmt.bits, fmt.block) if fmt is not None and opts.per_channel else (8, 0)
    for site, (q, scale, offset) in zip(plan.sites, plan.quantized):
        if keep:
            _float_weight(graph, site, plan)
            continue
        info = {"mode": opts.mode, "site": site.name, "role": site.role, "block": site.block,
                "per_channel": opts.per_channel, "smooth_alpha": plan.alpha, "bits": bits, "block_size": block}
        if offset is None:
            quantize_weight(graph, site, q, scale, info, bits, block)
        else:
            asym_graph.quantize_weight(graph, site, q, scale, offset, {**info, "sym": False}, block)
    if plan.act_scale is not None and not keep:
        activation_qdq(graph, plan.sites[0].input, plan.sites, plan.act_scale)
    return {"input": plan.x.name, "sites": [s.name for s in plan.sites], "smooth_alpha": plan.alpha,
            "smoothing": plan.how, "simulated_error": round(plan.error, 5),
            "simulated_error_unsmoothed": round(plan.error_unsmoothed, 5), **({"kept_float": True} if keep else {}),
            **({"activation_scale": plan.act_scale} if plan.act_scale is not None else {})}


def _float_weight(graph: ir.Graph, site: Site, plan: _Plan) -> None:
    """A site left float by the budget: give it the weight it must now read (rows scaled when its
    input was smoothed, columns divided when a later group's factors folded into it)."""
    wanted = scaled_weight(site, plan).astype(np.float32)
    current = read_weight(site.node)
    if current is not None and current.shape == wanted.shape and np.array_equal(current, wanted):
        return
    as_matmul(graph, site)
    site.node.replace_input_with(1, constant(graph, f"{site.node.name}_weight", wanted))


def _alpha(stats, joint: np.ndarray, opts, fmt, min_gain: float) -> tuple[float, float, float]:
    if stats is None or stats.sample is None or not opts.smooth:
        return 0.0, float("nan"), float("nan")
    if fmt is not None:
        gain = max(min_gain, W8_MIN_GAIN) if fmt.bits == 8 else min_gain
        return wonly.search(stats, joint, fmt, gain)
    return qm.best_alpha(stats.sample, stats.channel_absmax, joint, opts.mode, opts.per_channel, min_gain=min_gain)


def _factors(stats, joint: np.ndarray, alpha: float, fmt) -> np.ndarray:
    if fmt is not None:  # AWQ: scale salient channels by mean |x|, normalized around 1
        return awq_factors(stats.channel_mean_abs, alpha)
    return qm.smooth_factors(stats.channel_absmax, joint, alpha)


def _act_scale(stats, factors, opts) -> float:
    if factors is None:
        peak = stats.percentile(opts.percentile)
    else:
        peak = float(np.percentile(np.abs(stats.sample / factors), opts.percentile))
    return float(max(peak, 1e-8) / qm.QMAX)


def _details(opts, fmt, records: list[dict], skipped: list[Site], notes: list[str]) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for name in record["sites"] if not record.get("kept_float") else ():
            counts[name.split(":")[0].split(".")[-1]] += 1
    weights = fmt.describe() if fmt is not None and opts.per_channel else "int8 " + ("per channel" if opts.per_channel else "per tensor")
    return {"mode": opts.mode, "per_channel": opts.per_channel, "weights": weights,
            "quantized": sum(len(r["sites"]) for r in records if not r.get("kept_float")),
            "by_role": dict(counts), "skipped": [s.name for s in skipped],
            "smoothed_groups": sum(1 for r in records if r["smooth_alpha"] > 0),
            "groups": records, "notes": [n for n in notes if n]}
